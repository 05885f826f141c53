"""The one target-vector optimisation and key computation shared by ROME, MEMIT, AlphaEdit.

For each request the reference code (kmeng01/rome `compute_v`, kmeng01/memit `compute_z`)
optimises a vector delta added to a hidden state at the last subject token, so that the
model predicts the new target after every context-template prefix, with

    loss_i = NLL(target_new | prefix_c + prompt_i)  averaged over prefixes c
           + kl_factor * KL(p_delta || p_orig) on "{subject} is a" at the subject's last token
           + weight_decay * ||delta_i|| / ||h_i||^2,

Adam, stopping when loss_i < 5e-2, and after each step clamping ||delta_i|| <= clamp * ||h_i||
(h_i: the unedited hidden state). The reference runs one request at a time. Here:

* all requests of a batch are optimised together: their rows form one right-padded batch,
  each request owns one row of the delta parameter; the losses are separable and Adam is
  elementwise, so each request follows its own trajectory exactly as alone (tested);
* a request that reaches the early-stop loss is frozen and leaves the batch (its rows are
  sliced out of the prepared tensors and KV cache), so the remaining steps only pay for
  unfinished requests;
* no position before the subject's last token depends on delta (attention is causal): those
  prefixes run once into a KV cache per active set, and each step runs only the suffixes
  (typically a third of the tokens). This is checked against a full forward pass once per
  call and falls back to full passes if it ever differs;
* the unembedding is applied only at the positions that carry a loss (target tokens and the
  KL position), not at every position of every row.

(p_delta: the next-token distribution with delta added, p_orig: without; the reference's
`kl_div(kl_distr_init, kl_log_probs, log_target=True)` is this direction, see `kl_term`.)

AnyEdit's windowed targets (`optimize_window_targets`) run through the same loop: one row per
request and window (prompt + earlier windows + the window), no KL row, the earlier windows'
deltas added at their key positions as fixed vectors (`_Rows.fixed`; they all lie in the
KV-cached prefix); window k of every request forms one batch, windows of a request are
sequential. `hidden_along` reads sites at every position of token sequences given as ids.

Context templates are generated once per model with a fixed seed and cached under
$KEDIT_CACHE keyed by the model's weights hash: MEMIT's (`context_templates`: "{}" plus five
10-token samples after "The", "Therefore", "Because", "I", "You"; keys weigh the bare prompt
1/2, `template_weights`) and ROME's (`rome_context_templates`: "{}" plus ten 5-token and ten
10-token samples after the model's document-start token, uniform weights).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kedit_core.batching import pad_id, pad_right
from kedit_core.hooks import add_at_pairs, add_at_positions, run_until_stopped, trace
from kedit_core.models.loader import LoadedModel, cache_dir
from kedit_core.types import EditRequest

log = logging.getLogger(__name__)

CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class ZOptConfig:
    layer: int                     # the block whose hidden state receives delta
    where: str = "block"           # "block": residual output of the block (MEMIT, AlphaEdit);
                                   # "mlp.out": output of its MLP projection (ROME)
    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    early_stop_loss: float = 5e-2
    kl_template: str = "{} is a"
    # EVOKE's LTI (Learn the Inference, Zhang et al. 2410.07819; `rome_lti/compute_v.py`,
    # `memit_lti/compute_z.py`): None, or the weights of its loss (see `LTIConfig`)
    lti: "LTIConfig | None" = None

    def site(self) -> str:
        return f"blocks.{self.layer}" + ("" if self.where == "block" else ".mlp.out")


@dataclass(frozen=True)
class LTIConfig:
    """LTI's objective, which replaces the NLL + KL of the plain optimisation:

        loss_i = nll_factor * NLL(target)
               + last_kl_factor * KL(p_student || p_teacher)   at every target position of every
                 template row and at the last token of "{subject} is a"
               + mid_kl_factor * KL(lens_student || lens_teacher)   the logit lens (final norm +
                 unembedding) of block `mid_layer`'s output at the subject's last token of every row
               + weight_decay * ||delta|| / ||h||^2

    The teacher is the unedited model reading "Imagine that {prompt} {target}\n" before each
    template row ("{subject} is a" is read without it, as in the reference). Its positions
    are found on its own tokenisation of the prefixed row, so they are the student's positions
    shifted by the prefix (the reference computes them on the unprefixed rows and reads the
    teacher at misaligned positions - a known pitfall, not reproduced). KL directions follow
    the reference's `kl_div(teacher, student, log_target=True)`, i.e. KL(student || teacher)."""

    nll_factor: float
    last_kl_factor: float
    mid_kl_factor: float
    mid_layer: int
    prefix: str = "Imagine that {fact}\n"


