"""Edit-data readers: format detection, conversion, validation errors, and the real files."""

import json

import pytest

from kedit_core.data import load_builtin, read_dataset
from kedit_core.errors import BadInputError

from conftest import shared_file

ROME = {"case_id": 7, "requested_rewrite": {
    "prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "relation_id": "P131",
    "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
    "paraphrase_prompts": ["Tourists visit The Eiffel Tower in"],
    "neighborhood_prompts": ["The Louvre is located in the city of"],
    "attribute_prompts": ["The Colosseum is located in the city of"],
    "generation_prompts": ["The Eiffel Tower is"],
    "portability": {"New Question": "Which country is the Eiffel Tower in?", "New Answer": "Italy"}}
FLAT = {"case_id": 1, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
        "subject": "Danielle Darrieux", "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux spoke the language",
        "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "rephrase":
        "What does UniFirst make?", "alt": "unmanned aircraft", "answers": ["uniform"],
        "loc": "nq question: who sang hey jude", "loc_ans": "The Beatles"}
MQUAKE = {"case_id": 3, "requested_rewrite": [
    {"prompt": "{} was performed by", "subject": "Hey Jude", "target_new": {"str": "Madonna"},
     "target_true": {"str": "The Beatles"}, "question": "Who performed Hey Jude?"},
    {"prompt": "{} is a citizen of", "subject": "Madonna", "target_new": {"str": "Australia"},
     "target_true": {"str": "United States"}}],
    "questions": ["Which country is the performer of Hey Jude a citizen of?"],
    "answer": "United Kingdom", "answer_alias": ["UK"], "new_answer": "Australia", "new_answer_alias": [],
    "single_hops": [{"question": "q", "cloze": "Hey Jude was performed by", "answer": "The Beatles"}],
    "new_single_hops": [{"question": "q", "cloze": "Hey Jude was performed by", "answer": "Madonna"}]}
LONG = {"id": 0, "question": "What is 2+2?", "answer": "It is four, because two and two make four.",
        "category": "math"}
UNKE = {"id": 1, "question": "Why is the sky blue?", "para_question": "What makes the sky blue?",
        "answer": "Rayleigh scattering.", "sub_question": ["What scatters?"], "sub_answer": ["Air"]}
KNOWEDIT = {"subject": "Goursez Vreizh", "prompt": "The country of Goursez Vreizh is",
            "target_new": "Franche-Comte", "ground_truth": "France",
            "portability": {"Reasoning": [{"prompt": "Its capital is", "ground_truth": "Besancon"}]},
            "locality": {"Relation_Specificity": [{"prompt": "Its founder is",
                                                   "ground_truth": [["Jean Le Fustec"], ["JLF"]]}]}}
EVOKE = dict(ROME, prefix_distraction=["The Eiffel Tower is in Rome. The Louvre is in"])
EVOKE["requested_rewrite"] = dict(ROME["requested_rewrite"],
                                  data_augmentation_prompt_para=["{} can be found in"])


def write(tmp_path, name, records, kind="json"):
    p = tmp_path / name
    if kind == "json":
        p.write_text(json.dumps(records))
    elif kind == "jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(records), p)
    return p


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet"])
def test_counterfact_rome_in_every_container(tmp_path, kind):
    ds = read_dataset(write(tmp_path, f"cf.{kind}", [ROME, ROME], kind))
    assert ds.format == "counterfact" and ds.records == 2
    r = ds.requests[0]
    assert (r.subject, r.prompt, r.target_new, r.target_true) == (
        "The Eiffel Tower", "{} is located in the city of", "Rome", "Paris")
    assert r.text == "The Eiffel Tower is located in the city of"
    assert r.paraphrase_prompts == ("Tourists visit The Eiffel Tower in",)
    assert r.neighborhood[0].prompt.startswith("The Louvre") and r.neighborhood[0].answer == "Paris"
    assert r.portability[0].answer == "Italy"
    assert r.case_id == "7" and r.source.endswith("#0")


def test_flat_counterfact(tmp_path):
    r = read_dataset(write(tmp_path, "flat.json", [FLAT])).requests[0]
    assert r.prompt == "The mother tongue of {} is" and r.target_true == "French"
    assert r.neighborhood[0].answer == "French"
    assert read_dataset(tmp_path / "flat.json").format == "counterfact-flat"


def test_zsre(tmp_path):
    ds = read_dataset(write(tmp_path, "z.json", [ZSRE]))
    r = ds.requests[0]
    assert ds.format == "zsre"
    assert r.prompt == "What is the product made by {}?" and r.target_new == "unmanned aircraft"
    assert r.target_true == "uniform" and r.neighborhood[0].answer == "The Beatles"


def test_mquake_case_groups_requests(tmp_path):
    ds = read_dataset(write(tmp_path, "m.json", [MQUAKE]))
    assert ds.format == "mquake" and len(ds.cases) == 1 and len(ds.requests) == 2
    c = ds.cases[0]
    assert [r.case_id for r in c.requests] == ["3.0", "3.1"]
    assert c.new_answer.answer == "Australia" and c.answer.aliases == ("UK",)
    assert c.multi_hop_questions[0].startswith("Which country")
    assert c.new_single_hops[0].answer == "Madonna"


def test_longform_editeverything_and_unke(tmp_path):
    r = read_dataset(write(tmp_path, "e.json", [LONG])).requests[0]
    assert r.long_target == r.target_new == LONG["answer"] and r.text == LONG["question"]
    u = read_dataset(write(tmp_path, "u.json", [UNKE])).requests[0]
    assert u.paraphrase_prompts == ("What makes the sky blue?",)
    assert u.portability[0].answer == "Air"


def test_knowedit_answers_flattened(tmp_path):
    ds = read_dataset(write(tmp_path, "k.json", [KNOWEDIT]))
    r = ds.requests[0]
    assert ds.format == "knowedit" and r.target_true == "France"
    assert r.neighborhood[0].answer == "Jean Le Fustec" and r.neighborhood[0].aliases == ("JLF",)
    assert r.portability[0].answer == "Besancon"
    assert dict(r.probes)["locality.Relation_Specificity"][0].prompt == "Its founder is"


def test_evoke_probes(tmp_path):
    ds = read_dataset(write(tmp_path, "ev.json", [EVOKE]))
    probes = dict(ds.requests[0].probes)
    assert ds.format == "evoke"
    assert probes["prefix_distraction"][0].answer == "Paris"
    assert probes["paraphrase_aug"][0].prompt == "The Eiffel Tower can be found in"


def test_format_detection_ignores_file_name(tmp_path):
    p = write(tmp_path, "zsre_but_really_counterfact.json", [ROME])
    assert read_dataset(p).format == "counterfact"


# ------------------------------------------------------------------ validation errors
def bad(**changes):
    rec = json.loads(json.dumps(FLAT))
    for k, v in changes.items():
        if v is None:
            rec.pop(k)
        else:
            rec[k] = v
    return rec


@pytest.mark.parametrize("record, field, reason", [
    (bad(subject=None), "subject", "missing"),
    (bad(target_new=""), "target_new", "empty"),
    (bad(target_new=5), "target_new", "expected str"),
    (bad(prompt="The mother tongue of someone else is"), "prompt", "does not occur"),
    (bad(rephrase_prompt=[1, 2]), "rephrase_prompt[0]", "expected str"),
    (bad(ground_truth="  "), "ground_truth", "empty"),
])
def test_invalid_record_names_file_record_and_field(tmp_path, record, field, reason):
    p = write(tmp_path, "d.json", [FLAT, record])
    with pytest.raises(BadInputError) as e:
        read_dataset(p)
    msg = str(e.value)
    assert str(p) in msg and "record 1" in msg and f"field '{field}'" in msg and reason in msg
    assert "\n" not in msg
    assert (e.value.record, e.value.field) == (1, field)


def test_rome_template_problems(tmp_path):
    rec = json.loads(json.dumps(ROME))
    rec["requested_rewrite"]["prompt"] = "{} and {} are in"
    with pytest.raises(BadInputError, match="exactly one"):
        read_dataset(write(tmp_path, "a.json", [rec]))
    rec["requested_rewrite"]["prompt"] = "Somewhere is"
    with pytest.raises(BadInputError, match=r"requested_rewrite\.prompt.*does not occur"):
        read_dataset(write(tmp_path, "b.json", [rec]))
    rec = json.loads(json.dumps(ROME))
    del rec["requested_rewrite"]["target_new"]
    with pytest.raises(BadInputError, match=r"requested_rewrite\.target_new"):
        read_dataset(write(tmp_path, "c.json", [rec]))


def test_non_object_record_and_bad_files(tmp_path):
    with pytest.raises(BadInputError, match="record 1.*expected an object"):
        read_dataset(write(tmp_path, "a.json", [FLAT, "oops"]))
    p = tmp_path / "broken.json"
    p.write_text('[{"prompt": ')
    with pytest.raises(BadInputError, match="broken.json.*not valid JSON"):
        read_dataset(p)
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(FLAT) + "\n{nope\n")
    with pytest.raises(BadInputError, match="line 2"):
        read_dataset(p)
    with pytest.raises(BadInputError, match="unrecognised edit-data format"):
        read_dataset(write(tmp_path, "x.json", [{"foo": 1}]))
    with pytest.raises(BadInputError, match="no such file"):
        read_dataset(tmp_path / "missing.json")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(BadInputError, match="parquet"):
        read_dataset(tmp_path / "bad.parquet")


