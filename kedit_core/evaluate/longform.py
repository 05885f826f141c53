"""Long-form evaluation (AnyEdit, Jiang et al. 2025, arXiv 2502.05628; reference
jianghoucheng/AnyEdit `evaluate_uns.py`, `summarize_uns.py`): the edited model answers the
question (and its paraphrase, and UnKE's sub-questions) greedily, and the answer is compared
with the long target.

Metrics, per item, then averaged (overall and per category for EditEverything):

  bleu                 sentence BLEU of sacrebleu (word n-grams, 13a tokenisation, exponential
                       smoothing), scaled to [0, 1]
  rouge1, rouge2, rougeL
                       ROUGE F1 of Google's `rouge-score` (stemmed)
  rouge1_recall, rouge2_recall, rougeL_recall
                       ROUGE recall, the reference's choice (it reports the recall of the `rouge`
                       package; here rouge-score's recall, the same definition with
                       rouge-score's tokeniser)
  anyedit_char_bleu    the reference's BLEU exactly: nltk `sentence_bleu([answer], prediction)`
                       on raw strings, i.e. over CHARACTER n-grams, unsmoothed (a quirk of the
                       reference, kept under its own name so that numbers can be compared with
                       the paper)
  minilm_cosine        cosine of all-MiniLM-L6-v2 sentence embeddings - what the reference calls
                       "BERT Score" (it is not BERTScore)

Sub-questions (UnKE) are scored like the reference: ROUGE-L recall of each sub-answer,
`sub_rougeL_recall`. An empty prediction scores 0 everywhere (the reference appends a space
so that `rouge` does not raise).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "rouge1_recall", "rouge2_recall", "rougeL_recall",
           "anyedit_char_bleu", "minilm_cosine")

_SCORER = None


def _rouge():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    return _SCORER


def char_bleu(reference: str, prediction: str) -> float:
    """nltk's sentence BLEU over the characters of raw strings, unsmoothed (the reference)."""
    import warnings

    from nltk.translate.bleu_score import sentence_bleu

    if not prediction or not reference:
        return 0.0
    with warnings.catch_warnings():          # nltk warns when an n-gram order has no overlap
        warnings.simplefilter("ignore")
        return float(sentence_bleu([reference], prediction))


def text_scores(predictions: Sequence[str], references: Sequence[str], encoder=None) -> list[dict[str, float]]:
    """Per-item scores of predictions against references (`encoder`: a kedit_core.encoder
    Encoder; loaded on demand)."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError("one prediction per reference")
    if encoder is None:
        from kedit_core.encoder import load_encoder

        encoder = load_encoder()
    rows = []
    scorer = _rouge()
    for p, r in zip(predictions, references):
        p = p.strip()
        if not p:
            rows.append(dict.fromkeys(METRICS, 0.0))
            continue
        rs = scorer.score(r, p)              # (target, prediction)
        rows.append({"bleu": sacrebleu.sentence_bleu(p, [r]).score / 100.0,
                     **{k: float(rs[k].fmeasure) for k in ("rouge1", "rouge2", "rougeL")},
                     **{f"{k}_recall": float(rs[k].recall) for k in ("rouge1", "rouge2", "rougeL")},
                     "anyedit_char_bleu": char_bleu(r, p)})
    if rows:
        live = [i for i, p in enumerate(predictions) if p.strip()]
        if live:
            e_p = encoder.encode([predictions[i].strip() for i in live])
            e_r = encoder.encode([references[i] for i in live])
            for i, c in zip(live, (e_p * e_r).sum(-1).tolist()):   # normalised embeddings
                rows[i]["minilm_cosine"] = float(c)
    return rows


def sub_question_recall(predictions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each sub-answer in the answer to its sub-question (the reference)."""
    scorer = _rouge()
    return [float(scorer.score(a, p).get("rougeL").recall) if p.strip() else 0.0
            for p, a in zip(predictions, answers)]


def aggregate(rows: Sequence[dict[str, float]], categories: Sequence[str | None] | None = None) -> dict:
    """Means over all rows, and per category (`by_category`) when categories are given."""
    out: dict = {k: float(np.mean([r[k] for r in rows])) for k in (rows[0] if rows else {})}
    out["n"] = len(rows)
    if categories is not None and any(categories):
        groups: dict[str, list[dict]] = defaultdict(list)
        for r, c in zip(rows, categories):
            groups[c or "-"].append(r)
        out["by_category"] = {c: {**{k: float(np.mean([r[k] for r in g])) for k in g[0]}, "n": len(g)}
                              for c, g in sorted(groups.items())}
    return out


def answer_questions(view, questions: Sequence[str], max_new_tokens: int = 512, chat: bool | None = None
                     ) -> list[str]:
    """Greedy answers of the (edited) model; `chat`: each question as a user turn through the
    tokenizer's chat template (default: when it has one, as the reference does for instruct
    models) - the same text AnyEdit edits on (kedit_core.generation.chat_prompt)."""
    from kedit_core.generation import chat_prompt, has_chat_template

    tok = view.lm.tokenizer
    if chat is None:
        chat = has_chat_template(tok)
    if chat:
        questions = [chat_prompt(tok, q) for q in questions]
    return view.generate(list(questions), max_new_tokens)


def evaluate_longform(view, requests, *, max_new_tokens: int = 512, encoder=None, chat: bool | None = None,
                      paraphrase: bool = True, sub_questions: bool = True) -> dict:
    """Greedy answers of the (edited) model to each request's question (its prompt), first
    paraphrase and sub-questions (`portability`), scored against the long target / sub-answers.
    `chat`: see `answer_questions`."""

    def ask(questions: list[str]) -> list[str]:
        return answer_questions(view, questions, max_new_tokens, chat)

    reqs = [r for r in requests if r.long_target]
    refs = [r.long_target for r in reqs]
    cats = [r.category for r in reqs]
    result = {"question": aggregate(text_scores(ask([r.text for r in reqs]), refs, encoder), cats)}
    paras = [(i, r.paraphrase_prompts[0]) for i, r in enumerate(reqs) if r.paraphrase_prompts]
    if paraphrase and paras:
        preds = ask([q for _, q in paras])
        result["paraphrase"] = aggregate(text_scores(preds, [refs[i] for i, _ in paras], encoder),
                                         [cats[i] for i, _ in paras])
    subs = [(q.prompt, q.answer) for r in reqs for q in r.portability]
    if sub_questions and subs:
        rec = sub_question_recall(ask([q for q, _ in subs]), [a for _, a in subs])
        result["sub_rougeL_recall"] = float(np.mean(rec))
    return result
