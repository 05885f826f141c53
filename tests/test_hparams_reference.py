"""Every per-architecture default of ROME, MEMIT and AlphaEdit against the reference hparams
files it cites (values read from the files at the commits below). A change to a default
that departs from its source fails here; SmolLM2's measured entries are not in the table
because no reference file exists for it."""

import pytest

from kedit_core.methods.alphaedit import AlphaEditConfig
from kedit_core.methods.anyedit import AnyEditConfig
from kedit_core.methods.memit.method import MemitConfig
from kedit_core.methods.rome.method import RomeConfig

ALPHAEDIT_REPO = "jianghoucheng/AlphaEdit@f5248d3d25f1b3863bff19c387293d635866079f"
MEMIT_REPO = "kmeng01/memit@80426fd9316cf9a50c5ba15e0912f2c2c5bfe84b"
ROME_REPO = "kmeng01/rome@0874014cd9837e4365f3e6f3c71400ef11509e04"
ANYEDIT_REPO = "jianghoucheng/AnyEdit@ac8e65240fec5ada76ce37360727b5dcbb1d5672"
# hparams/{MEMIT,AlphaEdit}_ARE/*.json share these (no KL term is used by their compute_z)
ANYEDIT = dict(layers=(4, 5, 6, 7, 8), clamp_norm_factor=4.0, v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3,
               mom2_update_weight=15_000.0, L2=10.0, nullspace_threshold=0.02, mom2_n_samples=100_000)

COMMON = dict(v_weight_decay=0.5, kl_factor=0.0625, mom2_n_samples=100_000)

# (config class, arch key, source file, reference values)
TABLE = [
    (AlphaEditConfig, ("gptj", 28, 4096), f"{ALPHAEDIT_REPO}:hparams/AlphaEdit/EleutherAI_gpt-j-6B.json",
     dict(layers=(3, 4, 5, 6, 7, 8), clamp_norm_factor=0.75, v_num_grad_steps=25, v_lr=0.5, L2=10.0,
          nullspace_threshold=0.02, **COMMON)),
    (AlphaEditConfig, ("llama", 32, 4096), f"{ALPHAEDIT_REPO}:hparams/AlphaEdit/Llama3-8B.json",
     dict(layers=(4, 5, 6, 7, 8), clamp_norm_factor=0.75, v_num_grad_steps=25, v_lr=0.1, L2=10.0,
          nullspace_threshold=0.02, **COMMON)),
    (AlphaEditConfig, ("gpt2", 48, 1600), f"{ALPHAEDIT_REPO}:hparams/AlphaEdit/gpt2-xl.json",
     dict(layers=(13, 14, 15, 16, 17), clamp_norm_factor=0.75, v_num_grad_steps=20, v_lr=0.5, L2=10.0,
          nullspace_threshold=0.02, **COMMON)),
    (MemitConfig, ("gptj", 28, 4096), f"{MEMIT_REPO}:hparams/MEMIT/EleutherAI_gpt-j-6B.json",
     dict(layers=(3, 4, 5, 6, 7, 8), clamp_norm_factor=0.75, v_num_grad_steps=25, v_lr=0.5,
          mom2_update_weight=15_000.0, **COMMON)),
    (MemitConfig, ("gpt2", 48, 1600), f"{MEMIT_REPO}:hparams/MEMIT/gpt2-xl.json",
     dict(layers=(13, 14, 15, 16, 17), clamp_norm_factor=0.75, v_num_grad_steps=20, v_lr=0.5,
          mom2_update_weight=20_000.0, **COMMON)),
    (MemitConfig, ("llama", 32, 4096), f"{ALPHAEDIT_REPO}:hparams/MEMIT/Llama3-8B.json",
     dict(layers=(4, 5, 6, 7, 8), clamp_norm_factor=0.75, v_num_grad_steps=25, v_lr=0.1,
          mom2_update_weight=15_000.0, **COMMON)),
    (AnyEditConfig, ("llama", 32, 4096), f"{ANYEDIT_REPO}:hparams/AlphaEdit_ARE/Llama3-8B-Instruct.json",
     dict(window_size=40, **ANYEDIT)),
    (AnyEditConfig, ("llama", 28, 3584), f"{ANYEDIT_REPO}:hparams/AlphaEdit_ARE/Qwen2.5-7B-Instruct.json",
     dict(window_size=50, **ANYEDIT)),
    (RomeConfig, ("gpt2", 48, 1600), f"{ROME_REPO}:hparams/ROME/gpt2-xl.json",
     dict(layers=(17,), clamp_norm_factor=4.0, v_num_grad_steps=20, v_lr=0.5, mom2_adjustment=True, **COMMON)),
    (RomeConfig, ("gptj", 28, 4096), f"{ROME_REPO}:hparams/ROME/EleutherAI_gpt-j-6B.json",
     dict(layers=(5,), clamp_norm_factor=4.0, v_num_grad_steps=20, v_lr=0.5, mom2_adjustment=True, **COMMON)),
    (RomeConfig, ("llama", 32, 4096), f"{ALPHAEDIT_REPO}:hparams/ROME/Llama3-8B.json",
     dict(layers=(5,), clamp_norm_factor=4.0, v_num_grad_steps=25, v_lr=0.5, mom2_adjustment=False,
          v_weight_decay=1e-3, kl_factor=0.0625, mom2_n_samples=100_000)),
]


@pytest.mark.parametrize("cls,key,source,ref", TABLE, ids=[f"{t[0].__name__}-{t[1][0]}{t[1][1]}" for t in TABLE])
def test_arch_defaults_equal_the_reference_files(cls, key, source, ref):
    cfg = cls(**cls.ARCH_DEFAULTS[key])
    got = {k: getattr(cfg, k) for k in ref}
    assert got == ref, f"{cls.__name__} {key} departs from {source}"


def test_every_paper_entry_is_in_the_table():
    """An entry for a paper model (not SmolLM2's measured one) must have a source here."""
    covered = {(t[0], t[1]) for t in TABLE}
    for cls in (AlphaEditConfig, AnyEditConfig, MemitConfig, RomeConfig):
        for key in cls.ARCH_DEFAULTS:
            if key != ("llama", 30, 576):
                assert (cls, key) in covered, (cls.__name__, key)