def test_skip_invalid_reports_and_skips(tmp_path):
    p = write(tmp_path, "d.json", [FLAT, bad(subject=None), FLAT, bad(target_new="")])
    ds = read_dataset(p, skip_invalid=True)
    assert len(ds.cases) == 2 and ds.records == 4 and len(ds.problems) == 2
    assert "record 1" in ds.problems[0] and "record 3" in ds.problems[1]


# ------------------------------------------------------------------ the built-in set
def test_builtin_set_is_complete_and_valid():
    ds = load_builtin()
    reqs = ds.requests
    assert len(reqs) >= 100
    assert len({r.case_id for r in reqs}) == len(reqs)
    for r in reqs:
        assert r.subject in r.text and r.target_new != r.target_true
        assert len(r.paraphrase_prompts) == 2 and all(r.subject in p for p in r.paraphrase_prompts)
        assert len(r.neighborhood) == 5
        assert all(n.answer and r.subject not in n.prompt for n in r.neighborhood)
    # Neighbours are never edited by the set itself, so a whole-set stream's locality
    # measures damage, not the set's own later edits.
    edited = {r.text for r in reqs}
    assert not [n.prompt for r in reqs for n in r.neighborhood if n.prompt in edited]
    eiffel = [r for r in reqs if r.subject == "The Eiffel Tower"]
    assert eiffel and eiffel[0].target_new == "Rome" and eiffel[0].target_true == "Paris"


