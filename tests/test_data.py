"""Calibration sources and evaluation windows."""
import json
import os
import warnings

import pytest
import torch

from lowrank_engine import data, models

from conftest import SAMPLE_TEXT, tiny_model, tiny_tokenizer


def test_random_windows_follow_the_protocol():
    ids = torch.arange(5000)
    windows = data.random_windows(ids, 7, 64, seed=0)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 5000 - 64 - 1, (7,), generator=g)
    assert torch.equal(windows[:, 0], starts) and torch.equal(windows[:, 63], starts + 63)
    assert torch.equal(data.random_windows(ids, 7, 64, seed=0), windows)
    assert not torch.equal(data.random_windows(ids, 7, 64, seed=1), windows)


def test_consecutive_windows_do_not_overlap():
    w = data.consecutive_windows(torch.arange(1000), 3, 100)
    assert w.shape == (3, 100) and int(w[1, 0]) == 100
    assert data.consecutive_windows(torch.arange(250), 10, 100).shape == (2, 100)
    with pytest.raises(data.DataError, match="fewer than one window"):
        data.consecutive_windows(torch.arange(50), 1, 100)


@pytest.mark.parametrize("ext", [".txt", ".jsonl", ".parquet"])
def test_local_files(tmp_path, ext):
    tok = tiny_tokenizer()
    path = tmp_path / f"calib{ext}"
    docs = [SAMPLE_TEXT[:400], SAMPLE_TEXT[400:900]]
    if ext == ".txt":
        path.write_text("\n\n".join(docs))
    elif ext == ".jsonl":
        path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), path)
    calib = data.load_calibration(str(path), tok, nsamples=3, seqlen=16, seed=2)
    assert calib.input_ids.shape == (3, 16)
    assert calib.describe()["nsamples"] == 3 and calib.describe()["seed"] == 2


def test_bad_files(tmp_path):
    tok = tiny_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(data.DataError, match="bad.jsonl:2"):
        data.load_calibration(str(bad), tok, 1, 4)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(data.DataError, match="'text' field"):
        data.load_calibration(str(nofield), tok, 1, 4)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_calibration(str(tmp_path / "missing.txt"), tok, 1, 4)
    with pytest.raises(data.DataError, match="unknown calibration source"):
        data.load_calibration("pile", tok, 1, 4)


def test_self_calibration_samples_from_the_model():
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    a = data.load_calibration("self", tok, nsamples=3, seqlen=12, seed=5, model=model)
    b = data.load_calibration("self", tok, nsamples=3, seqlen=12, seed=5, model=model)
    assert a.input_ids.shape == (3, 12) and torch.equal(a.input_ids, b.input_ids)
    assert (a.input_ids[:, 0] == tok.bos_token_id).all()
    assert a.source == "self"


def test_cached_decode_matches_the_full_forward_and_uses_the_current_cache_keyword():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = model(input_ids=ids, use_cache=False).logits
        out, cache = models.decode_step(model, ids[:, :4])
        steps = [out.logits[:, -1]]
        for t in range(4, 9):
            out, cache = models.decode_step(model, ids[:, t:t + 1], cache)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 3:], rtol=1e-4, atol=1e-5)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_cached_decode_falls_back_to_the_old_keyword():
    seen = []

    class OldModel(torch.nn.Module):  # a transformers < 5.2x forward: no `cache` keyword
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            seen.append(past_key_values)
            return {"logits": input_ids.float(), "past_key_values": ("kv", len(seen))}

    out, cache = models.decode_step(OldModel(), torch.ones(1, 2, dtype=torch.long))
    _, cache2 = models.decode_step(OldModel(), torch.ones(1, 1, dtype=torch.long), cache)
    assert seen == [None, ("kv", 1)] and cache2 == ("kv", 2)

needs_data = pytest.mark.skipif(not os.environ.get("LOWRANK_ENGINE_DATA"), reason="LOWRANK_ENGINE_DATA unset")


@needs_data
def test_local_named_sets_and_split_convention():
    tok = tiny_tokenizer()
    assert len(data.c4_documents(0, 1000)) == 1000
    assert data.c4_documents(1000, 1001)[0] not in data.c4_documents(0, 1000)
    w = data.evaluation_windows("wikitext2", tok, 4, 64)
    assert w.shape == (4, 64)
    c = data.load_calibration("c4", tok, 2, 32, 0)
    assert c.input_ids.shape == (2, 32) and "docs[0:1000]" in c.summary["documents"]
    # the selection windows: the calibration documents with another seed, never the evaluation windows
    select = data.evaluation_windows("c4-select", tok, 4, 32)
    assert select.shape == (4, 32) and torch.equal(select, data.load_calibration("c4", tok, 4, 32, data.SELECTION_SEED).input_ids)
    assert not torch.equal(select[:2], c.input_ids)


def test_missing_local_file_in_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_ENGINE_DATA", str(tmp_path))
    with pytest.raises(data.DataError, match="has no"):
        data.c4_documents(0, 10)