# ------------------------------------------------------------------ context templates
def context_templates(lm: LoadedModel, *, n_per_seed: int = 1, length: int = 10,
                      use_cache: bool = True) -> list[str]:
    """["{}"] + sampled prefixes ending in ". {}" (MEMIT's get_context_templates)."""
    path = cache_dir() / "context_templates" / f"{lm.fingerprint()[:24]}-{n_per_seed}x{length}.json"
    if use_cache and path.is_file():
        cached = _read_templates(path)
        if cached is not None:
            return cached
    tok = lm.tokenizer
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = ["{}"]
    for seed_text in CONTEXT_SEEDS:
        for _ in range(n_per_seed):
            ids = tok(seed_text, return_tensors="pt")["input_ids"].to(lm.device)
            with torch.no_grad():
                for _ in range(length):
                    logits = lm.model(input_ids=ids).logits[0, -1].float().cpu()
                    top = logits.topk(5)  # MEMIT's generate_fast samples from the top 5
                    probs = torch.softmax(top.values, -1)
                    nxt = top.indices[torch.multinomial(probs, 1, generator=gen)]
                    ids = torch.cat([ids, nxt.view(1, 1).to(ids.device)], dim=1)
            text = tok.decode(ids[0], skip_special_tokens=True)
            out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        from kedit_core.io import atomic_write_json

        atomic_write_json(path, out)
    return out


def rome_context_templates(lm: LoadedModel, *, length_params=((5, 10), (10, 10)),
                           use_cache: bool = True) -> list[str]:
    """ROME's context templates (kmeng01/rome `rome_main.get_context_templates` with the
    hparams' `context_template_length_params` [[5, 10], [10, 10]]): "{}" plus, for each
    (length, n), n samples of `length` tokens in all (the seed included, as `generate_fast`'s
    max_out_len) drawn from the top 5 after the model's document-start token
    ("<|endoftext|>" where the vocabulary has it, as GPT-2's; else BOS, else EOS), with the
    seed removed, braces stripped and ". {}" appended. Used with uniform weights for both k*
    and v* (`compute_u` takes `.mean(0)`; `compute_v` averages the NLL over its prompts)."""
    tok = lm.tokenizer
    seed_tok = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else (tok.bos_token or tok.eos_token)
    key = "-".join(f"{a}x{b}" for a, b in length_params)
    path = cache_dir() / "context_templates" / f"{lm.fingerprint()[:24]}-rome-{key}.json"
    if use_cache and path.is_file():
        cached = _read_templates(path)
        if cached is not None:
            return cached
    seed_id = tok.convert_tokens_to_ids(seed_tok)
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = ["{}"]
    for length, n in length_params:
        for _ in range(n):
            ids = torch.tensor([[seed_id]], device=lm.device)
            with torch.no_grad():
                while ids.shape[1] < length:
                    logits = lm.model(input_ids=ids).logits[0, -1].float().cpu()
                    top = logits.topk(5)
                    nxt = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)]
                    ids = torch.cat([ids, nxt.view(1, 1).to(ids.device)], dim=1)
            text = tok.decode(ids[0, 1:], skip_special_tokens=True)
            out.append(" ".join(text.replace("{", " ").replace("}", " ").split()) + ". {}")
    if use_cache:
        from kedit_core.io import atomic_write_json

        atomic_write_json(path, out)
    return out


def _read_templates(path) -> list[str] | None:
    """A cached template list, checked: a JSON list of strings, "{}" first, each ending in
    "{}"; anything else (damaged, truncated) is ignored with a warning and regenerated."""
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, list) and cached and cached[0] == "{}" and all(
                isinstance(t, str) and t.endswith("{}") and t.count("{}") == 1 for t in cached):
            return cached
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        pass
    log.warning("ignoring a damaged context-template cache %s", path)
    return None


def kl_term(log_p_orig: torch.Tensor, log_p_delta: torch.Tensor) -> torch.Tensor:
    """KL(p_delta || p_orig) = sum p_delta (log p_delta - log p_orig), batch-mean over rows:
    the reference's `kl_div(kl_distr_init, kl_log_probs, log_target=True, reduction="batchmean")`
    (torch's kl_div(input, target) is KL(target || input))."""
    return F.kl_div(log_p_orig, log_p_delta, log_target=True, reduction="batchmean")


# ------------------------------------------------------------------ tokenisation
def subject_last_index(lm: LoadedModel, template: str, subject: str) -> tuple[list[int], int]:
    """Token ids of template.replace("{}", subject) and the index of the subject's last
    token (character offsets, so it is exact whatever the tokenizer merges)."""
    start = template.index("{}")
    text = template.replace("{}", subject, 1)
    end = start + len(subject)
    enc = lm.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    idx = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end]
    if not idx:
        raise ValueError(f"subject {subject!r} not found among the tokens of {text!r}")
    return list(enc["input_ids"]), idx[-1]


def target_ids(lm: LoadedModel, target: str) -> list[int]:
    text = target if target.startswith(" ") else " " + target
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(ids)


