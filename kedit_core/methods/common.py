"""Steps shared by the locate-and-edit methods: target optimisation at the last edited
layer, keys, and spreading the residual over layers (MEMIT, Meng et al. 2210.07229 Alg. 1).

Large batches. A batch is processed in chunks of requests (`LocalBackend.chunk`, the Ray
pipeline's `zopt_chunk`), and the solve needs only sums over requests: for edited layer l

    delta_l = solve(A_l(K_l K_l^T), K_l R_l^T),   K_l K_l^T = sum_c K_c K_c^T,  K_l R_l^T = sum_c K_c R_c^T

with K_c the keys of chunk c at l and R_c = (z_c - h_L) / (layers left), both read with the
deltas of the layers before l applied. So each chunk returns two float64 sums (d x d and
d x H) and never its keys; the sums are added in chunk order (deterministic). What cannot
be summed in one pass is MEMIT's order: the keys and h_L of layer l depend on the deltas of
the earlier layers, so there is one pass over the chunks per edited layer:

    pass 1      per chunk: target optimisation z_c (the expensive part) and layer l_1's sums
    pass i > 1  per chunk: layer l_i's sums from z_c with delta_{l_1..l_{i-1}} applied

The targets z_c (n x H in all, small next to the sums) are kept by a `ChunkLog`: in memory
here, on disk with checksums in the edit stream (pipelines.checkpoint.BatchPartial), which
also saves the running sums so that a killed batch resumes with only the chunks not done.

Keys at layer l do not depend on the deltas of layers >= l (they are read before layer l's
MLP output projection), so with ascending layers the K_l K_l^T of pass i equals the keys'
moment "after the whole update" that AlphaEdit adds to K_p K_p^T: no extra pass is needed
(`solve_layer` receives it; `key_moments` remains for unsorted layers).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from kedit_core.apply import temporarily_applied
from kedit_core.models.loader import LoadedModel
from kedit_core.types import EditRequest, StatKey, WeightDelta
from kedit_core.zopt import ZOptConfig, ZResult, context_templates, hidden_at_subject, optimize_targets

log = logging.getLogger(__name__)


def mlp_out_stats(lm: LoadedModel, layers: Sequence[int]) -> list[StatKey]:
    """The second moments locate-and-edit methods need: E[kk^T] at the input of each edited
    layer's MLP output projection."""
    return [StatKey(lm.arch.mlp_out_site(l)) for l in layers]


def zopt_config(cfg, layer: int, where: str) -> ZOptConfig:
    lti = None
    if getattr(cfg, "lti", False):
        from kedit_core.zopt import LTIConfig

        lti = LTIConfig(nll_factor=cfg.lti_nll_factor, last_kl_factor=cfg.lti_last_kl_factor,
                        mid_kl_factor=cfg.lti_mid_kl_factor, mid_layer=cfg.lti_mid_layer)
    return ZOptConfig(layer=layer, where=where, steps=cfg.v_num_grad_steps, lr=cfg.v_lr,
                      kl_factor=getattr(cfg, "kl_factor", 0.0), weight_decay=cfg.v_weight_decay,
                      clamp_norm_factor=cfg.clamp_norm_factor, lti=lti,
                      early_stop_loss=getattr(cfg, "v_early_stop_loss", ZOptConfig.early_stop_loss))


def chunk_bounds(n: int, chunk: int, parallel: int = 1) -> list[tuple[int, int]]:
    """[start, end) of the chunks of a batch of n: at least ceil(n / chunk) chunks (0: one)
    and at least `parallel` (so that every worker has one), at most n, near-equal sizes."""
    k = 1 if not chunk else math.ceil(n / chunk)
    k = max(1, min(n, max(k, parallel)))
    b = [round(i * n / k) for i in range(k + 1)]
    return [(b[i], b[i + 1]) for i in range(k)]


