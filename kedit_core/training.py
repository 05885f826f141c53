"""The training loop shared by the trained editors (MEND; KnowledgeEditor and SERAC plug in
the same way): examples, deterministic global batches, data-parallel gradient averaging,
validation at a cadence, early stopping, and a resumable state.

Data parallelism: step s draws the global batch from (seed, s) alone; worker r of W takes
examples r, r+W, ... of it, sums its examples' losses / B, and the gradients are all-reduced
(summed) over workers before one optimiser step. W workers therefore take the steps one
worker takes on the same global batch (up to float32 summation order). This module imports
no Ray: `pipelines/train_job.py` runs it inside Ray Train's TorchTrainer, which initialises
torch.distributed (gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kedit_core.errors import BadInputError
from kedit_core.types import EditRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training edit: the edit itself, an in-scope paraphrase that the edit must carry
    to, and a locality prompt whose predictions must not move."""

    edit: tuple[str, str]          # (prompt, new target)
    outer: tuple[str, str]         # (paraphrase, new target)
    loc: tuple[str, str]           # (locality prompt, its answer)
    case_id: str = ""


def examples_from(requests: Sequence[EditRequest], source: str = "") -> list[Example]:
    """Examples from edit requests that have a paraphrase and a neighbourhood prompt (the
    first of each); requests without them are refused, naming the record."""
    out = []
    for i, r in enumerate(requests):
        if not r.paraphrase_prompts:
            raise BadInputError("a training record needs a paraphrase (rephrase_prompt / paraphrase_prompts)",
                                file=source or None, record=i, field="paraphrase_prompts")
        if not r.neighborhood:
            raise BadInputError("a training record needs a locality prompt (locality_prompt / neighborhood_prompts)",
                                file=source or None, record=i, field="neighborhood")
        n = r.neighborhood[0]
        out.append(Example((r.text, r.target_new), (r.paraphrase_prompts[0], r.target_new), (n.prompt, n.answer),
                           r.case_id))
    return out


def split(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example], dict]:
    """A reproducible train / validation split by case id (hash order), and its record."""
    key = lambda e: hashlib.sha256(f"{seed}:{e.case_id}:{e.edit}".encode()).hexdigest()  # noqa: E731
    order = sorted(examples, key=key)
    n_val = int(round(len(order) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    rec = {"seed": seed, "val_fraction": val_fraction, "n_train": len(train), "n_val": len(val),
           "val_case_ids_sha256": hashlib.sha256(",".join(sorted(e.case_id for e in val)).encode()).hexdigest()}
    return train, val, rec


def batch_indices(seed: int, step: int, n: int, size: int) -> list[int]:
    """The global batch of a step: consecutive slices of a per-epoch permutation."""
    per_epoch = max(1, n // size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * size:(k + 1) * size].tolist()


def world() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


@dataclass
class LoopConfig:
    steps: int
    batch_size: int = 10           # edits per optimiser step, over all workers (reference: accumulation 10)
    val_every: int = 100
    val_size: int = 50
    patience: int = 20000          # steps without a better validation loss (reference 20k)
    checkpoint_every: int = 50
    seed: int = 0


@dataclass
class LoopState:
    step: int = 0
    best_val: float = math.inf
    best_step: int = 0
    history: list = field(default_factory=list)   # validation rows


def train_loop(editor, train: Sequence[Example], val: Sequence[Example], cfg: LoopConfig, state: LoopState, *,
               on_metrics: Callable[[int, dict], None] = lambda s, m: None,
               on_checkpoint: Callable[[LoopState], None] = lambda st: None,
               progress: bool = False) -> LoopState:
    """Run `editor` (a trainable editor: `step_losses(examples, scale)` back-propagates and
    returns metrics; `clip_and_step()`; `validate(examples)`) from `state.step` to cfg.steps."""
    rank, w = world()
    if cfg.batch_size % w:
        raise BadInputError(f"batch_size {cfg.batch_size} is not divisible by {w} workers", field="batch_size")
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step", disable=not progress or rank != 0)
    while state.step < cfg.steps:
        idx = batch_indices(cfg.seed, state.step, len(train), cfg.batch_size)
        mine = [train[i] for i in idx[rank::w]]
        metrics = editor.train_step(mine, cfg.batch_size)
        state.step += 1
        row = {f"train/{k}": v for k, v in metrics.items()}
        if cfg.val_every and (state.step % cfg.val_every == 0 or state.step == cfg.steps):
            vm = editor.validate(list(val[:cfg.val_size]))
            row.update({f"val/{k}": v for k, v in vm.items()})
            state.history.append({"step": state.step, **vm})
            if vm["loss"] < state.best_val:
                state.best_val, state.best_step = vm["loss"], state.step
        on_metrics(state.step, row)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}")
        stop = state.step - state.best_step >= cfg.patience and state.best_step > 0
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps or stop:
            on_checkpoint(state)
        if stop:
            log.info("early stop at step %d (best validation loss %.4f at step %d)", state.step, state.best_val,
                     state.best_step)
            break
    bar.close()
    return state


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state as flat tensors + JSON (safetensors-friendly)."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = []
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().clone()
                meta["state"][str(pid)].append(k)
    return tensors, meta


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {int(pid): {k: tensors[f"opt.{pid}.{k}"] for k in keys} for pid, keys in meta["state"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
