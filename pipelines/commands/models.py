"""`kedit models`: the built-in aliases, whether their package is installed and cached."""

from __future__ import annotations

import importlib.util


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list built-in model aliases and their cache state")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from kedit_core.models import BUILTIN_MODELS, TINY_ALIASES, builtin_cache_path, is_cached
    from kedit_core.models.arch import supported_architectures

    t = Table(title="kedit models")
    for col in ("alias", "model", "package", "cache"):
        t.add_column(col)
    for alias, m in BUILTIN_MODELS.items():
        installed = importlib.util.find_spec(m.module) is not None
        pkg = f"{m.package}: " + ("installed" if installed else f"missing ({m.pip})")
        cache = f"cached: {builtin_cache_path(alias)}" if is_cached(alias) else "not cached (first load dequantises)"
        t.add_row(alias, f"{m.description}; {m.licence}", pkg, cache)
    for alias in TINY_ALIASES:
        t.add_row(alias, "tiny random model for unit tests (seed 0)", "built in", "-")
    from kedit_core.models.random_init import shipped_configs
    for name in shipped_configs():
        t.add_row(f"random:{name}", "real shapes, random weights (seed 0): for timing only", "built in", "-")
    Console().print(t)
    print("Also accepted: a hub id, a local model directory, a .gguf file, or random:CONFIG.json[@TOKENIZER_DIR].")
    print("Supported architectures:", ", ".join(supported_architectures()))
    return 0
