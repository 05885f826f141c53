"""Architecture adapters on tiny random models of every supported family."""

import pytest
import torch

from kedit_core.errors import UnsupportedArchitectureError
from kedit_core.hooks import trace
from kedit_core.models import load
from kedit_core.models.arch import ArchSpec, arch_for, register_arch, supported_architectures

from conftest import TINY

EXPECTED_FAMILY = {"tiny-random-gpt2": "gpt2", "tiny-random-gptj": "gptj",
                   "tiny-random-gptneox": "gptneox", "tiny-random-llama": "llama",
                   "tiny-random-mistral": "llama", "tiny-random-qwen2": "llama",
                   "tiny-random-gemma3": "gemma3"}


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    return load(request.param, device="cpu")


def test_adapter_chosen_by_class_name(tiny):
    assert tiny.arch.family == EXPECTED_FAMILY[tiny.name]
    assert tiny.model.config.architectures[0] in tiny.arch.architectures


def test_every_site_resolves(tiny):
    n = tiny.n_layers
    assert n == 4
    sites = ["embed", "final_norm", "unembed"] + [
        f"blocks.{i}{s}" for i in range(n) for s in ("", ".mlp.in", ".mlp.out", ".attn.out")]
    for site in sites:
        mod = tiny.arch.module(tiny.model, site)
        assert isinstance(mod, torch.nn.Module), site
    hidden = tiny.model.config.hidden_size if hasattr(tiny.model.config, "hidden_size") else tiny.model.config.n_embd
    out_f, in_f = tiny.arch.dims(tiny.model, "blocks.0.mlp.out")
    assert out_f == hidden and in_f > hidden  # MLP output projection: width -> hidden
    out_f, in_f = tiny.arch.dims(tiny.model, "blocks.0.mlp.in")
    assert in_f == hidden and out_f == tiny.arch.dims(tiny.model, "blocks.0.mlp.out")[1]


def test_delta_through_adapter_changes_output_as_computed_by_hand(tiny):
    """Adding D (out, in) to the MLP output projection through the adapter's orientation
    changes that module's output by exactly x @ D.T."""
    model, arch, tok = tiny.model, tiny.arch, tiny.tokenizer
    site = "blocks.1.mlp.out"
    mod = arch.module(model, site)
    ids = tok(["The Eiffel Tower is in"], return_tensors="pt")
    with trace({site: mod}, inputs=True, outputs=True) as t:
        model(**ids)
    x, y0 = t.inputs[site], t.outputs[site]
    out_f, in_f = arch.dims(model, site)
    D = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)) * 0.01
    w = arch.weight(model, site)
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w += arch.from_out_in(D)
        with trace({site: mod}, inputs=True, outputs=True) as t2:
            model(**ids)
        assert torch.allclose(t2.inputs[site], x, atol=1e-6)  # earlier layers unchanged
        torch.testing.assert_close(t2.outputs[site], y0 + x @ D.T, atol=1e-5, rtol=1e-4)
        assert torch.equal(arch.as_out_in(w.detach()), arch.as_out_in(saved) + D)
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_gpt2_is_conv1d_and_llama_linear():
    g, l = load("tiny-random-gpt2", device="cpu"), load("tiny-random-llama", device="cpu")
    assert g.arch.weight_layout == "conv1d"
    assert g.arch.weight(g.model, "blocks.0.mlp.out").shape == (256, 64)  # (in, out)
    assert l.arch.weight_layout == "linear"
    assert l.arch.weight(l.model, "blocks.0.mlp.out").shape == (64, 128)  # (out, in)


def test_unknown_architecture_lists_supported_and_how_to_register():
    from transformers import PretrainedConfig

    cfg = PretrainedConfig(architectures=["FancyNewForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError) as e:
        arch_for(cfg)
    msg = str(e.value)
    assert "FancyNewForCausalLM" in msg and "LlamaForCausalLM" in msg and "register_arch" in msg
    assert "\n" not in msg


def test_register_new_architecture():
    spec = ArchSpec(family="fancy", architectures=("FancyTestForCausalLM",), blocks="m.layers",
                    mlp_in="mlp.up", mlp_out="mlp.down", attn_out="attn.o", final_norm="m.norm",
                    unembed="head", embed="m.embed")
    register_arch(spec)
    assert "FancyTestForCausalLM" in supported_architectures()
    assert spec.site_path("blocks.3.mlp.out") == "m.layers.3.mlp.down"
    with pytest.raises(ValueError):
        register_arch(spec)
    with pytest.raises(KeyError):
        spec.site_path("blocks.x.mlp")