@dataclass
class _Rows:
    """The rows of a batch, split at the position that receives delta (the subject's last
    token): the prefix before it does not depend on delta, so it runs once into a KV
    cache; each step runs only the suffix. Per row: its owner request, and the (suffix
    position, token) pairs that carry a loss; one KL row per request."""

    seqs: list[list[int]]
    owner: torch.Tensor            # (R,) index into the request list
    lookup: list[int]              # position of delta in the full row
    loss_rows: torch.Tensor        # (P,) row of each target token
    loss_pos: torch.Tensor         # (P,) full-row position whose logits predict it
    loss_tok: torch.Tensor         # (P,) the token
    kl_rows: torch.Tensor          # (n,) the KL row of each request
    kl_pos: torch.Tensor
    n_ctx: int
    # per row: (full-row position, vector) pairs added at the delta site and kept fixed
    # (AnyEdit: the earlier windows' deltas, all before the row's lookup position)
    fixed: list[list[tuple[int, torch.Tensor]]] | None = None

    def padded(self, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_right(self.seqs, pad, device)

    def subset(self, owners: set[int]) -> tuple[list[int], "_Rows"]:
        """The rows of the requests in `owners` (row indices kept, and the renumbered rows)."""
        keep = [i for i, o in enumerate(self.owner.tolist()) if o in owners]
        new_index = {old: new for new, old in enumerate(keep)}
        lsel = [i for i, r in enumerate(self.loss_rows.tolist()) if r in new_index]
        ksel = [i for i, r in enumerate(self.kl_rows.tolist()) if r in new_index]
        remap = lambda t, sel: torch.tensor([new_index[int(t[i])] for i in sel], dtype=torch.long)
        return keep, _Rows([self.seqs[i] for i in keep], self.owner[keep], [self.lookup[i] for i in keep],
                           remap(self.loss_rows, lsel), self.loss_pos[lsel], self.loss_tok[lsel],
                           remap(self.kl_rows, ksel), self.kl_pos[ksel], self.n_ctx,
                           None if self.fixed is None else [self.fixed[i] for i in keep])


def _build_rows(lm: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str],
                kl_template: str, owners: Sequence[int], kl_last: bool = False) -> _Rows:
    seqs, owner, lookup = [], [], []
    lrow, lpos, ltok, krow, kpos = [], [], [], [], []
    for o in owners:
        r = requests[o]
        tgt = target_ids(lm, r.target_new)
        for c in templates:
            ids, li = subject_last_index(lm, c.replace("{}", r.prompt, 1), r.subject)
            row = len(seqs)
            for j, t in enumerate(tgt):
                lrow.append(row), lpos.append(len(ids) - 1 + j), ltok.append(t)
            seqs.append(ids + tgt[:-1]), owner.append(o), lookup.append(li)
    for o in owners:  # KL rows after all rewriting rows
        ids, li = subject_last_index(lm, kl_template, requests[o].subject)
        krow.append(len(seqs)), kpos.append(len(ids) - 1 if kl_last else li)   # LTI: the last token
        seqs.append(ids), owner.append(o), lookup.append(li)
    T = torch.tensor
    return _Rows(seqs, T(owner), lookup, T(lrow), T(lpos), T(ltok).to(lm.device), T(krow), T(kpos),
                 len(templates))


# ------------------------------------------------------------------ windows (AnyEdit)
@dataclass(frozen=True)
class WindowedSequence:
    """A prompt and its long answer, tokenised ONCE (`ids` = prompt ids + answer ids), and
    the answer split into consecutive windows [starts[k], ends[k]) of positions in `ids`.
    Window k's target vector sits at the token before it, `keys[k] = starts[k] - 1` (for the
    first window the last prompt token). Every later step (target optimisation, keys,
    residuals) reads these ids, so positions cannot drift between steps."""

    ids: tuple[int, ...]
    n_prompt: int
    starts: tuple[int, ...]
    ends: tuple[int, ...]

    @property
    def keys(self) -> tuple[int, ...]:
        return tuple(a - 1 for a in self.starts)


def windowed(prompt_ids: Sequence[int], answer_ids: Sequence[int], window_size: int) -> WindowedSequence:
    """Windows of `window_size` answer tokens (the last one shorter; 0: one window holding the
    whole answer), without overlap (AnyEdit's `compute_z` with its `overlap` of 0)."""
    p, a = list(prompt_ids), list(answer_ids)
    if not p or not a:
        raise ValueError("a windowed sequence needs a non-empty prompt and answer")
    w = window_size if window_size > 0 else len(a)
    starts = tuple(range(len(p), len(p) + len(a), w))
    ends = tuple(min(s + w, len(p) + len(a)) for s in starts)
    return WindowedSequence(tuple(p + a), len(p), starts, ends)


def _build_window_rows(lm: LoadedModel, seqs: Sequence[WindowedSequence], k: int, owners: Sequence[int],
                       earlier: Sequence[Sequence[torch.Tensor]]) -> _Rows:
    """One row per request for its window k: the prompt, the earlier windows and the window
    without its last token (AnyEdit's `input_ids`); delta at the token before the window;
    every window token carries a loss; the earlier windows' deltas `earlier[o]` are fixed at
    their key positions. No KL rows (the reference's AnyEdit loss has none)."""
    rows, owner, lookup, fixed = [], [], [], []
    lrow, lpos, ltok = [], [], []
    for o in owners:
        sq = seqs[o]
        a, b = sq.starts[k], sq.ends[k]
        row = len(rows)
        for pos in range(a, b):
            lrow.append(row), lpos.append(pos - 1), ltok.append(sq.ids[pos])
        rows.append(list(sq.ids[:b - 1])), owner.append(o), lookup.append(a - 1)
        fixed.append([(sq.keys[j], earlier[o][j]) for j in range(k)])
    L = lambda v: torch.tensor(v, dtype=torch.long)
    return _Rows(rows, L(owner), lookup, L(lrow), L(lpos), L(ltok).to(lm.device), L([]), L([]), 1, fixed)


