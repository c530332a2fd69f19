"""The quality benchmark's row names and its per-block error plot (the runs themselves live in benchmarks/)."""
import importlib.util
import os

import pytest

from lowrank_engine import job, report

HERE = os.path.dirname(os.path.abspath(__file__))


def _quality():
    spec = importlib.util.spec_from_file_location("quality", os.path.join(HERE, "..", "benchmarks", "quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_row_names_parse_into_method_search_refinement_and_allocation():
    parse = _quality().parse_method
    assert parse("saes:fixed") == ("saes", "fixed", False, "uniform", {})
    assert parse("aa-svd+refine+waterfill") == ("aa-svd", "exact", True, "waterfill", {})
    preset = job.PRESETS["best"]
    assert parse("best") == (preset["method"], "exact", preset["refine"], preset["rank_alloc"],
                             preset["refine_options"])
    with pytest.raises(ValueError, match="unknown modifier"):
        parse("svd-llm+finetune")


def test_layer_error_plot_is_a_png(tmp_path):
    series = {"svd-llm": [(0.1 * (i + 1), 0.01 * (i + 1)) for i in range(5)],
              "best": [(0.05 * (i + 1), 0.005 * (i + 1)) for i in range(5)]}
    path = report.plot_layer_errors(series, str(tmp_path / "sub" / "errors.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000


def test_truncated_checkpoint_keeps_the_first_blocks_and_runs_like_them(tiny_checkpoint, tmp_path):
    import torch

    from lowrank_engine import models

    source = str(tiny_checkpoint / "model")
    full, _ = models.load_model(source)
    cut_dir = _quality().truncated_checkpoint(source, 1, str(tmp_path / "cut"))
    cut, tokenizer = models.load_model(cut_dir)
    assert cut.config.num_hidden_layers == 1 and len(models.find_decoder_blocks(cut)[1]) == 1
    assert tokenizer is not None
    # the cut model is the full one without its later blocks
    full.model.layers = full.model.layers[:1]
    ids = torch.randint(0, full.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).logits, full(ids).logits, rtol=0, atol=0)
    with pytest.raises(SystemExit, match="--blocks"):
        _quality().truncated_checkpoint(source, 99, str(tmp_path / "bad"))


def test_cpu_device_names_say_which_cpu(monkeypatch):
    monkeypatch.setattr(report, "cpu_model", lambda: "Test CPU 9000")
    assert report.device_name("cpu") == f"cpu ({os.cpu_count()} cores, Test CPU 9000)"
    monkeypatch.setattr(report, "cpu_model", lambda: "")
    assert report.device_name("cpu") == f"cpu ({os.cpu_count()} cores)"


def _write_table(tmp_path, devices):
    import argparse

    quality = _quality()
    args = argparse.Namespace(out_dir=str(tmp_path), protocol="p", model="m", nsamples=4, seqlen=8, seed=0,
                              wikitext_windows=2, c4_windows=2, eval_seqlen=8, blocks=None, refine_passes=3,
                              plot_methods="svd-llm", plot_ratio=0.4)
    records = [{"method": "svd-llm", "ratio": 0.4, "wikitext2_ppl": 10.0 + i, "c4_ppl": 20.0 + i,
                "compress_seconds": 60.0 * (i + 1), "protocol": "p", "device": d} for i, d in enumerate(devices)]
    quality.write_outputs(args, records)
    return (tmp_path / "quality.md").read_text()


def test_table_names_each_rows_machine_when_records_come_from_several(tmp_path):
    mixed = _write_table(tmp_path, ["cpu (2 cores, AMD EPYC)", "cpu (2 cores, Intel Xeon)"])
    header = next(line for line in mixed.splitlines() if line.startswith("| method"))
    assert header.endswith("| device |")
    assert "| cpu (2 cores, AMD EPYC) |" in mixed and "| cpu (2 cores, Intel Xeon) |" in mixed
    assert "compare only roughly" not in mixed
    one = _write_table(tmp_path, ["cpu (2 cores, AMD EPYC)"] * 2)
    assert "device |" not in one and "Device: cpu (2 cores, AMD EPYC)." in one
    unnamed = _write_table(tmp_path, ["cpu (2 cores)"])  # a record from before CPU models were recorded
    assert "compare only roughly" in unnamed
