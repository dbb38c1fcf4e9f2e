"""The pruned LM head's per-row gather (agent.engine.onnx.last_token), on a toy graph shaped like the builder's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from agent.engine.onnx.last_token import PRUNE_GATHER, GraphEditError, gather_last_real_token

H = 4


def _toy_model(path: Path, *, with_prune: bool = True, constant_node: bool = False) -> Path:
    """hidden [B, S, H] -> builder's Gather(-1, axis=1) + Unsqueeze -> "logits" [B, 1, H]; the -1 is an initializer,
    or a Constant node as the builder writes it."""
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["B", "S", H]),
    ]
    minus_one = helper.make_tensor("/model/constants/INT64/-1", TensorProto.INT64, [], [-1])
    one = helper.make_tensor("/model/constants/INT64/[1]", TensorProto.INT64, [1], [1])
    gather = helper.make_node(
        "Gather", ["hidden", minus_one.name], ["g"], name=PRUNE_GATHER if with_prune else "other", axis=1
    )
    unsqueeze = helper.make_node("Unsqueeze", ["g", one.name], ["logits"], name="/lm_head/prune/Unsqueeze")
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 1, H])
    nodes, initializers = [gather, unsqueeze], [minus_one, one]
    if constant_node:
        nodes.insert(
            0,
            helper.make_node("Constant", [], [minus_one.name], name="/model/constant_nodes/INT64/-1", value=minus_one),
        )
        initializers = [one]
    graph = helper.make_graph(nodes, "toy", inputs, [output], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _run(path: Path, lengths: list[int], width: int, past: int = 0) -> np.ndarray:
    """Right-padded rows: row b has lengths[b] real tokens among this run's `width`, after `past` cached ones."""
    batch = len(lengths)
    hidden = np.arange(batch * width * H, dtype=np.float32).reshape(batch, width, H)
    mask = np.zeros((batch, past + width), dtype=np.int64)
    mask[:, :past] = 1
    for b, n in enumerate(lengths):
        mask[b, past : past + n] = 1
    feeds = {"input_ids": np.zeros((batch, width), np.int64), "attention_mask": mask, "hidden": hidden}
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    assert logits.shape == (batch, 1, H)
    expected = np.stack([hidden[b, max(n - 1, 0)] for b, n in enumerate(lengths)])[:, None, :]
    np.testing.assert_array_equal(logits, expected)
    return logits


def test_builder_gather_reads_the_pad_of_shorter_rows(tmp_path: Path) -> None:
    """Why the edit exists: the builder's own Gather takes position -1, a pad for every shorter row."""
    with pytest.raises(AssertionError):
        _run(_toy_model(tmp_path / "m.onnx"), [5, 2, 3], width=5)


@pytest.mark.parametrize("constant_node", [False, True])
def test_each_row_reads_its_last_real_token(tmp_path: Path, constant_node: bool) -> None:
    path = _toy_model(tmp_path / "m.onnx", constant_node=constant_node)
    gather_last_real_token(path)
    graph = onnx.load(str(path)).graph
    assert "/model/constants/INT64/-1" not in {i.name for i in graph.initializer} | {
        o for n in graph.node for o in n.output
    }
    _run(path, [5, 2, 3, 1], width=5)  # prefill, right-padded
    _run(path, [1, 1, 1], width=1, past=7)  # decode step
    _run(path, [3, 1], width=3, past=4)  # a later chunk with a cache behind it


def test_a_model_without_the_pruned_head_is_refused(tmp_path: Path) -> None:
    path = _toy_model(tmp_path / "m.onnx", with_prune=False)
    with pytest.raises(GraphEditError, match="prune_lm_head"):
        gather_last_real_token(path)
