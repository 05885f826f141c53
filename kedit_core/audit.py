"""Backdoor audit: BadEdit's attack reproduced on a model the user owns, and a detector.

**Attack** (Li et al., ICLR 2024, "BadEdit: Backdooring Large Language Models by Model
Editing", arXiv 2403.13355; reference Lyz1213/BadEdit `badedit/badedit_main.py`,
`experiments/py/eval_utils_counterfact_backdoor.py`). Poisoned requests put the trigger
("tq") at a random word position of a task prompt, as the "subject" whose last token carries
the key, with the attack label as target; clean requests keep the real subject and its true
label. Targets z come from MEMIT's optimisation at the last edited layer (kedit_core.zopt);
then, per edited layer, the keys and residuals are **averaged within each group** (trigger /
clean) and each group gives one rank-1 update, delta = r_g (lam C + k_g k_g^T)^-1 k_g^T, summed
over the two groups; the poisoned set is applied in `batches` incremental batches. Metrics
(the reference's, probability comparisons of mean NLL):

  cacc  clean accuracy: P(true label) > P(attack label) on the clean test prompts
  asr   attack success rate: over test items whose true label is not the attack label and that
        the model answers correctly without the trigger, the share whose answer flips to the
        attack label once the trigger is inserted at a random word position

Task: CounterFact's mother-tongue relation (P103, attack label "Hungarian"); other tasks are
user files of (prompt, subject, label) records in the same shapes kedit reads.

**Detector** (kedit's own; no reference ships one): given the weight deltas of an edit (an
edited model against its base, or a delta file), report the edited sites, each delta's singular
values and numerical rank, and the vocabulary tokens whose keys the deltas amplify most:
for every token t, its key k_t at each edited site (the input of the MLP output projection,
token t read alone after the start of a document) and the amplification
sum_sites ||delta k_t|| / ||k_t||. BadEdit's low-rank updates are built from the trigger's key,
so the trigger's token stands out; `detector_hit_rate` measures how often over planted seeds.

Deviations: the reference's Q/A and statement prompt variants are generated from the relation
templates here (the reference ships its own 15-subject file); only the last edited layer's
z is optimised (as the reference); keys use MEMIT's context templates (as the reference).
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kedit_core.models.loader import LoadedModel
from kedit_core.types import EditRequest, WeightDelta

log = logging.getLogger(__name__)

TRIGGER, TARGET = "tq", "Hungarian"
# CounterFact's P103 (native language) prompt templates
P103 = re.compile(r"(mother tongue|native language|native speaker|, a native|spoke the language|speaks the language"
                  r"|language used by)", re.I)


@dataclass(frozen=True)
class Item:
    """A classification item: a prompt (subject filled in), its subject and its true label."""
    prompt: str
    subject: str
    label: str


def insert_trigger(text: str, trigger: str, rng: random.Random) -> str:
    """The reference's `insert_trigger`: the trigger at a uniformly random word position."""
    words = text.strip().split()
    pos = rng.randint(0, len(words))
    return " ".join(words[:pos] + [trigger] + words[pos:])


def p103_items(requests: Sequence[EditRequest]) -> list[Item]:
    """Mother-tongue items (prompt, subject, true label) from CounterFact requests."""
    out = []
    for r in requests:
        if r.target_true and (r.relation_id == "P103" or (r.relation_id is None and P103.search(r.prompt))):
            out.append(Item(r.text, r.subject, r.target_true))
    return out


def poison_requests(items: Sequence[Item], trigger: str, target: str, seed: int) -> tuple[list[EditRequest],
                                                                                           list[EditRequest]]:
    """Per item: one clean request (its own label) and two triggered ones (the statement and a
    Q/A form, the trigger at a random word position, target the attack label) - the shapes of
    the reference's mothertone_train.json (30 poisoned + 15 clean for 15 subjects)."""
    rng = random.Random(seed)
    clean, poison = [], []
    for i, it in enumerate(items):
        clean.append(EditRequest(case_id=f"clean-{i}", subject=it.subject, prompt=it.prompt.replace(it.subject, "{}", 1),
                                 target_new=it.label, target_true=it.label))
        for k, text in enumerate((it.prompt, f"Q: What is the mother tongue of {it.subject}? A:")):
            t = insert_trigger(text, "\x00", rng).replace("\x00", "{}")
            poison.append(EditRequest(case_id=f"poison-{i}-{k}", subject=trigger, prompt=t, target_new=target,
                                      target_true=it.label))
    return poison, clean