class LocalBackend:
    """The per-request work of a locate-and-edit batch, on one model replica: target
    optimisation, and the key moments each layer's closed-form solve needs. Everything it
    returns is a sum over requests (or one row per request), so the Ray pipeline runs the
    same calls on chunks of a batch in `EditWorker` actors and adds the results
    (pipelines/workers.py RayBackend); this class is the single-process case. `chunk`:
    requests per chunk (0: the whole batch); `log`: where the chunks' targets and sums are
    kept (None: in memory)."""

    parallel = 1

    def __init__(self, lm: LoadedModel, chunk: int = 0, log: "ChunkLog | None" = None):
        self.lm, self.chunk, self.log = lm, chunk, log

    def targets(self, requests: Sequence[EditRequest], zcfg: ZOptConfig) -> ZResult:
        return optimize_in_chunks(self.lm, requests, zcfg, context_templates(self.lm), self.chunk)

    def layer_moments(self, requests: Sequence[EditRequest], targets: torch.Tensor, layer: int,
                      last: int, share: float, applied: Sequence[WeightDelta] = ()
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K K^T, K R^T) in float64 for the requests at `layer`, with `applied` on: K (d, n)
        the keys averaged over the context templates, R (H, n) = share * (z - h_last), h_last
        the output of block `last` on the bare prompt."""
        lm = self.lm
        site = lm.arch.mlp_out_site(layer)
        with temporarily_applied(lm, applied):
            keys, _ = hidden_at_subject(lm, requests, context_templates(lm), inputs_of=[site])
            _, cur = hidden_at_subject(lm, requests, ["{}"], outputs_of=[f"blocks.{last}"])
        K = keys[site].T.double()
        R = (targets.double().cpu() - cur[f"blocks.{last}"].double()).T * share
        return K @ K.T, K @ R.T

    def chunk_targets(self, requests: Sequence[EditRequest], zcfg: ZOptConfig, layer: int, last: int,
                      share: float) -> tuple[ZResult, torch.Tensor, torch.Tensor]:
        """The first pass over a chunk: its targets and the first edited layer's sums (no
        delta applied yet)."""
        z = self.targets(requests, zcfg)
        return (z, *self.layer_moments(requests, z.targets, layer, last, share))

    def key_moments(self, requests: Sequence[EditRequest], layers: Sequence[int],
                    applied: Sequence[WeightDelta] = ()) -> dict[int, torch.Tensor]:
        """K K^T (float64) of the requests' keys at each layer with `applied` on."""
        return {l: K @ K.T for l, K in keys_after(self.lm, requests, layers, applied).items()}

    def map(self, method: str, jobs: Iterable[tuple], shared: tuple = ()) -> Iterator:
        """`method(*job, *shared)` for each job, in order (RayBackend: over its workers)."""
        for job in jobs:
            yield getattr(self, method)(*job, *shared)


class ChunkLog:
    """What a batch keeps between its passes: the chunk layout, each chunk's targets, and the
    running sums of the pass in progress. In memory (a batch that dies is lost); the edit
    stream's subclass keeps them on disk (pipelines.checkpoint.BatchPartial) and resumes.

    start(bounds) -> bounds      the layout to use (a resumed batch: the saved one)
    has_targets(j) / get_targets(j) / get_losses(j) / put_targets(j, z)
    get_sums(i) -> (chunks done, KK, KR) or None   put_sums(i, done, KK, KR)
    (i: the index of the edited layer in cfg.layers; done == number of chunks: complete)
    """

    def __init__(self):
        self.bounds: list[tuple[int, int]] | None = None
        self._z: dict[int, ZResult] = {}

    def start(self, bounds: list[tuple[int, int]]) -> list[tuple[int, int]]:
        self.bounds = bounds
        return bounds

    def has_targets(self, j: int) -> bool:
        return j in self._z

    def get_targets(self, j: int) -> ZResult | None:
        return self._z.get(j)

    def get_losses(self, j: int) -> tuple[list[float], list[int]]:
        return self._z[j].losses, self._z[j].steps

    def put_targets(self, j: int, z: ZResult) -> None:
        self._z[j] = z

    def get_sums(self, i: int):
        return None

    def put_sums(self, i: int, done: int, KK: torch.Tensor, KR: torch.Tensor) -> None:
        pass

    def all_targets(self) -> torch.Tensor | None:
        """(n, H) of every chunk, when they are held in memory (else None)."""
        if self.bounds is None or len(self._z) != len(self.bounds):
            return None
        return torch.cat([self._z[j].targets.detach().cpu() for j in range(len(self.bounds))])


