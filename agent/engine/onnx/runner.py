"""One forward pass of the built decoder (model.onnx) with onnxruntime, over rows of the KV pool.

The builder's CPU decoder takes `input_ids` [B, S], `attention_mask` [B, past + S] and `past_key_values.*` and
returns `logits` and `present.*`. Its GroupQueryAttention updates a cache in place when `present.*` is bound to the
same memory as `past_key_values.*` and that buffer is longer than the sequence (what onnxruntime-genai calls
past_present_share_buffer): so past and present are bound to the same views of the pool's rows, and nothing is
copied. Each row's length comes from its attention-mask sum; a row's new tokens go right after its cached ones.
GroupQueryAttention refuses a batch of several rows that each bring more than one token with a cache behind them,
so a prefill that reuses a cached prefix runs one row at a time (decode steps and cold prefills batch freely).
Binding the 2 x layers KV views costs ~0.3 ms (3 % of a batch-1 decode step here), so a binding is kept per rows
slice until the pool's buffers change; each run rebinds only the token ids, the mask and the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.engine.errors import ModelLoadError
from agent.engine.onnx.kv import KvPool

_PAST = "past_key_values."


class DecoderRunner:
    def __init__(self, model_file: Path, threads: int, pool: KvPool) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._ort = ort
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self.pool = pool
        names = {arg.name for arg in self.session.get_inputs()}
        unexpected = sorted(n for n in names - {"input_ids", "attention_mask"} if not n.startswith(_PAST))
        if unexpected:
            raise ModelLoadError(f"{model_file}: unsupported decoder inputs {unexpected} for the ONNX engine")
        logits = next(arg for arg in self.session.get_outputs() if arg.name == "logits")
        self.vocab_size = int(logits.shape[-1])
        self._bindings: dict[tuple[int, int], Any] = {}  # (first row, end row) -> binding with their KV bound
        self._bound_generation = pool.generation

    def forward(self, rows: slice, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run `input_ids` for pool rows `rows`; returns each row's logits for its last real token, [n, vocab]."""
        ort = self._ort
        binding = self._kv_binding(rows)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        logits = np.empty((input_ids.shape[0], 1, self.vocab_size), dtype=np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        return logits[:, -1]

    def _kv_binding(self, rows: slice) -> Any:
        """A binding of `rows`' KV views (past and present share each one), made once per rows slice and pool
        allocation; bindings of older buffers are dropped before they could run."""
        if self._bound_generation != self.pool.generation:
            self._bindings.clear()
            self._bound_generation = self.pool.generation
        key = (rows.start, rows.stop)
        binding = self._bindings.get(key)
        if binding is None:
            binding = self._bindings[key] = self.session.io_binding()
            for layer, (keys, values) in enumerate(zip(self.pool.keys, self.pool.values, strict=True)):
                for kind, buffer in (("key", keys), ("value", values)):
                    view = self._ort.OrtValue.ortvalue_from_numpy(buffer[rows])
                    binding.bind_ortvalue_input(f"{_PAST}{layer}.{kind}", view)
                    binding.bind_ortvalue_output(f"present.{layer}.{kind}", view)
        return binding