# ------------------------------------------------------------------ the real files
@pytest.mark.shared_data
@pytest.mark.parametrize("rel, fmt, records, requests", [
    ("counterfact/counterfact_portability_gpt4.json", "counterfact", 1031, 1031),
    ("counterfact/counterfact_subject_replace.json", "counterfact", 213, 213),
    ("zsre/zsre_mend_eval_portability_gpt4.json", "zsre", 1037, 1037),
    ("mquake/MQuAKE-hard.json", "mquake", 429, 429 * 4),
    ("mquake/AKEW_MQuAKE-CF.json", "mquake", 354, None),
    ("anyedit/editevery.json", "longform", 552, 552),
    ("anyedit/UnKE_final_data_v2.json", "longform", 1000, 1000),
    ("evoke/evoke_main_sample100.json", "evoke", 100, 100),
    ("evoke/evoke_subj_spec_sample50.json", "evoke", 50, 50),
    ("knowedit/wiki_counterfact_train_cf.json", "knowedit", 1427, 1427),
    ("knowedit/zsre_ZsRE-test-all.json", "knowedit", 1301, 1301),
    ("knowedit/wiki_recent_recent_train.json", "knowedit", 570, 570),
])
def test_shared_benchmark_files(rel, fmt, records, requests):
    ds = read_dataset(shared_file(rel))
    assert ds.format == fmt and ds.records == records and len(ds.cases) == records
    assert not ds.problems
    if requests is not None:
        assert len(ds.requests) == requests


@pytest.mark.shared_data
def test_real_invalid_records_are_found():
    """zsRE train-1k holds two records with an empty new target ("alt"): reading it fails
    on the first, naming it; --skip-invalid keeps the other 998."""
    path = shared_file("zsre/zsre_mend_train-1k.json")
    with pytest.raises(BadInputError, match="record 534, field 'alt': target must not be empty"):
        read_dataset(path)
    ds = read_dataset(path, skip_invalid=True)
    assert ds.records == 1000 and len(ds.cases) == 998
    assert ["record 534" in ds.problems[0], "record 723" in ds.problems[1]] == [True, True]


@pytest.mark.shared_data
def test_flat_counterfact_all_21919():
    total = 0
    for part in ("train", "edit", "val"):
        ds = read_dataset(shared_file(f"counterfact/counterfact-{part}.json"))
        assert ds.format == "counterfact-flat" and not ds.problems
        total += len(ds.requests)
    assert total == 21919


@pytest.mark.shared_data
def test_real_counterfact_content():
    r = read_dataset(shared_file("counterfact/counterfact_portability_gpt4.json")).requests[0]
    assert r.text == "Spike Hughes originates from" and r.target_new == "Philadelphia"
    assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood) == 10
    assert all(n.answer == "London" for n in r.neighborhood)
    assert r.portability[0].answer == "Cheesesteaks"
