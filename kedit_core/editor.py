"""The Python API: load a model, prepare a method (statistics from the store), edit in
sequential batches, evaluate, save, revert.

    from kedit_core import Editor, load_requests
    ed = Editor(model="smollm2-135m", method="alphaedit")
    ed.edit(load_requests()[:100], batch_size=10)
    ed.evaluate(load_requests()[:100])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kedit_core.apply import DeltaApplier, read_weights, save_deltas, write_weights
from kedit_core.edited import ModelView
from kedit_core.evaluate import HeldOut, baseline_predictions, evaluate_requests, heldout_texts, perplexity
from kedit_core.memory import EditMemory
from kedit_core.methods import get_method, make_config
from kedit_core.models import LoadedModel, load
from kedit_core.stats import StatsStore, StatsView, open_corpus
from kedit_core.types import EditRequest

log = logging.getLogger(__name__)


class Editor:
    def __init__(self, model: str | LoadedModel = "smollm2-135m", method: str = "alphaedit",
                 stats_corpus: str | None = None, *, device: str = "auto", dtype: str = "fp32",
                 stats_dir: str | None = None, show_progress: bool = True, zero3: bool = False,
                 ds_config=None, perplexity_corpus: str | None = None, encoder: str | None = None,
                 memory_index: str = "exact", **overrides):
        self.lm = model if isinstance(model, LoadedModel) else load(model, dtype=dtype, device=device,
                                                                      zero3=zero3, ds_config=ds_config)
        self.lm.fingerprint()      # memoised now, on the weights as loaded (save() records it after edits)
        self.method = get_method(method)
        self.cfg = make_config(self.method.config_cls, self.lm, overrides)
        self.corpus = open_corpus(stats_corpus)
        self.perplexity_corpus = perplexity_corpus
        self._heldout: dict[int, HeldOut] = {}
        self.store = StatsStore(stats_dir)
        sites = [k.site for k in self.method.required_stats(self.cfg, self.lm)]
        kw = dict(n_samples=getattr(self.cfg, "mom2_n_samples", None), max_length=getattr(self.cfg, "mom2_max_length", 128))
        moments, specs = {}, {}
        if sites:
            moments = self.store.get_or_compute(self.lm, sites, self.corpus, show_progress=show_progress, **kw)
            specs = self.store.specs(self.lm, sites, self.corpus, **kw)
        self.stats = StatsView(moments, self.store, specs)
        self.state = self.method.prepare(self.lm, self.cfg, self.stats)
        self._initial_state = self.state
        # The memory methods' retrieval memory (kedit_core.memory); None for the others.
        self._memory_args = dict(index=memory_index, encoder_spec=encoder)
        self.memory = EditMemory(**self._memory_args) if "encoder" in self.method.info.needs else None
        self.applier = DeltaApplier(self.lm)
        self.history: list[dict] = []
        self._baseline: dict | None = None
        self.show_progress = show_progress

    @property
    def model(self):
        """The edited model as evaluation and generation see it (kedit_core.edited): the base
        model with its deltas, wrapped by whatever the method adds (a prompt rewriter, a
        router...)."""
        return self.method.wrap(ModelView(self.lm), self.state, self.memory)

    @property
    def n_edits(self) -> int:
        return sum(h["n"] for h in self.history)

    def edit(self, requests: Sequence[EditRequest], batch_size: int = 10) -> list[dict]:
        """Apply `requests` in sequential batches; returns one record per batch."""
        from tqdm.auto import tqdm

        if self._baseline is None:  # unedited predictions, for locality later
            self._baseline = {}
        out = []
        batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
        for batch in tqdm(batches, desc=f"{self.method.name} batches", disable=not self.show_progress):
            out.append(self.history[-1] if self.edit_batch(batch) else None)
        return out

    def edit_batch(self, batch: Sequence[EditRequest], backend=None) -> dict:
        """One sequential step: compute the batch's deltas (per-request work on `backend`,
        the local model when None), apply them, advance the state."""
        if self._baseline is None:
            self._baseline = {}
        with torch.no_grad():
            self._baseline.update(baseline_predictions_unedited(self, batch))
        t0 = time.perf_counter()
        result, self.state = self.method.compute(self.lm, batch, self.state, backend, memory=self.memory)
        self.applier.apply(result.deltas)
        if result.memory:
            if self.memory is None:
                raise RuntimeError(f"{self.method.name} returned memory entries but declares no encoder")
            self.memory.add(result.memory)
        dt = time.perf_counter() - t0
        rec = {"n": len(batch), "seconds": dt, "seconds_per_edit": dt / len(batch),
               "delta_norms": {d.site: float(d.matrix().norm()) for d in result.deltas},
               "z_loss_mean": float(sum(result.info.get("z_loss", [0])) / max(len(batch), 1)),
               "memory_size": len(self.memory) if self.memory is not None else 0,
               # the method's own scalar figures (e.g. AnyEdit's targets_s / targets_reused)
               "method_info": {k: v for k, v in result.info.items() if isinstance(v, (bool, int, float, str))},
               "deltas": result.deltas, "memory": result.memory}
        self.history.append({k: v for k, v in rec.items() if k not in ("deltas", "memory")})
        log.info("batch of %d edited in %.1fs (%.2f s/edit); %d edits so far", len(batch), dt,
                 dt / len(batch), self.n_edits)
        return rec

    def evaluate(self, requests: Sequence[EditRequest], *, fluency: bool = False,
                 perplexity_texts: int | None = 0, generation: bool = True) -> dict[str, float]:
        """Metrics over `requests` on the current (edited) model; `perplexity_texts` > 0 adds
        perplexity on that many held-out texts (`heldout`: never texts the statistics used)."""
        m = evaluate_requests(self.model, requests, baseline=self._baseline or None, fluency=fluency,
                              generation=generation)
        if perplexity_texts:
            m["perplexity"] = perplexity(self.lm, self.heldout(perplexity_texts).texts, n_texts=perplexity_texts)
        return m

    def heldout(self, n_texts: int) -> HeldOut:
        """The held-out perplexity texts (chosen once per size; see evaluate.perplexity).
        A method without statistics skips as many texts as MEMIT's statistics would on this
        model, so that every method of a comparison (kedit bench) is scored on the same texts."""
        if n_texts not in self._heldout:
            if self.method.required_stats(self.cfg, self.lm):
                used = getattr(self.cfg, "mom2_n_samples", 0)
            else:
                from kedit_core.methods import get_method

                memit = get_method("memit").config_cls
                used = memit.defaults_for(self.lm).get("mom2_n_samples", memit.mom2_n_samples)
            self._heldout[n_texts] = heldout_texts(self.lm, self.corpus, used, n_texts,
                                                   perplexity_corpus=self.perplexity_corpus)
        return self._heldout[n_texts]

    def save(self, directory: str | Path, *, export_model: bool = True) -> Path:
        """deltas.safetensors + config.json (cumulative deltas), and the edited model in HF
        format under model/."""
        directory = Path(directory)
        cfg = {"model": self.lm.name, "model_hash": self.lm.fingerprint(), "method": self.method.name,
               "config": self.cfg.to_dict(), "n_edits": self.n_edits, "corpus": self.corpus.id}
        save_deltas(directory, self.applier.cumulative(), cfg)
        if export_model:
            save_model(self.lm, directory / "model")
        return directory

    def revert(self) -> None:
        """Restore the original weights bit-exactly and forget the sequential state and memory."""
        self.applier.revert()
        self.state = self._initial_state
        if self.memory is not None:
            self.memory = EditMemory(**self._memory_args)
        self.history.clear()

    # ---------------------------------------------------------------- sequential state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The method's sequential state and the memory as safetensors-ready tensors + JSON
        (checkpoints store both; `load_state_dict` restores them bit-identically)."""
        tensors, meta = self.method.state_dict(self.state)
        out = {"method": meta}
        if self.memory is not None:
            mt, mm = self.memory.state_dict()
            clash = set(mt) & set(tensors)
            if clash:
                raise RuntimeError(f"state tensor names clash: {sorted(clash)}")
            tensors = {**tensors, **mt}
            out["memory"] = mm
        return tensors, out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        mem = {k: v for k, v in tensors.items() if k.startswith("memory.")}
        rest = {k: v for k, v in tensors.items() if not k.startswith("memory.")}
        if rest or meta.get("method"):
            self.state = self.method.load_state_dict(self.state, rest, meta.get("method", {}))
        if self.memory is not None and "memory" in meta:
            self.memory.load_state_dict(mem, meta["memory"])


def save_model(lm: LoadedModel, directory: str | Path) -> None:
    """The model and tokenizer in HF format (a ZeRO-3 model's parameters gathered one at a
    time), built in a temp directory and renamed into place (kedit_core.io.atomic_dir): a
    reader finds a complete export or none."""
    from kedit_core.io import atomic_dir
    from kedit_core.models.loader import iter_full_state

    state = dict(iter_full_state(lm)) if lm.zero3 else None
    with atomic_dir(directory) as tmp:
        lm.model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        lm.tokenizer.save_pretrained(tmp)


def baseline_predictions_unedited(ed: Editor, batch: Sequence[EditRequest]) -> dict:
    """Greedy neighbourhood predictions with every edit so far reverted (the unedited model)."""
    if not ed.applier.originals:
        return baseline_predictions(ed.lm, batch)
    # Swap the original weights in, predict, swap the edited ones back.
    edited = read_weights(ed.lm, ed.applier.originals)
    try:
        write_weights(ed.lm, ed.applier.originals)
        return baseline_predictions(ed.lm, batch)
    finally:
        write_weights(ed.lm, edited)
