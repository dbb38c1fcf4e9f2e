"""Last-token logits for right-padded batches: a small edit of the builder's `prune_lm_head` graph.

With `prune_lm_head=true` the model builder puts `Gather(hidden, -1, axis=1)` before the LM head, so a prefill
computes logits for one position per row instead of all of them (at batch 32 × 40 tokens the LM head was ~20 % of
the prefill's matmul work, and its logits 250 MB). But position -1 is the last *padded* position, and the ONNX
engine right-pads its batches (GroupQueryAttention takes right padding only), so a shorter prompt would read a pad's
logits. This swaps that Gather for a per-row one: row b reads position

    clip(sum(attention_mask[b, T-S:T]) - 1, 0, S-1)        (S = new tokens this run, T = past + S)

i.e. its last real token in this run: L-1 in a prefill of L real tokens, 0 in a decode step. The mask's last S
columns are this run's tokens because onnxruntime-genai passes a mask of past + S columns (seen in its profile).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRUNE_GATHER = "/lm_head/prune/Gather"


class GraphEditError(RuntimeError):
    pass


def gather_last_real_token(model_file: Path) -> None:
    """Rewrite `model_file` (external weights stay where they are) so the pruned LM head follows right padding."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    index = next((i for i, node in enumerate(graph.node) if node.name == PRUNE_GATHER), None)
    if index is None:
        raise GraphEditError(f"{model_file}: no {PRUNE_GATHER} node (was it built with prune_lm_head=true?)")
    gather = graph.node[index]
    hidden, old_index, out = gather.input[0], gather.input[1], gather.output[0]
    p = "/lm_head/last_real_token"

    def const(name: str, values: list[int]) -> str:
        graph.initializer.append(helper.make_tensor(f"{p}/{name}", TensorProto.INT64, [len(values)], values))
        return f"{p}/{name}"

    one, zero, axis1 = const("one", [1]), const("zero", [0]), const("axis1", [1])
    nodes = [
        helper.make_node("Shape", ["input_ids"], [f"{p}/S"], name=f"{p}/ShapeS", start=1, end=2),
        helper.make_node("Shape", ["attention_mask"], [f"{p}/T"], name=f"{p}/ShapeT", start=1, end=2),
        helper.make_node("Sub", [f"{p}/T", f"{p}/S"], [f"{p}/past"], name=f"{p}/Past"),
        helper.make_node("Slice", ["attention_mask", f"{p}/past", f"{p}/T", axis1], [f"{p}/run"], name=f"{p}/Tail"),
        helper.make_node("ReduceSum", [f"{p}/run", axis1], [f"{p}/count"], name=f"{p}/Count", keepdims=0),
        helper.make_node("Sub", [f"{p}/count", one], [f"{p}/last"], name=f"{p}/Last"),
        helper.make_node("Sub", [f"{p}/S", one], [f"{p}/S_minus_1"], name=f"{p}/SMinus1"),
        helper.make_node("Max", [f"{p}/last", zero], [f"{p}/low"], name=f"{p}/Low"),
        helper.make_node("Min", [f"{p}/low", f"{p}/S_minus_1"], [f"{p}/index"], name=f"{p}/Index"),
        helper.make_node("Unsqueeze", [f"{p}/index", axis1], [f"{p}/index_2d"], name=f"{p}/Index2D"),
        # [B, S, H] gathered at [B, 1] with batch_dims=1 -> [B, H], what the builder's Gather produced.
        helper.make_node("GatherND", [hidden, f"{p}/index_2d"], [out], name=f"{p}/GatherND", batch_dims=1),
    ]
    del graph.node[index]
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    if not any(old_index in node.input for node in graph.node):  # the constant -1 is left unused: drop it
        _drop_producer(graph, old_index)
    tmp = model_file.with_suffix(".edited")
    onnx.save(model, str(tmp))
    tmp.replace(model_file)


def _drop_producer(graph: Any, name: str) -> None:
    """Remove the initializer or Constant node that defines `name` (onnxruntime warns about unused ones)."""
    for i, init in enumerate(graph.initializer):
        if init.name == name:
            del graph.initializer[i]
            return
    for i, node in enumerate(graph.node):
        if node.op_type == "Constant" and name in node.output:
            del graph.node[i]
            return
