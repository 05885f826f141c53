"""Readers for the knowledge-editing benchmark formats.

The format is recognised from the content (the keys of the records), never from the file
name, so a user can rename files or pass any slice of a benchmark. Files may be JSON (a
list of records, or an object holding one), JSON Lines, or parquet. Every record is
validated; an invalid one raises `BadInputError` naming the file, record index, field and
reason, or, with `skip_invalid=True`, is reported in `EditDataset.problems` and skipped.
"""

from __future__ import annotations

import functools

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from kedit_core.errors import BadInputError
from kedit_core.types import EditCase, EditDataset, EditRequest, LabeledPrompt

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- raw records
def read_records(path: str | Path) -> list[dict]:
    """The raw records of a JSON / JSONL / parquet file, as dicts."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError("no such file", file=str(path))
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
            return pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise BadInputError(f"not a readable parquet file ({e})", file=str(p)) from e
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BadInputError(f"not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} "
                            f"(line {line}); re-encode the file as UTF-8", file=str(p)) from e
    stripped = text.lstrip()
    if not stripped:
        raise BadInputError("the file is empty", file=str(p))
    if p.suffix == ".jsonl" or (stripped[0] == "{" and "\n{" in stripped and not _is_json(stripped)):
        out = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadInputError(f"line {i + 1} is not valid JSON ({e.msg})", file=str(p)) from e
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInputError(f"not valid JSON (line {e.lineno}: {e.msg})", file=str(p)) from e
    if isinstance(data, dict):  # {"data": [...]} or a single record
        lists = [v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise BadInputError("expected a list of records", file=str(p))
    return data


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


# ---------------------------------------------------------------------------- field access
class _Rec:
    """Typed access to one raw record, raising errors that name file, record and field."""

    def __init__(self, raw: Any, file: str, index: int):
        self.file, self.index = file, index
        if not isinstance(raw, Mapping):
            raise self.error(None, f"expected an object, got {type(raw).__name__}")
        self.raw = raw

    def error(self, field: str | None, reason: str) -> BadInputError:
        return BadInputError(reason, file=self.file, record=self.index, field=field)

    def has(self, key: str) -> bool:
        return key in self.raw and self.raw[key] is not None

    def get(self, key: str, typ: type | tuple[type, ...], *, required: bool = True,
            default: Any = None, raw: Mapping | None = None, prefix: str = "") -> Any:
        src = self.raw if raw is None else raw
        name = prefix + key
        if key not in src or src[key] is None:
            if required:
                raise self.error(name, "required field is missing")
            return default
        value = src[key]
        if not isinstance(value, typ) or (isinstance(value, bool) and typ in (int, (int, str))):
            want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise self.error(name, f"expected {want}, got {type(value).__name__}")
        return value

    def text(self, key: str, *, required: bool = True, raw: Mapping | None = None,
             prefix: str = "") -> str | None:
        value = self.get(key, str, required=required, raw=raw, prefix=prefix)
        if value is not None and not value.strip():
            if required:
                raise self.error(prefix + key, "must not be empty")
            return None
        return value

    def texts(self, key: str, *, required: bool = False, raw: Mapping | None = None,
              prefix: str = "") -> tuple[str, ...]:
        value = self.get(key, (list, str), required=required, default=[], raw=raw, prefix=prefix)
        value = [value] if isinstance(value, str) else value
        for j, v in enumerate(value):
            if not isinstance(v, str):
                raise self.error(f"{prefix}{key}[{j}]", f"expected str, got {type(v).__name__}")
        return tuple(v for v in value if v.strip())

    def case_id(self) -> str:
        for key in ("case_id", "id", "known_id"):
            if self.has(key):
                return str(self.get(key, (int, str)))
        return str(self.index)


def _target(rec: _Rec, value: Any, field: str) -> str:
    """A target given as a string or as {"str": ...} (ROME format)."""
    if isinstance(value, Mapping):
        value = value.get("str")
        field = field + ".str"
    if not isinstance(value, str):
        raise rec.error(field, "required target string is missing" if value is None
                        else f"expected str, got {type(value).__name__}")
    if not value.strip():
        raise rec.error(field, "target must not be empty")
    return value.strip()


def _answers(value: Any) -> list[str]:
    """KnowEdit answers: a string, a list of strings, or a list of alias lists."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [a for v in value for a in _answers(v)]
    return []


