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
    true: str | None = None        # the fact's old answer, where known


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
                           r.case_id, r.target_true))
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
    max_seconds: float = 0.0       # > 0: stop (checkpoint, then the artifact) after this much training time


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
    import time

    t0 = time.monotonic()
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
        if cfg.max_seconds > 0:      # every worker stops at the same step (the slowest decides)
            late = all_reduce_(torch.tensor([float(time.monotonic() - t0 > cfg.max_seconds)]))
            if float(late) > 0 and not stop:
                log.info("time budget of %.0f s reached at step %d", cfg.max_seconds, state.step)
                stop = True
        if stop and (not state.history or state.history[-1]["step"] != state.step):   # validate where it stops
            vm = editor.validate(list(val[:cfg.val_size]))
            state.history.append({"step": state.step, **vm})
            on_metrics(state.step, {f"val/{k}": v for k, v in vm.items()})
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps or stop:
            on_checkpoint(state)
        if stop:
            log.info("stop at step %d (best validation loss %.4f at step %d)", state.step, state.best_val,
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


class EditorTrainer:
    """What the weight-updating trained editors (MEND, KnowledgeEditor) share: the frozen base
    model, the edited forward pass W + delta through `torch.func.functional_call`
    (differentiable in the editor's parameters), the locality KL, metric reduction over
    workers, gradient all-reduce + clip + step, and the state / artifact tensors. A subclass
    sets `self.net`, `self.opt`, `self.sites` and implements `train_step` / `validate`."""

    method = ""

    def __init__(self, lm, cfg, sites: Sequence[str]):
        if lm.zero3:
            raise BadInputError("trained editors train on a full (not ZeRO-3 partitioned) model", field="zero3")
        self.lm, self.cfg, self.sites = lm, cfg, list(sites)
        for p in lm.model.parameters():
            p.requires_grad_(False)
        lm.model.eval()
        self.names = {s: lm.arch.site_path(s) + ".weight" for s in self.sites}

    def config(self) -> dict:
        return {**self.cfg.to_dict(), "sites": self.sites}

    def post_logits(self, deltas: dict, ids, mask) -> torch.Tensor:
        from torch.func import functional_call

        arch, model = self.lm.arch, self.lm.model
        params = {self.names[s]: arch.weight(model, s) + arch.from_out_in(d).to(arch.weight(model, s).dtype)
                  for s, d in deltas.items()}
        return functional_call(model, params, args=(), kwargs=dict(input_ids=ids, attention_mask=mask,
                                                                     use_cache=False)).logits

    def outer_loss(self, deltas: dict, pair: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
        from kedit_core.methods.mend.method import encode, token_nll

        ids, mask, lab = encode(self.lm, [pair])
        return token_nll(self.post_logits(deltas, ids, mask), lab)

    def locality(self, deltas: dict, pair: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
        """KL(base || edited) over every token of the locality sequence (the reference's
        `kl_loc_loss` with the attention mask) and the share of unchanged argmax tokens."""
        from kedit_core.methods.mend.method import encode

        ids, mask, _ = encode(self.lm, [pair])
        with torch.no_grad():
            base = self.lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        post = self.post_logits(deltas, ids, mask).float()
        kl_tok = (base.softmax(-1) * (base.log_softmax(-1) - post.log_softmax(-1))).sum(-1)
        m = mask.float()
        agree = ((base.argmax(-1) == post.argmax(-1)).float() * m).sum() / m.sum()
        return (kl_tok * m).sum() / m.sum(), agree

    @staticmethod
    def reduce(rows: list[dict], total: int) -> dict:
        keys = sorted({k for r in rows for k in r})
        t = torch.tensor([sum(r.get(k, 0.0) for r in rows) for k in keys], dtype=torch.float64)
        all_reduce_(t)
        return {k: float(v) / max(1, total) for k, v in zip(keys, t)}

    def step(self, params: list, clip: float) -> float:
        """All-reduce (sum) the gradients over workers, clip, step."""
        if world()[1] > 1:
            for p in params:
                if p.grad is not None:
                    all_reduce_(p.grad)
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=True)
        self.opt.step()
        return float(gnorm)

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, meta: dict) -> None:
        pass

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        ot, om = optimizer_tensors(self.opt)
        return ({**{f"net.{k}": v.detach().cpu().clone() for k, v in self.net.state_dict().items()}, **ot},
                {"opt": om, "extra": self.extra_state()})

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        load_optimizer_tensors(self.opt, {k: v for k, v in tensors.items() if k.startswith("opt.")}, meta["opt"])
        self.load_extra_state(meta.get("extra", {}))

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
