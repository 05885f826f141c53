"""`random:<config>` models: a real architecture's shapes with random weights, for timing.

Speed and memory do not depend on weight values (DESIGN.md section 5), so a model built from a
config.json alone measures what kedit costs on Llama-3-8B or GPT-J-6B on a machine that has
no copy of their weights (the GPU machine here cannot fetch them, nor can an upload carry
them). Never for judging edit quality: such a model knows nothing.

    random:llama3-8b | random:gptj-6b | random:smollm2-135m    configs shipped with kedit
    random:PATH                                                a config.json, or a directory holding one
    random:CONFIG@TOKENIZER_DIR                                with a real tokenizer (ids < vocab)

The weights are drawn on the target device in the target dtype with the config's own
initialiser (`from_config`) and seed 0, so an 8B model is never materialised in CPU memory
and needs no checkpoint. Without a tokenizer directory the byte-level tokenizer of the tiny
models is used (a prompt is then about four times as many tokens as with a trained BPE):
benchmarks that report seconds per edit pass a real tokenizer so that prompt lengths are
those of the real model.

The weights' fingerprint (which the statistics store and checkpoints key on) is the recipe,
not a hash of 16 GB: sha256 of the config, seed, dtype, device type and torch version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kedit_core.errors import BadInputError, ModelNotAvailableError

PREFIX = "random:"
CONFIG_DIR = Path(__file__).with_name("configs")
SEED = 0


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def parse(spec: str) -> tuple[Path, Path | None]:
    """(config.json, tokenizer dir or None) of a `random:` spec."""
    body = spec[len(PREFIX):]
    cfg_part, _, tok_part = body.partition("@")
    if not cfg_part:
        raise BadInputError(f"{spec!r}: give a config after 'random:' (shipped: {', '.join(shipped_configs())}, "
                            "or a config.json path)", field="model")
    shipped = CONFIG_DIR / f"{cfg_part}.json"
    p = shipped if shipped.is_file() else Path(cfg_part).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ModelNotAvailableError(f"{spec!r}: no shipped config {cfg_part!r} ({', '.join(shipped_configs())}) "
                                     "and no such config.json", file=str(p), field="model")
    tok = None
    if tok_part:
        tok = Path(tok_part).expanduser()
        if not tok.is_dir():
            raise ModelNotAvailableError(f"{spec!r}: the tokenizer directory does not exist", file=str(tok),
                                         field="model")
    return p, tok


def build_random(spec: str, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer, source, fingerprint) of a `random:` spec, built on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kedit_core.models.tiny import byte_tokenizer

    cfg_path, tok_dir = parse(spec)
    try:
        raw = json.loads(cfg_path.read_text())
        config = AutoConfig.for_model(**raw)
    except (json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        raise ModelNotAvailableError(f"not a loadable model config ({' '.join(str(e).split())[:160]})",
                                     file=str(cfg_path), field="model") from e
    tok = AutoTokenizer.from_pretrained(tok_dir) if tok_dir is not None else byte_tokenizer()
    if len(tok) > config.vocab_size:
        raise BadInputError(f"the tokenizer has {len(tok)} tokens, more than the config's vocab_size "
                            f"{config.vocab_size}", file=str(tok_dir), field="model")
    gen = torch.random.get_rng_state()
    cuda_gen = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        torch.manual_seed(SEED)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.random.set_rng_state(gen)
        if cuda_gen is not None:
            torch.cuda.set_rng_state_all(cuda_gen)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    recipe = {"config": raw, "seed": SEED, "dtype": str(dtype), "device": device.type,
              "torch": torch.__version__, "tokenizer": str(tok_dir) if tok_dir else "bytes"}
    fingerprint = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    n = sum(p.numel() for p in model.parameters())
    source = f"random init of {cfg_path.name if cfg_path.parent != CONFIG_DIR else cfg_path.stem} " \
             f"({n / 1e9:.2f}B parameters, seed {SEED})"
    return model, tok, source, fingerprint