class _Runner:
    """Logits at selected (row, full-row position) pairs with delta added at each row's
    lookup position. `mode="suffix"`: the prefixes run once into a KV cache and the suffixes
    once through the blocks below the edited one; each call replays only blocks >= the
    edited one on the suffixes (exact: attention is causal and those blocks' inputs do not
    depend on delta); `mode="full"`: whole rows through the whole model every call."""

    def __init__(self, lm: LoadedModel, rows: _Rows, site_mod: torch.nn.Module, layer: int,
                 mode: str = "suffix"):
        self.lm, self.rows, self.site_mod, self.mode, self.layer = lm, rows, site_mod, mode, layer
        model = lm.model
        self.base = getattr(model, model.base_model_prefix)
        self.head = lm.arch.module(model, "unembed")
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        pad = pad_id(lm.tokenizer)
        dev = lm.device
        self.full_ids, self.full_mask = rows.padded(pad, dev)
        if mode.startswith("suffix"):
            pre = rows.lookup
            P = max(pre)
            self.P = P
            self.pre_ids, self.pre_mask = pad_right([s[:p] for s, p in zip(rows.seqs, pre)], pad, dev, width=max(P, 1))
            self.suf_ids, self.suf_mask = pad_right([s[p:] for s, p in zip(rows.seqs, pre)], pad, dev)
            S = self.suf_ids.shape[1]
            self.suf_pos = (torch.tensor(pre).view(-1, 1) + torch.arange(S).view(1, -1)).to(dev)
            self.cache = None
            if P > 0:
                with torch.no_grad(), self._fixed():
                    out = self.base(input_ids=self.pre_ids, attention_mask=self.pre_mask, use_cache=True,
                                    position_ids=torch.arange(P, device=dev).expand(len(pre), P))
                self.cache = out.past_key_values
        if mode == "suffix":
            self._capture()

    def _fixed(self):
        """Hooks adding the rows' fixed vectors at their full-row positions (all before the
        lookup position: in suffix modes they act on the prefix pass, whose columns are the
        full-row positions, and reach the suffix through the KV cache)."""
        fixed = self.rows.fixed
        pairs = [(i, p, v) for i, f in enumerate(fixed or ()) for p, v in f]
        if not pairs:
            return contextlib.nullcontext()
        return add_at_pairs(self.site_mod, [a for a, _, _ in pairs], [b for _, b, _ in pairs],
                            torch.stack([v for _, _, v in pairs]))

    def _capture(self) -> None:
        """One suffix pass with delta = 0 that records what every block >= the edited one
        received, so later passes replay only those blocks."""
        blocks = self.lm.model.get_submodule(self.lm.arch.blocks)
        self.start = self.layer
        self.replay_blocks = [blocks[i] for i in range(self.start, len(blocks))]
        calls: dict[int, tuple] = {}
        handles = [b.register_forward_pre_hook(
            lambda m, a, k, j=j: calls.__setitem__(j, (a, dict(k))), with_kwargs=True)
            for j, b in enumerate(self.replay_blocks)]
        try:
            with torch.no_grad(), trace({"s": self.site_mod}) as t:
                self._base_suffix(cache := (copy.deepcopy(self.cache) if self.cache is not None else None))
        finally:
            for h in handles:
                h.remove()
        self.site_out = t.outputs["s"][:, 0]  # unedited output of the delta site at lookup
        self.calls = [calls[j] for j in range(len(self.replay_blocks))]
        self.captured_cache = cache
        a0, k0 = self.calls[0]
        self.h_in = (a0[0] if a0 else k0["hidden_states"]).detach()
        self.norm = self.lm.arch.module(self.lm.model, "final_norm")

    def _base_suffix(self, cache):
        kw = dict(input_ids=self.suf_ids, position_ids=self.suf_pos)
        if cache is not None:
            kw.update(attention_mask=torch.cat([self.pre_mask, self.suf_mask], 1),
                      past_key_values=cache, use_cache=True)
        else:
            kw.update(attention_mask=self.suf_mask, use_cache=False)
        return self.base(**kw).last_hidden_state

    def _replay(self) -> torch.Tensor:
        fresh = copy.deepcopy(self.cache) if self.cache is not None else None
        swap = (lambda v: fresh if (fresh is not None and v is self.captured_cache) else v)
        h = self.h_in
        for b, (a, k) in zip(self.replay_blocks, self.calls):
            args = [swap(v) for v in a[1:]]
            kwargs = {n: swap(v) for n, v in k.items()}
            out = b(h, *args, **kwargs) if a else b(**{**kwargs, "hidden_states": h})
            h = out[0] if isinstance(out, tuple) else out
        return self.norm(h)

    def _hidden(self, delta_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (normed) hidden states, and the column offset of each row's position 0."""
        hooks = (add_at_positions(self.site_mod, [[p if self.mode == "full" else 0] for p in self.rows.lookup],
                                  delta_rows) if delta_rows is not None else contextlib.nullcontext())
        with hooks, (self._fixed() if self.mode == "full" else contextlib.nullcontext()):
            if self.mode == "full":
                h = self.base(input_ids=self.full_ids, attention_mask=self.full_mask, use_cache=False).last_hidden_state
                return h, torch.zeros(len(self.rows.seqs), dtype=torch.long)
            if self.mode == "suffix-noreplay":
                cache = copy.deepcopy(self.cache) if self.cache is not None else None
                return self._base_suffix(cache), torch.tensor(self.rows.lookup)
            return self._replay(), torch.tensor(self.rows.lookup)

    def select(self, keep: list[int], rows: _Rows) -> None:
        """Keep only rows `keep` (in suffix mode: by slicing the cache and the captured block
        inputs along the batch dimension, no forward pass); `rows` is the matching subset."""
        R = len(self.rows.seqs)
        idx = torch.tensor(keep, device=self.lm.device)

        def sl(v):
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == R:
                return v.index_select(0, idx.to(v.device))
            if isinstance(v, tuple):
                return tuple(sl(x) for x in v)
            return v

        self.rows = rows
        self.full_ids, self.full_mask = sl(self.full_ids), sl(self.full_mask)
        if self.mode == "full":
            return
        self.pre_ids, self.pre_mask = sl(self.pre_ids), sl(self.pre_mask)
        self.suf_ids, self.suf_mask, self.suf_pos = sl(self.suf_ids), sl(self.suf_mask), sl(self.suf_pos)
        if self.cache is not None:
            self.cache.batch_select_indices(idx)
        if self.mode == "suffix":
            self.h_in = sl(self.h_in)
            self.calls = [(tuple(sl(v) for v in a), {k: sl(v) for k, v in kw.items()}) for a, kw in self.calls]

    def logits_at(self, rows_idx: torch.Tensor, pos_idx: torch.Tensor, delta_rows=None) -> torch.Tensor:
        h, offset = self._hidden(delta_rows)
        cols = pos_idx - offset[rows_idx]
        logits = self.head(h[rows_idx.to(h.device), cols.to(h.device)])
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def site_output_at_lookup(self) -> torch.Tensor:
        """The unedited output of the delta site at each row's lookup position."""
        if self.mode == "suffix":
            return self.site_out
        with trace({"s": self.site_mod}) as t, torch.no_grad():
            self._hidden(None)
        out = t.outputs["s"]
        cols = [0] * len(self.rows.lookup) if self.mode != "full" else self.rows.lookup
        return torch.stack([out[i, c] for i, c in enumerate(cols)])

    def check(self) -> bool:
        """The suffix runner's logits equal a full forward's at every loss position."""
        rows = self.rows
        r = torch.cat([rows.loss_rows, rows.kl_rows])
        p = torch.cat([rows.loss_pos, rows.kl_pos])
        with torch.no_grad():
            got = self.logits_at(r, p).float()
            with self._fixed():
                full = self.lm.model(input_ids=self.full_ids, attention_mask=self.full_mask,
                                     use_cache=False).logits
            want = full[r.to(full.device), p.to(full.device)].float()
        return bool(torch.allclose(got, want, atol=1e-3, rtol=1e-3))


def _lens(lm: LoadedModel, h: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the logit lens: final norm, unembedding (and Gemma's softcap)."""
    model = lm.model
    logits = lm.arch.module(model, "unembed")(lm.arch.module(model, "final_norm")(h))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def _lti_teacher(lm: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str], kl_template: str,
                 lti: LTIConfig, chunk: int = 32) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per request: the unedited model's log-probs (prefixed template rows at their target
    positions, then "{subject} is a" at its last token) and its logit lens at block
    `mid_layer` at the subject's last token of each of those rows, in `_build_rows`' order."""
    model = lm.model
    base = getattr(model, model.base_model_prefix)
    mid = model.get_submodule(lm.arch.blocks)[lti.mid_layer]
    head = lm.arch.module(model, "unembed")
    cap = getattr(model.config, "final_logit_softcapping", None)
    seqs, last, look = [], {}, {}
    for o, r in enumerate(requests):
        tgt = target_ids(lm, r.target_new)
        prefix = lti.prefix.format(fact=f"{r.text} {r.target_new}")
        last[o], look[o] = [], []
        for c in templates:
            ids, li = subject_last_index(lm, prefix + c.replace("{}", r.prompt, 1), r.subject)
            last[o] += [(len(seqs), len(ids) - 1 + j) for j in range(len(tgt))]
            look[o].append((len(seqs), li))
            seqs.append(ids + tgt[:-1])
    for o, r in enumerate(requests):
        ids, li = subject_last_index(lm, kl_template, r.subject)
        last[o].append((len(seqs), len(ids) - 1))
        look[o].append((len(seqs), li))
        seqs.append(ids)
    fin, lens = [None] * len(seqs), [None] * len(seqs)
    want_last: dict[int, list[int]] = {}
    for o in last:
        for row, pos in last[o]:
            want_last.setdefault(row, []).append(pos)
    want_look = {row: pos for o in look for row, pos in look[o]}
    pad = pad_id(lm.tokenizer)
    for a in range(0, len(seqs), chunk):
        part = list(range(a, min(a + chunk, len(seqs))))
        ids, mask = pad_right([seqs[i] for i in part], pad, lm.device)
        with trace({"m": mid}) as t:
            h = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        for j, i in enumerate(part):
            lg = head(h[j, want_last.get(i, [])])
            if cap:
                lg = torch.tanh(lg / cap) * cap
            fin[i] = torch.log_softmax(lg.float(), -1)
            lens[i] = _lens(lm, t.outputs["m"][j, want_look[i]].unsqueeze(0))[0]
    out = {}
    for o in last:
        rows_last = []
        for row, pos in last[o]:
            k = want_last[row].index(pos)
            rows_last.append(fin[row][k])
        out[o] = (torch.stack(rows_last), torch.stack([lens[row] for row, _ in look[o]]))
    return out


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(student || teacher) (log-probs in; torch's
    kl_div(teacher, student, log_target=True, reduction="batchmean"), the reference's call)."""
    return (student.exp() * (student - teacher)).sum(-1).mean()


@dataclass
class ZResult:
    targets: torch.Tensor          # (n, H): target hidden states h_i + delta_i
    init: torch.Tensor             # (n, H): the unedited hidden states h_i
    losses: list[float]            # final loss per request
    steps: list[int]               # steps taken per request


def optimize_targets(lm: LoadedModel, requests: Sequence[EditRequest], cfg: ZOptConfig,
                     templates: Sequence[str] | None = None, *, mode: str = "suffix") -> ZResult:
    """Batched target optimisation for `requests` (see the module docstring)."""
    templates = list(templates) if templates is not None else context_templates(lm)
    lti, teacher = cfg.lti, None
    if lti is not None and lti.mid_layer < 0:     # the reference's 30 of GPT-2 XL's 48 blocks, scaled
        lti = dataclasses.replace(lti, mid_layer=min(lm.n_layers - 1, round(0.625 * lm.n_layers)))
    if lti is not None:
        teacher = _lti_teacher(lm, requests, templates, cfg.kl_template, lti)

    def build(owners):
        return _build_rows(lm, requests, templates, cfg.kl_template, owners, kl_last=lti is not None)

    z, _ = _optimize(lm, len(requests), cfg, build, mode=mode, lti=lti, teacher=teacher)
    return z


def optimize_window_targets(lm: LoadedModel, seqs: Sequence[WindowedSequence], cfg: ZOptConfig, *,
                            mode: str = "suffix") -> tuple[ZResult, list[int]]:
    """AnyEdit's target vectors (Jiang et al. 2502.05628; reference `compute_z.py` of
    `memit_ARE` / `AlphaEdit_ARE`): for each sequence, window after window, a delta at the
    token before the window that makes the model produce the window after the prompt and the
    earlier windows, with the EARLIER WINDOWS' DELTAS KEPT IN PLACE at their positions; loss =
    window NLL (per token) + weight_decay * ||delta|| / ||h||^2 (set `kl_factor` aside: the
    reference has no KL term), Adam, the early stop and clamp of `cfg`.

    Batched: round k optimises window k of every sequence that has one, together (one row
    each; the losses are separable, so each follows its own trajectory as alone). Windows of
    one sequence are sequential by definition. The earlier windows' fixed deltas all lie before
    the current lookup, so they act on the KV-cached prefix (computed once per round) and the
    fast suffix path stays exact (checked once per model against full passes, as always).

    Returns the targets of all windows, sequence-major then window order (`ZResult` rows:
    h + delta at each key position), and the number of windows of each sequence."""
    counts = [len(sq.starts) for sq in seqs]
    deltas: list[list[torch.Tensor]] = [[] for _ in seqs]
    parts: list[list[tuple]] = [[] for _ in seqs]      # per window: (target, init, loss, steps)
    for k in range(max(counts, default=0)):
        active = [i for i, c in enumerate(counts) if c > k]
        part = [seqs[i] for i in active]
        earlier = [deltas[i] for i in active]

        def build(owners, part=part, earlier=earlier, k=k):
            return _build_window_rows(lm, part, k, owners, earlier)

        z, d = _optimize(lm, len(part), cfg, build, mode=mode, fixed=k > 0)
        log.info("window %d/%d of %d sequence(s): mean loss %.3f", k + 1, max(counts), len(part),
                 sum(z.losses) / len(z.losses))
        for j, i in enumerate(active):
            deltas[i].append(d[j])
            parts[i].append((z.targets[j], z.init[j], z.losses[j], z.steps[j]))
    flat = [w for p in parts for w in p]
    if not flat:
        raise ValueError("no windows to optimise")
    return ZResult(targets=torch.stack([w[0] for w in flat]), init=torch.stack([w[1] for w in flat]),
                   losses=[w[2] for w in flat], steps=[w[3] for w in flat]), counts


def _optimize(lm: LoadedModel, n: int, cfg: ZOptConfig, build, *, mode: str = "suffix",
              lti: LTIConfig | None = None, teacher=None, fixed: bool = False) -> tuple[ZResult, torch.Tensor]:
    """The optimisation loop over `n` requests whose rows `build(owners)` makes (a `_Rows`
    for the requests `owners`, `n_ctx` rows each); returns the result and the deltas.
    `fixed`: the rows carry fixed vectors (checked for exactness once on their own)."""
    model, arch = lm.model, lm.arch
    hidden = arch.dims(model, f"blocks.{cfg.layer}.mlp.out")[0]
    dtype = torch.float64 if lm.dtype == torch.float64 else torch.float32  # fp32 for fp32/bf16/fp16
    delta = torch.zeros(n, hidden, device=lm.device, dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    init = torch.zeros(n, hidden, device=lm.device, dtype=dtype)
    kl_init: list[torch.Tensor | None] = [None] * n
    final_loss = [float("nan")] * n
    steps_taken = [0] * n
    active = list(range(n))
    site_mod = arch.module(model, cfg.site())
    runner = None
    # The exactness check of the fast path runs once per model, site and requested mode;
    # the mode it settles on is remembered.
    mode_key = ("zopt-mode", cfg.site(), mode) + (("fixed",) if fixed else ())
    checked = mode_key in lm.scratch
    mode = lm.scratch.get(mode_key, mode)
    if lti is not None:
        # LTI reads a middle block's output too: whole rows through the whole model each step
        mode, checked = "full", True
        mid_block = model.get_submodule(arch.blocks)[lti.mid_layer]
    for it in range(cfg.steps):
        if runner is None:
            rows = build(active)
            runner = _Runner(lm, rows, site_mod, cfg.layer, mode)
            while mode != "full" and not checked and not runner.check():
                fallback = {"suffix": "suffix-noreplay", "suffix-noreplay": "full"}[mode]
                log.warning("%s passes differ from full passes for %s; using %s passes", mode,
                            type(model).__name__, fallback)
                mode = fallback
                runner = _Runner(lm, rows, site_mod, cfg.layer, mode)
            if not checked:
                lm.scratch[mode_key] = mode
            checked = True
            if it == 0:  # the unedited hidden state at the first ("{}") row of each request
                h0 = runner.site_output_at_lookup()
                for j, o in enumerate(active):
                    init[o] = h0[j * rows.n_ctx]
            all_rows = torch.cat([rows.loss_rows, rows.kl_rows])
            all_pos = torch.cat([rows.loss_pos, rows.kl_pos])
            n_loss = rows.loss_rows.shape[0]
            row_owner = rows.owner[rows.loss_rows]
        if lti is None:
            logits = runner.logits_at(all_rows, all_pos, delta[rows.owner.to(lm.device)])
        else:
            with trace({"m": mid_block}, keep_grad=True) as tm:
                logits = runner.logits_at(all_rows, all_pos, delta[rows.owner.to(lm.device)])
            hm = tm.outputs["m"]
            mid_lp = _lens(lm, hm[torch.arange(hm.shape[0], device=hm.device), torch.tensor(rows.lookup, device=hm.device)])
            row_owner_all = rows.owner.to(mid_lp.device)
        logp = torch.log_softmax(logits.to(delta.dtype), dim=-1)
        tok_lp = logp[:n_loss].gather(1, rows.loss_tok.view(-1, 1)).squeeze(1)
        kl_lp = logp[n_loss:]
        losses = []
        for j, o in enumerate(active):
            # NLL: per row the summed target log-prob / #target tokens, averaged over rows.
            sel = (row_owner == o).to(tok_lp.device)
            n_tgt = int(sel.sum()) // rows.n_ctx
            nll = -tok_lp[sel].sum() / n_tgt / rows.n_ctx
            wd = cfg.weight_decay * (delta[o].norm() / init[o].norm() ** 2)
            if lti is not None:
                t_last, t_mid = teacher[o]
                s_last = torch.cat([logp[:n_loss][sel], kl_lp[j:j + 1]])
                kl_last = _kl_rows(s_last.float(), t_last)
                kl_mid = _kl_rows(mid_lp[row_owner_all == o], t_mid)
                losses.append(lti.nll_factor * nll + lti.last_kl_factor * kl_last + lti.mid_kl_factor * kl_mid + wd)
                continue
            if not kl_lp.shape[0]:                  # rows without a KL row (AnyEdit's windows)
                losses.append(nll + wd)
                continue
            if kl_init[o] is None:
                kl_init[o] = kl_lp[j].detach()
            kl = cfg.kl_factor * kl_term(kl_init[o].unsqueeze(0), kl_lp[j].unsqueeze(0))
            losses.append(nll + kl + wd)
        done = set()
        for j, o in enumerate(active):
            final_loss[o] = float(losses[j].detach())
            steps_taken[o] = it
            if final_loss[o] < cfg.early_stop_loss:
                done.add(o)
        if it == cfg.steps - 1:
            break
        still = [o for o in active if o not in done]
        if not still:
            break
        total = sum(l for j, l in enumerate(losses) if active[j] not in done)
        opt.zero_grad()
        total.backward()
        before = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            frozen = [o for o in range(n) if o not in still]
            if frozen:  # Adam's momentum must not move a finished request
                delta[frozen] = before[frozen]
            for o in still:  # clamp to clamp_norm_factor * ||h||
                max_norm = cfg.clamp_norm_factor * init[o].norm()
                if delta[o].norm() > max_norm:
                    delta[o] *= max_norm / delta[o].norm()
        if len(still) != len(active):  # finished requests leave the batch
            keep, rows = rows.subset(set(still))
            runner.select(keep, rows)
            active = still
            all_rows = torch.cat([rows.loss_rows, rows.kl_rows])
            all_pos = torch.cat([rows.loss_pos, rows.kl_pos])
            n_loss = rows.loss_rows.shape[0]
            row_owner = rows.owner[rows.loss_rows]
    return ZResult(targets=(init + delta.detach()).detach(), init=init.detach(), losses=final_loss,
                   steps=steps_taken), delta.detach()


# ------------------------------------------------------------------ keys and values
@torch.no_grad()
def hidden_along(lm: LoadedModel, seqs: Sequence[Sequence[int]], *, inputs_of: Sequence[str] = (),
                 outputs_of: Sequence[str] = (), batch_rows: int = 8
                 ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """The input (resp. output) of each site at EVERY position of each token sequence, as
    given (no re-tokenisation), pads cut off: (inputs[site][i] (len_i, d_in), outputs[site][i]
    (len_i, d_out)), float64 on the CPU. One truncated forward pass per chunk of sequences."""
    model, arch = lm.model, lm.arch
    sites = list(dict.fromkeys([*inputs_of, *outputs_of]))
    mods = {s: arch.module(model, s) for s in sites}
    deepest = max(sites, key=lambda s: (int(s.split(".")[1]), s.count(".") == 1))
    ins = {s: [] for s in inputs_of}
    outs = {s: [] for s in outputs_of}
    pad = pad_id(lm.tokenizer)
    for s0 in range(0, len(seqs), batch_rows):
        chunk = [list(x) for x in seqs[s0:s0 + batch_rows]]
        ids, mask = pad_right(chunk, pad, lm.device)
        with trace(mods, inputs=bool(inputs_of), outputs=True, stop_after=deepest) as t:
            run_until_stopped(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False))
        for store, src in ((ins, t.inputs), (outs, t.outputs)):
            for s in store:
                store[s] += [src[s][j, :len(x)].double().cpu() for j, x in enumerate(chunk)]
    return ins, outs


def template_weights(templates: Sequence[str]) -> list[float]:
    """Weights of the context templates in a key average. The reference (MEMIT compute_ks)
    averages within each template type, then over the two types: the bare "{}" prompt
    weighs 1/2 and the sampled prefixes share the other 1/2."""
    n = len(templates)
    if n > 1 and templates[0] == "{}":
        return [0.5] + [0.5 / (n - 1)] * (n - 1)
    return [1.0 / n] * n


@torch.no_grad()
def hidden_at_subject(lm: LoadedModel, requests: Sequence[EditRequest], templates: Sequence[str],
                      *, inputs_of: Sequence[str] = (), outputs_of: Sequence[str] = (),
                      batch_rows: int = 256, weights: Sequence[float] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """For each request, the input (resp. output) of each site at the subject's last token,
    averaged over the context templates with `weights` (default `template_weights`, MEMIT's;
    ROME passes uniform weights): (inputs[site] (n, d_in),
    outputs[site] (n, d_out)). One truncated forward pass per chunk of rows covers all sites."""
    model, arch = lm.model, lm.arch
    sites = list(dict.fromkeys([*inputs_of, *outputs_of]))
    mods = {s: arch.module(model, s) for s in sites}
    # A block's own output comes after its MLP projection.
    deepest = max(sites, key=lambda s: (int(s.split(".")[1]), s.count(".") == 1))
    seqs, owner, lookup, weight = [], [], [], []
    tw = list(weights) if weights is not None else template_weights(templates)
    if len(tw) != len(templates):
        raise ValueError(f"{len(tw)} weights for {len(templates)} templates")
    for o, r in enumerate(requests):
        for c, w in zip(templates, tw):
            ids, li = subject_last_index(lm, c.replace("{}", r.prompt, 1), r.subject)
            seqs.append(ids), owner.append(o), lookup.append(li), weight.append(w)
    n = len(requests)
    acc_in = {s: None for s in inputs_of}
    acc_out = {s: None for s in outputs_of}
    pad = pad_id(lm.tokenizer)
    for s0 in range(0, len(seqs), batch_rows):
        chunk = seqs[s0:s0 + batch_rows]
        ids, mask = pad_right(chunk, pad, lm.device)
        rows = torch.arange(len(chunk))
        pos = torch.tensor(lookup[s0:s0 + batch_rows])
        own = torch.tensor(owner[s0:s0 + batch_rows])
        wts = torch.tensor(weight[s0:s0 + batch_rows], dtype=torch.float64).view(-1, 1)
        with trace(mods, inputs=bool(inputs_of), outputs=True, stop_after=deepest) as t:
            run_until_stopped(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False))
        for store, src in ((acc_in, t.inputs), (acc_out, t.outputs)):
            for s in store:
                v = src[s][rows.to(src[s].device), pos.to(src[s].device)].double().cpu() * wts
                tot = torch.zeros(n, v.shape[1], dtype=torch.float64).index_add_(0, own, v)
                store[s] = tot if store[s] is None else store[s] + tot
    return ({s: v.float() for s, v in acc_in.items()}, {s: v.float() for s, v in acc_out.items()})