def _labeled(prompt: str, answers: list[str]) -> LabeledPrompt | None:
    answers = [a.strip() for a in answers if a.strip()]
    return LabeledPrompt(prompt, answers[0], tuple(answers[1:])) if answers else None


def _template(rec: _Rec, prompt: str, subject: str, field: str = "prompt") -> str:
    """A rewrite template with "{}" where the subject stands."""
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise rec.error(field, 'the template must hold exactly one "{}"')
        return prompt
    if subject not in prompt:
        raise rec.error(field, f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    return prompt.replace(subject, "{}", 1)


def _request(rec: _Rec, *, subject: str, prompt: str, target_new: str, suffix: str = "",
             **kw) -> EditRequest:
    if not subject.strip():
        raise rec.error("subject", "must not be empty")
    return EditRequest(case_id=rec.case_id() + suffix, subject=subject, prompt=prompt,
                       target_new=target_new, source=f"{rec.file}#{rec.index}", **kw)


def _single(req: EditRequest) -> EditCase:
    return EditCase(case_id=req.case_id, requests=(req,))


# -------------------------------------------------------------------------------- formats
def _rome_rewrite(rec: _Rec, rw: Mapping, prefix: str, suffix: str = "") -> dict:
    subject = rec.text("subject", raw=rw, prefix=prefix)
    prompt = _template(rec, rec.text("prompt", raw=rw, prefix=prefix), subject, prefix + "prompt")
    return dict(subject=subject, prompt=prompt, suffix=suffix,
                target_new=_target(rec, rw.get("target_new"), prefix + "target_new"),
                target_true=(_target(rec, rw["target_true"], prefix + "target_true")
                             if rw.get("target_true") is not None else None),
                relation_id=rw.get("relation_id") or rw.get("relation_label"))


def _portability_qa(rec: _Rec) -> tuple[LabeledPrompt, ...]:
    port = rec.get("portability", dict, required=False, default={})
    q, a = port.get("New Question"), port.get("New Answer")
    return (LabeledPrompt(q, a),) if isinstance(q, str) and isinstance(a, str) and a.strip() else ()


def parse_counterfact(rec: _Rec) -> EditCase:
    """CounterFact, ROME format (also its subject-replace and portability variants)."""
    rw = rec.get("requested_rewrite", dict)
    fields = _rome_rewrite(rec, rw, "requested_rewrite.")
    true = fields["target_true"]
    neigh = rec.texts("neighborhood_prompts")
    # kedit extension: per-prompt answers (our built-in set draws neighbours from other
    # objects of the relation); CounterFact's neighbours all share target_true.
    neigh_ans = rec.texts("neighborhood_answers")
    if neigh_ans:
        if len(neigh_ans) != len(neigh):
            raise rec.error("neighborhood_answers", f"expected {len(neigh)} answers, got {len(neigh_ans)}")
        neighborhood = tuple(LabeledPrompt(p, a.strip()) for p, a in zip(neigh, neigh_ans))
    elif neigh and true is None:
        raise rec.error("requested_rewrite.target_true",
                        "needed as the answer of the neighbourhood prompts")
    else:
        neighborhood = tuple(LabeledPrompt(p, true) for p in neigh)
    probes = []
    if rec.has("alternative_subject"):
        alt = rec.get("alternative_subject", (str, list))
        alts = [alt] if isinstance(alt, str) else [a for a in alt if isinstance(a, str)]
        probes.append(("subject_alias", tuple(
            LabeledPrompt(fields["prompt"].replace("{}", a), fields["target_new"]) for a in alts)))
    return _single(_request(
        rec, **fields,
        paraphrase_prompts=rec.texts("paraphrase_prompts"),
        neighborhood=neighborhood,
        attribute_prompts=rec.texts("attribute_prompts"),
        generation_prompts=rec.texts("generation_prompts"),
        portability=_portability_qa(rec), probes=tuple(probes)))


def parse_evoke(rec: _Rec) -> EditCase:
    """EVOKE (Zhang et al., 2410.07819): CounterFact plus overfitting probes."""
    case = parse_counterfact(rec) if rec.has("neighborhood_prompts") else None
    rw = rec.get("requested_rewrite", dict)
    base = case.requests[0] if case else _request(rec, **_rome_rewrite(rec, rw, "requested_rewrite."))
    new, true = base.target_new, base.target_true
    probes = list(base.probes)
    for key in ("data_augmentation_prompt_para",):
        if key in rw:
            ps = rec.texts(key, raw=rw, prefix="requested_rewrite.")
            probes.append(("paraphrase_aug", tuple(
                LabeledPrompt(p.replace("{}", base.subject), new) for p in ps)))
    port = rec.get("portability", dict, required=False, default={})
    q = port.get("New Question")
    if isinstance(q, str) and q.strip() and isinstance(port.get("New Answer"), str):
        # EVOKE's multi-hop prompt (eval_utils_evoke_main.py): the answer after the edit and,
        # for the AMS, the answer the question had before it
        mh = f"{q} The answer to this question, most simply, is"
        probes.append(("multihop", (LabeledPrompt(mh, port["New Answer"].strip()),)))
        if isinstance(port.get("Original Answer"), str) and port["Original Answer"].strip():
            probes.append(("multihop_original", (LabeledPrompt(mh, port["Original Answer"].strip()),)))
    if rec.has("prefix_distraction") and true is not None:
        probes.append(("prefix_distraction", tuple(
            LabeledPrompt(p, true) for p in rec.texts("prefix_distraction"))))
    if rec.has("relation_specificity"):
        spec = rec.get("relation_specificity", dict)
        ans = spec.get("answer") or {}
        if isinstance(ans, Mapping):
            value = ans.get("value", "")
            if not isinstance(value, str):
                raise rec.error("relation_specificity.answer.value", f"expected str, got {type(value).__name__}")
            aliases = rec.texts("aliases", raw=ans, prefix="relation_specificity.answer.")
            answers = [value, *aliases]
        else:
            answers = _answers(ans)
        lp = _labeled(rec.text("prompt", raw=spec, prefix="relation_specificity."), answers)
        if lp:
            probes.append(("relation_specificity", (lp,)))
    return _single(base.with_(probes=tuple(probes)))


def parse_counterfact_flat(rec: _Rec) -> EditCase:
    """CounterFact in the flat MEND / EasyEdit format."""
    subject = rec.text("subject")
    prompt = _template(rec, rec.text("prompt"), subject)
    loc = rec.text("locality_prompt", required=False)
    loc_ans = rec.text("locality_ground_truth", required=loc is not None)
    return _single(_request(
        rec, subject=subject, prompt=prompt,
        target_new=_target(rec, rec.raw.get("target_new"), "target_new"),
        target_true=_target(rec, rec.raw.get("ground_truth"), "ground_truth"),
        paraphrase_prompts=rec.texts("rephrase_prompt"),
        neighborhood=(LabeledPrompt(loc, loc_ans.strip()),) if loc else ()))


ZSRE_CONVENTIONS = ("mend", "memit")


def parse_zsre(rec: _Rec, convention: str = "mend") -> EditCase:
    """zsRE, MEND format: a question `src` about `subject`. Two conventions:

    * "mend" (MEND, EasyEdit; kedit's default): the new target is `alt`, target_true is
      answers[0]; the neighbourhood prompt is `loc` with answer `loc_ans`, and zsRE
      locality is the agreement of the edited model's argmax with the unedited model's
      there (metric `locality`).
    * "memit" (ROME / MEMIT / AlphaEdit, kmeng01/memit `dsets/zsre.py` MENDQADataset): the
      new target is answers[0] (target_true unknown); the neighbourhood prompt is
      `loc + "?"` with answer `loc_ans`, and specificity is the token accuracy of `loc_ans`
      there (metric `neighborhood_acc`).
    """
    if convention not in ZSRE_CONVENTIONS:
        raise BadInputError(f"unknown zsRE convention {convention!r} (choose {' or '.join(ZSRE_CONVENTIONS)})",
                            field="zsre_convention")
    subject = rec.text("subject")
    prompt = _template(rec, rec.text("src"), subject, "src")
    answers = rec.texts("answers")
    loc = rec.text("loc", required=False)
    loc_ans = rec.text("loc_ans").strip() if loc else None
    port = rec.get("portability", dict, required=False, default={})
    portability = ()
    if isinstance(port.get("New Question"), str) and isinstance(port.get("New Answer"), str):
        portability = (LabeledPrompt(port["New Question"], port["New Answer"]),)
    if convention == "memit":
        if not answers or not answers[0].strip():
            raise rec.error("answers", "the memit zsRE convention edits to answers[0]; none given")
        target_new, target_true = answers[0].strip(), None
        neighborhood = (LabeledPrompt(loc + "?", loc_ans),) if loc else ()
    else:
        target_new = _target(rec, rec.raw.get("alt"), "alt")
        target_true = answers[0].strip() if answers else None
        neighborhood = (LabeledPrompt(loc, loc_ans),) if loc else ()
    return _single(_request(
        rec, subject=subject, prompt=prompt, target_new=target_new, target_true=target_true,
        paraphrase_prompts=rec.texts("rephrase"), neighborhood=neighborhood, portability=portability))


def parse_knowedit(rec: _Rec) -> EditCase:
    """KnowEdit (Zhang et al. 2401.01286): WikiData counterfact / recent, zsRE test."""
    subject = rec.text("subject")
    prompt = _template(rec, rec.text("prompt"), subject)
    truth = _answers(rec.raw.get("ground_truth"))

    def groups(key: str) -> list[tuple[str, tuple[LabeledPrompt, ...]]]:
        out = []
        for name, items in rec.get(key, dict, required=False, default={}).items():
            if not isinstance(items, list):
                raise rec.error(f"{key}.{name}", f"expected list, got {type(items).__name__}")
            lps = []
            for j, it in enumerate(items):
                if not isinstance(it, Mapping) or not isinstance(it.get("prompt"), str):
                    raise rec.error(f"{key}.{name}[{j}].prompt", "required field is missing")
                lp = _labeled(it["prompt"], _answers(it.get("ground_truth")))
                if lp:
                    lps.append(lp)
            out.append((name, tuple(lps)))
        return out

    locality, portability = groups("locality"), groups("portability")
    return _single(_request(
        rec, subject=subject, prompt=prompt,
        target_new=_target(rec, rec.raw.get("target_new"), "target_new"),
        target_true=truth[0].strip() if truth else None,
        paraphrase_prompts=rec.texts("rephrase_prompt") or rec.texts("rephrase"),
        neighborhood=tuple(lp for _, lps in locality for lp in lps),
        portability=tuple(lp for _, lps in portability for lp in lps),
        probes=tuple((f"locality.{n}", lps) for n, lps in locality)
        + tuple((f"portability.{n}", lps) for n, lps in portability)))


def parse_mquake(rec: _Rec) -> EditCase:
    """MQuAKE (Zhong et al. 2305.14795): several rewrites and multi-hop questions per case."""
    rws = rec.get("requested_rewrite", list)
    if not rws:
        raise rec.error("requested_rewrite", "must hold at least one rewrite")
    reqs = []
    for j, rw in enumerate(rws):
        if not isinstance(rw, Mapping):
            raise rec.error(f"requested_rewrite[{j}]", "expected an object")
        pre = f"requested_rewrite[{j}]."
        fields = _rome_rewrite(rec, rw, pre, suffix=f".{j}")
        q = rw.get("question")
        reqs.append(_request(rec, **fields, paraphrase_prompts=(q,) if isinstance(q, str) else (),
                             long_target=rw.get("fact_new_uns") if isinstance(rw.get("fact_new_uns"), str) else None))
    questions = rec.texts("questions", required=True)
    if not questions:
        raise rec.error("questions", "must hold at least one question")

    def hops(key: str) -> tuple[LabeledPrompt, ...]:
        out = []
        for j, h in enumerate(rec.get(key, list, required=False, default=[])):
            if not isinstance(h, Mapping) or not isinstance(h.get("cloze"), str):
                raise rec.error(f"{key}[{j}].cloze", "required field is missing")
            out.append(LabeledPrompt(h["cloze"], str(h.get("answer", "")), tuple(h.get("answer_alias", []))))
        return tuple(out)

    return EditCase(
        case_id=rec.case_id(), requests=tuple(reqs), multi_hop_questions=questions,
        answer=LabeledPrompt(questions[0], rec.text("answer"), rec.texts("answer_alias")),
        new_answer=LabeledPrompt(questions[0], rec.text("new_answer"), rec.texts("new_answer_alias")),
        single_hops=hops("single_hops"), new_single_hops=hops("new_single_hops"))


def parse_longform(rec: _Rec) -> EditCase:
    """EditEverything / UnKE (AnyEdit, 2502.05628): a question and a long answer.

    The whole question is the subject (prompt template "{}"): AnyEdit edits at the last
    token of the question, which is the last subject token in this representation.
    """
    question = rec.text("question")
    answer = rec.text("answer").strip()
    subs = rec.texts("sub_question")
    sub_answers = rec.texts("sub_answer")
    return _single(_request(
        rec, subject=question, prompt="{}", target_new=answer, long_target=answer,
        category=str(rec.raw["category"]) if rec.raw.get("category") else None,
        paraphrase_prompts=rec.texts("para_question"),
        portability=tuple(LabeledPrompt(q, a) for q, a in zip(subs, sub_answers))))


# (name, detector over a record's keys, parser); first match wins, so order matters.
FORMATS: list[tuple[str, Callable[[Mapping], bool], Callable[[_Rec], EditCase]]] = [
    ("mquake", lambda r: isinstance(r.get("requested_rewrite"), list) and "questions" in r, parse_mquake),
    ("evoke", lambda r: isinstance(r.get("requested_rewrite"), Mapping) and (
        "prefix_distraction" in r or "relation_specificity" in r
        or "data_augmentation_prompt_para" in r["requested_rewrite"]), parse_evoke),
    ("counterfact", lambda r: isinstance(r.get("requested_rewrite"), Mapping), parse_counterfact),
    ("zsre", lambda r: "src" in r and "alt" in r, parse_zsre),
    ("counterfact-flat", lambda r: "locality_prompt" in r and "prompt" in r, parse_counterfact_flat),
    ("knowedit", lambda r: "prompt" in r and "target_new" in r and (
        isinstance(r.get("locality"), Mapping) or isinstance(r.get("portability"), Mapping)), parse_knowedit),
    ("counterfact-flat", lambda r: {"prompt", "subject", "target_new", "ground_truth"} <= r.keys(),
     parse_counterfact_flat),
    ("longform", lambda r: "question" in r and "answer" in r, parse_longform),
]
_PARSERS = {name: parse for name, _, parse in FORMATS}


def detect_format(records: Iterable[Any], file: str = "<data>") -> str:
    """The format of a list of records, judged by the first few records' keys."""
    votes: dict[str, int] = {}
    for rec in list(records)[:20]:
        if not isinstance(rec, Mapping):
            continue
        for name, match, _ in FORMATS:
            if match(rec):
                votes[name] = votes.get(name, 0) + 1
                break
    if not votes:
        names = ", ".join(dict.fromkeys(n for n, _, _ in FORMATS))
        raise BadInputError(f"unrecognised edit-data format (supported: {names})", file=file)
    return max(votes, key=votes.get)


def read_dataset(path: str | Path, *, format: str | None = None,
                 skip_invalid: bool = False, strict: bool = False,
                 zsre_convention: str = "mend") -> EditDataset:
    """Read and validate a benchmark file. `format=None` detects it from the content;
    `zsre_convention` chooses how zsRE records become requests (see `parse_zsre`).

    Duplicate case ids are reported in `EditDataset.warnings` (and logged) by default; with
    `strict=True` the first duplicate raises `BadInputError` naming its record."""
    file = str(path)
    records = read_records(path)
    if not records:
        raise BadInputError("holds no records", file=file)
    fmt = format or detect_format(records, file)
    if fmt not in _PARSERS:
        raise BadInputError(f"unknown format {fmt!r} (supported: {', '.join(_PARSERS)})", file=file)
    parse = _PARSERS[fmt]
    if fmt == "zsre":
        parse = functools.partial(parse_zsre, convention=zsre_convention)
    elif zsre_convention not in ZSRE_CONVENTIONS:
        raise BadInputError(f"unknown zsRE convention {zsre_convention!r} (choose {' or '.join(ZSRE_CONVENTIONS)})",
                            field="zsre_convention")
    cases, problems, warnings, first = [], [], [], {}
    for i, raw in enumerate(records):
        try:
            case = parse(_Rec(raw, file, i))
        except BadInputError as e:
            if not skip_invalid:
                raise
            problems.append(str(e))
            continue
        if case.case_id in first:
            err = BadInputError(f"duplicate case id {case.case_id!r} (first at record {first[case.case_id]})",
                                file=file, record=i, field="case_id")
            if strict:
                raise err
            warnings.append(str(err))
        else:
            first[case.case_id] = i
        cases.append(case)
    if warnings:
        log.warning("%s: %d duplicate case id(s), e.g. %s (refused with --strict)", file, len(warnings),
                    warnings[0])
    return EditDataset(path=file, format=fmt, cases=tuple(cases), records=len(records),
                       problems=tuple(problems), warnings=tuple(warnings))
