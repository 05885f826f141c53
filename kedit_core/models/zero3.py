"""Models partitioned with DeepSpeed ZeRO stage 3 (the optional `deepspeed` extra), for a
replica that does not fit on one device.

`load_zero3` builds the model under `HfDeepSpeedConfig`, so transformers creates every
parameter already partitioned (`deepspeed.zero.Init`) and never materialises the whole
model, then wraps it in a DeepSpeed engine whose hooks gather each layer's parameters
for its forward and backward passes and release them afterwards. With the default
config the partitions live in CPU memory (`offload_param`) when the compute device is a
GPU: one GPU then holds one layer at a time, so a replica needs about one layer of GPU
memory plus activations (Rajbhandari et al. 2104.07857, ZeRO-Infinity).

Everything else in kedit reaches weights through `full_weights` (kedit_core.apply), which
for such a model gathers the edited sites with `deepspeed.zero.GatheredParameters`
(`modifier_rank=0` when writing, so the new values are re-partitioned on exit), and
`LoadedModel.fingerprint` gathers one parameter at a time. So editing, reverting,
checkpoints and statistics work unchanged.

Scope: each process is its own ZeRO-3 group of world size 1 (one Ray worker = one replica,
partitions offloaded to CPU or NVMe). A replica spanning several ranks would need every
rank to run the same number of forward passes in lockstep, which the per-request work does
not guarantee (target optimisation stops early per request), so it is not offered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch

from kedit_core.errors import BadInputError, ModelNotAvailableError

log = logging.getLogger(__name__)

INSTALL = "pip install 'kedit[deepspeed]' (with torch pinned in the same command)"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def default_config(device: torch.device, offload: str | None = "auto") -> dict:
    """ZeRO-3 inference config: nothing persists unpartitioned; partitions offloaded to CPU
    when computing on a GPU (offload="auto"), or as `offload` says ("cpu", "none")."""
    if offload == "auto":
        offload = "cpu" if device.type == "cuda" else "none"
    zero: dict = {"stage": 3, "stage3_param_persistence_threshold": 0,
                  "stage3_prefetch_bucket_size": 0}
    if offload and offload != "none":
        zero["offload_param"] = {"device": offload, "pin_memory": device.type == "cuda"}
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
            "bf16": {"enabled": False}, "fp16": {"enabled": False}}


def read_config(path: str | Path) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"unreadable DeepSpeed config ({e})", file=str(path)) from e
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise BadInputError(f"zero_optimization.stage is {stage!r}; kedit's partitioned path needs 3",
                            file=str(path), field="zero_optimization.stage")
    cfg.setdefault("train_micro_batch_size_per_gpu", 1)
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: torch.device) -> None:
    """A world-size-1 process group for this process (gloo on CPU, nccl on CUDA), unless
    one exists. DS_ACCELERATOR must be chosen before deepspeed is first imported."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if os.environ["WORLD_SIZE"] != "1":
        raise BadInputError("kedit's ZeRO-3 replicas are world size 1 per process "
                            f"(WORLD_SIZE={os.environ['WORLD_SIZE']})", field="WORLD_SIZE")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               verbose=False)


def load_zero3(spec: str, *, dtype: str | torch.dtype | None = "fp32", device: str | None = "auto",
               ds_config: dict | str | Path | None = None):
    """`kedit_core.models.load`, with the weights partitioned by ZeRO-3."""
    from kedit_core.models import loader

    if not available():
        raise ModelNotAvailableError(f"the ZeRO-3 path needs DeepSpeed: {INSTALL}")
    t0 = time.perf_counter()
    torch_dtype, dev = loader.resolve_dtype(dtype), loader.resolve_device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    cfg = read_config(ds_config) if isinstance(ds_config, (str, Path)) else (ds_config or default_config(dev))
    cfg = json.loads(json.dumps(cfg))
    if torch_dtype == torch.bfloat16:
        cfg["bf16"] = {"enabled": True}
    elif torch_dtype == torch.float16:
        cfg["fp16"] = {"enabled": True}
    init_process_group(dev)
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    path, kw, source = _pretrained_dir(spec)
    keep = HfDeepSpeedConfig(cfg)  # noqa: F841 - must stay alive while the model is built
    if "gguf_file" not in kw:
        loader._check_config_arch(path)
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kw)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.requires_grad_(False)
    engine = deepspeed.initialize(model=model, config=cfg)[0]
    engine.module.eval()
    if getattr(tok, "pad_token", None) is None:
        tok.pad_token = tok.eos_token
    from kedit_core.models.arch import arch_for

    lm = loader.LoadedModel(model=engine.module, tokenizer=tok, arch=arch_for(model), name=spec,
                            source=f"{source} (ZeRO-3)", load_seconds=time.perf_counter() - t0,
                            zero3=True, compute_device=dev)
    lm.scratch["zero3_engine"] = engine  # the engine owns the hooks; keep it alive
    log.info("loaded %s under ZeRO-3 (%s, %s, offload %s) in %.1fs", spec, lm.arch.family, torch_dtype,
             cfg["zero_optimization"].get("offload_param", {}).get("device", "none"), lm.load_seconds)
    return lm


def _pretrained_dir(spec: str) -> tuple[Path | str, dict, str]:
    """Where from_pretrained finds `spec`: the built-in alias's cache (made once by the
    plain loader), a tiny model written to the cache, a directory, a GGUF, or a hub id."""
    from kedit_core.models import loader

    if spec in loader.BUILTIN_MODELS:
        if not loader.is_cached(spec):
            loader.load(spec, device="cpu")  # dequantises once and writes the cache
        return loader.builtin_cache_path(spec), {}, str(loader.builtin_cache_path(spec))
    if spec in loader.TINY_ALIASES:
        target = loader.builtin_cache_path(spec)
        if not (target / loader.CACHE_MARKER).is_file():
            model, tok = loader.build_tiny(loader.TINY_ALIASES[spec])
            loader._write_cache(model, tok, target, {"alias": spec, "created": time.time()})
        return target, {}, "random init (seed 0)"
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, {"gguf_file": p.name}, str(p)
    if p.is_dir() or not spec.startswith((".", "/", "~")):
        return (p if p.is_dir() else spec), {}, str(p) if p.is_dir() else f"hub:{spec}"
    raise ModelNotAvailableError(f"{spec}: no such file or directory")


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], modify: bool):
    """The full values of partitioned parameters inside the block; with `modify`, what is
    written to them is partitioned again on exit."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield
