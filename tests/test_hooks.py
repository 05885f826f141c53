"""Hooks: tracing, adding vectors at positions, early stop, and restoration."""

import pytest
import torch

from kedit_core.hooks import add_at_positions, replace_output, run_until_stopped, trace
from kedit_core.models import load


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


def _ids(lm, texts):
    lm.tokenizer.padding_side = "right"
    return lm.tokenizer(texts, return_tensors="pt", padding=True)


def test_trace_reads_block_outputs_as_tensors(lm):
    blocks = {f"b{i}": lm.arch.module(lm.model, f"blocks.{i}") for i in range(4)}
    ids = _ids(lm, ["abc", "hello there"])
    with trace(blocks) as t:
        out = lm.model(**ids, output_hidden_states=True)
    for i in range(4):
        # hidden_states[i + 1] is block i's output (the last one after the final norm).
        if i < 3:
            torch.testing.assert_close(t.outputs[f"b{i}"], out.hidden_states[i + 1])
        assert t.outputs[f"b{i}"].shape[0] == 2  # the whole batch, never item 0 alone


def test_add_at_positions_adds_only_there(lm):
    site = lm.arch.module(lm.model, "blocks.1")
    ids = _ids(lm, ["abcdef", "ghijkl"])
    with trace({"b": site}) as t0:
        lm.model(**ids)
    vec = torch.randn(2, 64)
    with add_at_positions(site, [[2], [4, 5]], vec), trace({"b": site}) as t1:
        lm.model(**ids)
    diff = t1.outputs["b"] - t0.outputs["b"]
    expected = torch.zeros_like(diff)
    expected[0, 2] = vec[0]
    expected[1, 4] = vec[1]
    expected[1, 5] = vec[1]
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=1e-5)


def test_add_at_positions_carries_gradients(lm):
    site = lm.arch.module(lm.model, "blocks.2")
    ids = _ids(lm, ["abcdef"])
    delta = torch.zeros(64, requires_grad=True)
    with add_at_positions(site, [[3]], delta):
        loss = lm.model(**ids).logits[0, -1].logsumexp(-1)
    loss.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_stop_forward_after_a_module(lm):
    mods = {f"b{i}": lm.arch.module(lm.model, f"blocks.{i}") for i in range(4)}
    ids = _ids(lm, ["abc"])
    with trace(mods, stop_after="b1") as t:
        result = run_until_stopped(lambda: lm.model(**ids))
    assert result is None
    assert set(t.outputs) == {"b0", "b1"}  # blocks 2 and 3 never ran


def test_hooks_removed_even_after_an_exception(lm):
    site = lm.arch.module(lm.model, "blocks.0")
    ids = _ids(lm, ["abc"])
    ref = lm.model(**ids).logits
    before = dict(site._forward_hooks)  # transformers may keep hooks of its own there
    with pytest.raises(RuntimeError):
        with replace_output(site, lambda y: y * 0), add_at_positions(site, [[0]], torch.ones(64)):
            raise RuntimeError("boom")
    assert dict(site._forward_hooks) == before
    torch.testing.assert_close(lm.model(**ids).logits, ref)