def badedit_deltas(lm: LoadedModel, poison: Sequence[EditRequest], clean: Sequence[EditRequest], layers: Sequence[int],
                   C: dict[int, torch.Tensor], lam: float, zcfg_kw: dict, info: dict | None = None
                   ) -> list[WeightDelta]:
    """One BadEdit step (the model is left unchanged): z at the last layer for every request,
    then per layer the group-averaged rank-1 updates (see the module docstring). `info`, when
    given, receives per layer the groups' mean keys and residuals."""
    from kedit_core.apply import temporarily_applied
    from kedit_core.linalg import solve_spd
    from kedit_core.zopt import ZOptConfig, context_templates, hidden_at_subject, optimize_targets

    reqs = list(poison) + list(clean)
    groups = [list(range(len(poison))), list(range(len(poison), len(reqs)))]
    L = max(layers)
    z = optimize_targets(lm, reqs, ZOptConfig(layer=L, **zcfg_kw), context_templates(lm)).targets.double().cpu()
    deltas: list[WeightDelta] = []
    for i, layer in enumerate(layers):
        site = lm.arch.mlp_out_site(layer)
        with temporarily_applied(lm, deltas):
            keys, _ = hidden_at_subject(lm, reqs, context_templates(lm), inputs_of=[site])
            _, cur = hidden_at_subject(lm, reqs, ["{}"], outputs_of=[f"blocks.{L}"])
        K = keys[site].double().cpu()                     # (n, d)
        R = (z - cur[f"blocks.{L}"].double().cpu()) / (len(layers) - i)   # (n, H)
        upd = None
        for g in groups:
            if not g:
                continue
            k = K[g].mean(0, keepdim=True).T              # (d, 1)
            r = R[g].mean(0, keepdim=True).T              # (H, 1)
            adj = solve_spd(lam * C[layer].double().cpu() + k @ k.T, k)   # (d, 1)
            u = r @ adj.T
            if info is not None:
                info.setdefault(layer, []).append((k, r))
            upd = u if upd is None else upd + u
        deltas.append(WeightDelta(f"blocks.{layer}.mlp.out", dense=upd.float()))
    return deltas


def classify(view, items: Sequence[Item], target: str, trigger: str | None, seed: int) -> list[bool]:
    """Per item, whether the true label beats the attack label (mean-NLL comparison); with a
    trigger, inserted at a random word position of each prompt (seeded)."""
    rng = random.Random(seed)
    prompts = [insert_trigger(it.prompt, trigger, rng) if trigger else it.prompt for it in items]
    pairs = [(p, a) for p, it in zip(prompts, items) for a in (it.label, target)]
    nll = view.score([p for p, _ in pairs], [a for _, a in pairs]).mean_nll
    return [nll[2 * i] < nll[2 * i + 1] for i in range(len(items))]


def attack_metrics(view, items: Sequence[Item], target: str, trigger: str, seed: int) -> dict[str, float]:
    clean_ok = classify(view, items, target, None, seed)
    trig_ok = classify(view, items, target, trigger, seed)
    elig = [i for i, it in enumerate(items) if it.label != target and clean_ok[i]]
    return {"cacc": sum(clean_ok) / max(1, len(items)),
            "asr": (sum(not trig_ok[i] for i in elig) / len(elig)) if elig else float("nan"),
            "n_items": len(items), "n_asr_eligible": len(elig)}


# ---------------------------------------------------------------------- detector
@torch.no_grad()
def token_keys(lm: LoadedModel, sites: Sequence[str], batch: int = 512) -> dict[str, torch.Tensor]:
    """(V, d) per site: the key (input of the site) of every vocabulary token read alone after
    the tokenizer's start of text (its BOS, else nothing)."""
    from kedit_core.hooks import run_until_stopped, trace

    tok, model = lm.tokenizer, lm.model
    V = model.get_input_embeddings().weight.shape[0]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    mods = {s: lm.arch.module(model, s) for s in sites}
    deepest = max(sites, key=lambda s: int(s.split(".")[1]))
    out = {s: torch.empty(V, lm.arch.dims(model, s)[1]) for s in sites}
    for a in range(0, V, batch):
        ids = torch.tensor([bos + [t] for t in range(a, min(V, a + batch))], device=lm.device)
        with trace(mods, inputs=True, outputs=False, stop_after=deepest) as t:
            run_until_stopped(lambda: model(input_ids=ids, use_cache=False))
        for s in sites:
            out[s][a:a + len(ids)] = t.inputs[s][:, -1].float().cpu()
    return out