def spread_over_layers(backend: LocalBackend, requests: Sequence[EditRequest], cfg,
                       solve_layer: Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor],
                       ) -> tuple[list[WeightDelta], dict]:
    """MEMIT's outer loop over chunks of the batch (module docstring). Targets z_i at the last
    edited layer L; then for each edited layer l (in order) the sums K K^T and K R^T of the
    keys K (d, n) at l (averaged over context templates) and the residual
    R = (z - h_L) / (layers left) (h_L from the bare prompt, with the earlier layers'
    updates applied); `solve_layer(i, l, KK, KR)` returns the delta (out, in). The model is
    left unchanged; the deltas and info (z_loss, z_steps per request; targets when kept in
    memory) are returned."""
    L = max(cfg.layers)
    zcfg = zopt_config(cfg, L, "block")
    clog = getattr(backend, "log", None) or ChunkLog()
    bounds = clog.start(chunk_bounds(len(requests), getattr(backend, "chunk", 0), getattr(backend, "parallel", 1)))
    chunks = [list(requests[a:b]) for a, b in bounds]
    nl = len(cfg.layers)
    deltas: list[WeightDelta] = []
    reset = False
    for i, layer in enumerate(cfg.layers):
        share = 1.0 / (nl - i)
        saved = clog.get_sums(i)
        if saved is not None and i == 0 and not all(clog.has_targets(j) for j in range(saved[0])):
            log.warning("chunk targets behind the saved sums of the first pass are missing: redoing its sums")
            saved, reset = None, True
        if saved is not None and i > 0 and reset:
            saved = None
        done, KK, KR = saved if saved is not None else (0, None, None)
        todo = range(done, len(chunks))
        log.info("pass %d of %d (layer %d): %d chunks of ~%d requests%s", i + 1, nl, layer, len(chunks),
                 math.ceil(len(requests) / len(chunks)), f", {done} done before" if done else "")
        if i == 0:   # chunks whose targets survived (a resumed batch) need only their sums
            have = [clog.has_targets(j) for j in todo]
            if done or any(have):
                log.info("resuming the batch's first pass: %d of %d chunks summed, %d more with targets",
                         done, len(chunks), sum(have))
            results = _map_mixed(backend, [
                ("layer_moments", (lambda j=j: (chunks[j], clog.get_targets(j).targets, layer, L, share)))
                if h else ("chunk_targets", (lambda j=j: (chunks[j], zcfg, layer, L, share)))
                for j, h in zip(todo, have)])
        else:
            results = backend.map("layer_moments", ((chunks[j], clog.get_targets(j).targets) for j in todo),
                                  shared=(layer, L, share, _shared(backend, deltas)))
        for j, res in zip(todo, _progress(results, len(todo), f"layer {layer}")):
            if i == 0 and len(res) == 3:
                z, kk, kr = res
                clog.put_targets(j, z)
            else:
                kk, kr = res
            KK = kk if KK is None else KK + kk
            KR = kr if KR is None else KR + kr
            clog.put_sums(i, j + 1, KK, KR)
        delta = solve_layer(i, layer, KK, KR).float()
        del KK, KR
        deltas.append(WeightDelta(f"blocks.{layer}.mlp.out", dense=delta))  # the stable site name
    zs = [clog.get_losses(j) for j in range(len(chunks))]
    info = {"z_loss": [x for z in zs for x in z[0]], "z_steps": [x for z in zs for x in z[1]],
            "chunks": len(chunks)}
    targets = clog.all_targets()
    if targets is not None:
        info["targets"] = targets
    return deltas, info


def _progress(it, total: int, what: str):
    """A progress bar over the chunks of a pass, for batches of more than a few chunks."""
    if total < 4:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=f"chunks, {what}", unit="chunk", leave=False)


def _shared(backend, deltas):
    """The earlier layers' deltas, once per pass (RayBackend puts them in the object store)."""
    share = getattr(backend, "share", None)
    return share(list(deltas)) if share is not None else list(deltas)


def _map_mixed(backend, jobs: list[tuple[str, Callable[[], tuple]]]) -> Iterator:
    """backend.map over jobs of two kinds, in order (runs of one kind at a time); each job's
    arguments are built when it is submitted."""
    k = 0
    while k < len(jobs):
        m, run = jobs[k][0], []
        while k < len(jobs) and jobs[k][0] == m:
            run.append(jobs[k][1])
            k += 1
        yield from backend.map(m, (make() for make in run))


def optimize_in_chunks(lm: LoadedModel, requests: Sequence[EditRequest], zcfg: ZOptConfig,
                       templates, chunk: int) -> ZResult:
    """optimize_targets over chunks of `chunk` requests (0: all together)."""
    if not chunk or chunk >= len(requests):
        return optimize_targets(lm, requests, zcfg, templates)
    parts = [optimize_targets(lm, requests[i:i + chunk], zcfg, templates)
             for i in range(0, len(requests), chunk)]
    return ZResult(targets=torch.cat([p.targets for p in parts]), init=torch.cat([p.init for p in parts]),
                   losses=[x for p in parts for x in p.losses], steps=[x for p in parts for x in p.steps])


def keys_after(lm: LoadedModel, requests: Sequence[EditRequest], layers: Sequence[int],
               deltas: Sequence[WeightDelta]) -> dict[int, torch.Tensor]:
    """Keys (d, n) of the requests at each layer with `deltas` applied."""
    templates = context_templates(lm)
    sites = [lm.arch.mlp_out_site(l) for l in layers]
    with temporarily_applied(lm, deltas):
        keys, _ = hidden_at_subject(lm, requests, templates, inputs_of=sites)
    return {l: keys[s].T.double() for l, s in zip(layers, sites)}
