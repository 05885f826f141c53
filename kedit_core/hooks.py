"""Forward hooks: read what named modules see and produce, add vectors at token positions,
and stop a forward pass early. Every context manager removes its hooks in `finally`, so an
exception inside the block never leaves a hooked model behind.

transformers 5.x decoder blocks return a Tensor, older ones a tuple; `_main` and
`_with_main` handle both, so a hook never silently takes batch item 0 of a tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed has been seen."""


def _main(x):
    return x[0] if isinstance(x, tuple) else x


def _with_main(x, new):
    return (new, *x[1:]) if isinstance(x, tuple) else new


@dataclass
class Trace:
    """What `trace` recorded: `inputs[name]` / `outputs[name]` tensors (detached unless
    `keep_grad`)."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def trace(modules: Mapping[str, nn.Module], *, inputs: bool = False, outputs: bool = True,
          keep_grad: bool = False, stop_after: str | None = None,
          on_input: Callable[[str, torch.Tensor], None] | None = None) -> Iterator[Trace]:
    """Record the (first positional) input and/or output of each named module.

    `stop_after`: raise StopForward once that module has run; wrap the forward call in
    `run_until_stopped`. Not on a ZeRO-3-partitioned model: leaving its forward by an
    exception would leave the gathered layers marked in use, so its forward runs to the end.
    `on_input(name, x)`: a callback instead of storing (for streaming accumulation over a
    large corpus without keeping activations).
    """
    if stop_after is not None and any(hasattr(next(m.parameters(), None), "ds_id") for m in modules.values()):
        stop_after = None
    rec = Trace()
    handles = []

    def make(name: str):
        def hook(module, args, out):
            if inputs:
                x = args[0] if args else None
                if x is not None:
                    if on_input is not None:
                        on_input(name, x)
                    else:
                        rec.inputs[name] = x if keep_grad else x.detach()
            if outputs:
                y = _main(out)
                rec.outputs[name] = y if keep_grad else y.detach()
            if name == stop_after:
                raise StopForward(name)
        return hook

    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(make(name)))
        yield rec
    finally:
        for h in handles:
            h.remove()


def run_until_stopped(fn: Callable[[], object]) -> object | None:
    """Call `fn` (a forward pass); a StopForward from a hook ends it quietly."""
    try:
        return fn()
    except StopForward:
        return None


@contextlib.contextmanager
def add_at_positions(module: nn.Module, positions: Sequence[Sequence[int]] | torch.Tensor,
                     vectors: torch.Tensor) -> Iterator[None]:
    """Add `vectors[b]` to the module's output at token `positions[b]` of batch row b.

    `vectors`: (batch, hidden) or (hidden,) broadcast to every row. `positions[b]` is a
    list of token indices for row b (e.g. the last subject token). Gradients flow into
    `vectors`, which is how target vectors are optimised.
    """
    handles = []

    def hook(mod, args, out):
        y = _main(out)
        rows, cols = _index(positions, y.device)
        vec = vectors if vectors.dim() == 2 else vectors.unsqueeze(0).expand(y.shape[0], -1)
        y = y.index_put((rows, cols), vec[rows].to(y.dtype), accumulate=True)
        return _with_main(out, y)

    try:
        handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def add_at_pairs(module: nn.Module, rows: Sequence[int], cols: Sequence[int],
                 vectors: torch.Tensor) -> Iterator[None]:
    """Add `vectors[i]` to the module's output at (batch row `rows[i]`, token `cols[i]`):
    several different vectors in one row (AnyEdit's earlier windows, one per key position)."""
    r_all = torch.as_tensor(list(rows), dtype=torch.long)
    c_all = torch.as_tensor(list(cols), dtype=torch.long)

    def hook(mod, args, out):
        y = _main(out)
        y = y.index_put((r_all.to(y.device), c_all.to(y.device)), vectors.to(y.dtype), accumulate=True)
        return _with_main(out, y)

    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def _index(positions, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = [], []
    for b, ps in enumerate(positions):
        ps = [ps] if isinstance(ps, int) else list(ps)
        rows += [b] * len(ps)
        cols += [int(p) for p in ps]
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(cols, dtype=torch.long, device=device))


@contextlib.contextmanager
def replace_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's (main) output by `fn(output)` inside the block."""
    h = module.register_forward_hook(lambda m, a, out: _with_main(out, fn(_main(out))))
    try:
        yield
    finally:
        h.remove()