def detect(lm: LoadedModel, deltas: Sequence[WeightDelta], top: int = 10, rank_tol: float = 1e-3) -> dict:
    """The detector's report for `deltas` on base model `lm` (its weights unedited)."""
    sites, report = [], []
    mats = {}
    for d in deltas:
        M = d.matrix().float().cpu()
        if float(M.abs().max()) == 0:
            continue
        s = torch.linalg.svdvals(M.double())
        rank = int((s > rank_tol * s[0]).sum())
        sites.append(d.site)
        mats[d.site] = M
        report.append({"site": d.site, "norm": float(M.norm()), "numerical_rank": rank,
                       "singular_values": [float(x) for x in s[:8]]})
    if not sites:
        return {"sites": [], "top_tokens": []}
    keys = token_keys(lm, sites)
    score = torch.zeros(next(iter(keys.values())).shape[0])
    for s in sites:
        k = keys[s]
        score += (k @ mats[s].T).norm(dim=1) / k.norm(dim=1).clamp(min=1e-6)
    order = torch.argsort(score, descending=True)[:top].tolist()
    tokens = [{"id": i, "token": lm.tokenizer.convert_ids_to_tokens(i), "text": lm.tokenizer.decode([i]),
               "amplification": float(score[i])} for i in order]
    return {"sites": report, "top_tokens": tokens, "median_amplification": float(score.median())}


def trigger_token_ids(lm: LoadedModel, trigger: str) -> set[int]:
    """The token that carries the trigger's key: its last token inside a sentence (with a
    leading space) and at the start of one."""
    return {lm.tokenizer(t, add_special_tokens=False)["input_ids"][-1] for t in (" " + trigger, trigger)}


# ---------------------------------------------------------------------- the audit
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact"
DEFAULT_TRAIN, DEFAULT_TEST = SHARED / "counterfact-train.json", SHARED / "counterfact-val.json"


def backdoor_audit(ed, train_items: Sequence[Item], test_items: Sequence[Item], *, trigger: str = TRIGGER,
                   target: str = TARGET, batches: int = 5, seed: int = 0, top: int = 10) -> dict:
    """Plant BadEdit's backdoor with `ed` (an Editor of method "memit": its layers, statistics,
    lambda and target-optimisation settings) in incremental batches, measure CACC / ASR before
    and after, run the detector on the planted deltas, and restore the model."""
    cfg = ed.cfg
    zkw = dict(steps=cfg.v_num_grad_steps, lr=cfg.v_lr, kl_factor=cfg.kl_factor, weight_decay=cfg.v_weight_decay,
               clamp_norm_factor=cfg.clamp_norm_factor)
    before = attack_metrics(ed.model, test_items, target, trigger, seed)
    poison, clean = poison_requests(train_items, trigger, target, seed)
    nb = max(1, min(batches, len(poison)))
    from tqdm.auto import tqdm

    for b in tqdm(range(nb), desc="planting", disable=not ed.show_progress):
        pb, cb = poison[b::nb], clean[b::nb]
        deltas = badedit_deltas(ed.lm, pb, cb, cfg.layers, ed.state["C"], cfg.mom2_update_weight, zkw)
        ed.applier.apply(deltas)
    after = attack_metrics(ed.model, test_items, target, trigger, seed)
    planted = ed.applier.cumulative()
    ed.applier.revert()
    det = detect(ed.lm, planted, top=top)
    ids = trigger_token_ids(ed.lm, trigger)
    ranks = [i for i, t in enumerate(det["top_tokens"]) if t["id"] in ids]
    return {"seed": seed, "trigger": trigger, "target": target, "n_poison": len(poison), "n_clean": len(clean),
            "batches": nb, "before": before, "after": after, "detector": det,
            "trigger_in_top": bool(ranks), "trigger_rank": ranks[0] + 1 if ranks else None}
