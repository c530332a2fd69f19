"""The quality benchmark's row names and its per-block error plot (the runs themselves live in benchmarks/)."""
import dataclasses
import importlib.util
import os

import pytest

from lowrank_engine import checkpoint, job, report

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "..", "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quality():
    return _load("quality")


def _row(quality, label: str, ratio: float = 0.4) -> job.JobSpec:
    """The job a row label runs on the protocol (the parser's defaults)."""
    return quality.row_spec(quality.build_parser().parse_args([]), label, ratio)


def test_row_names_give_method_search_refinement_and_allocation():
    quality = _quality()
    row = _row(quality, "saes:fixed")
    assert (row.method, row.beta_search, row.refine, row.rank_alloc, row.ratio) == ("saes", "fixed", False, "uniform", 0.4)
    row = _row(quality, "aa-svd+refine+waterfill")
    assert (row.method, row.refine, row.rank_alloc, row.refine_passes) == ("aa-svd", True, "waterfill", 3)
    preset, row = job.PRESETS["best"], _row(quality, "best")
    assert (row.preset, row.method, row.refine, row.rank_alloc) == ("best", preset["method"], preset["refine"],
                                                                    preset["rank_alloc"])
    chosen = job.preset_fields("best", row.ratio)  # the tuning, with what the preset sets at this ratio
    assert {k: getattr(row, k) for k in preset["tuning"]} == {k: chosen[k] for k in preset["tuning"]}
    assert (row.calibration, row.nsamples, row.seqlen, row.eval_sets) == ("c4", 64, 512, ("wikitext2", "c4", "c4-select"))
    with pytest.raises(ValueError, match="unknown modifier"):
        _row(quality, "svd-llm+finetune")


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


def _write_table(tmp_path, devices, peer_runs=None):
    import argparse

    quality = _quality()
    args = argparse.Namespace(out_dir=str(tmp_path), protocol="p", model="m", nsamples=4, seqlen=8, seed=0,
                              wikitext_windows=2, c4_windows=2, eval_seqlen=8, blocks=None, refine_passes=3,
                              plot_methods="svd-llm", plot_ratio=0.4, peer_runs=peer_runs)
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


def test_side_by_side_table_pairs_only_peer_runs_of_the_same_machine(tmp_path):
    amd, intel = "cpu (2 cores, AMD EPYC)", "cpu (2 cores, Intel Xeon)"
    peer = {"protocol": "p", "method": "svd-llm", "ratio": 0.4, "refine_passes": None, "wikitext2_ppl": 11.0,
            "c4_ppl": 21.0}
    # engine rows: 60 s on AMD, 120 s on Intel; the peer ran only on Intel (240 s) and on a third machine
    text = _write_table(tmp_path, [amd, intel], peer_runs=[{**peer, "device": intel, "compress_seconds": 240.0},
                                                            {**peer, "device": "gpu", "compress_seconds": 1.0}])
    section = text.split("## Side by side", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| svd-llm")]
    assert len(rows) == 1 and intel in rows[0]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[3:5] + cells[6:7] == ["120.00", "240.00", "2.00"]  # engine s, peer s, speedup
    other_passes = [{**peer, "device": intel, "compress_seconds": 240.0, "refine_passes": 25}]
    assert "## Side by side" not in _write_table(tmp_path, [intel], peer_runs=other_passes)
    assert "## Side by side" not in _write_table(tmp_path, [intel])


def _protocol_args(**overrides):
    """The benchmark's own options (its parser's defaults are the protocol), quiet, with `overrides`."""
    args = _quality().build_parser().parse_args(["--quiet", "--model", "m"])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


PROTOCOL_SPEC = dict(model="m", calibration="c4", nsamples=64, seqlen=512, seed=0,
                     eval_sets=("wikitext2", "c4", "c4-select"), eval_windows={"wikitext2": 128, "c4": 64, "c4-select": 16},
                     eval_seqlen=512, batch_size=8, device="cpu",
                     save=False, fidelity_samples=0, plot=False, progress=False, track_error=True)


def test_a_rows_job_is_a_jobspec_of_the_protocol(tmp_path):
    quality = _quality()
    args = _protocol_args()
    assert quality.row_spec(args, "saes:fixed", 0.4) == job.JobSpec(**PROTOCOL_SPEC, method="saes",
                                                                     beta_search="fixed", ratio=0.4)
    assert quality.row_spec(args, "aa-svd+refine+waterfill", 0.2) == job.JobSpec(
        **PROTOCOL_SPEC, method="aa-svd", ratio=0.2, refine=True, refine_passes=3, rank_alloc="waterfill")
    best = quality.row_spec(_protocol_args(refine_passes=25), "best", 0.4)  # --refine-passes is for +refine rows
    assert best == job.expand_preset(job.JobSpec(**PROTOCOL_SPEC, method="best", ratio=0.4))
    assert (best.method, best.preset, best.refine) == ("svd-llm", "best", True)
    assert best.refine_passes == job.PRESETS["best"]["tuning"]["refine_passes"] != 25
    memory = quality.row_spec(args, "svd-llm", 0.4, output=str(tmp_path / "ckpt"))
    assert memory == job.JobSpec(**{**PROTOCOL_SPEC, "save": True, "eval_sets": ()}, output=str(tmp_path / "ckpt"),
                                 method="svd-llm", ratio=0.4)
    assert quality.row_spec(args, "dense", 0.0) == job.JobSpec(**PROTOCOL_SPEC)  # evaluated only


def _other_value(f, kind):
    """A value of the field's type that is not its default."""
    from lowrank_engine import config

    default = config.field_default(f)
    if kind is bool:
        return not default
    samples = {int: (7, 9), float: (0.37, 0.41), str: ("x-7", "x-9"), tuple: (("c4",), ("wikitext2",)),
               dict: ({"a.b": 3}, {"a.b": 5})}[kind]
    return next(v for v in samples if v != default)


def test_every_jobspec_field_reaches_the_child_unchanged(tmp_path):
    """The child reads its job from JSON: any JobSpec field, a new one included, arrives as it was set."""
    from lowrank_engine import config

    quality = _quality()
    spec = job.JobSpec(**{f.name: _other_value(f, config.field_type(job.JobSpec, f.name))
                          for f in dataclasses.fields(job.JobSpec)})
    quality.write_spec(spec, str(tmp_path / "spec.json"))
    back = quality.read_spec(str(tmp_path / "spec.json"))
    assert back == spec
    for f in dataclasses.fields(job.JobSpec):
        assert getattr(back, f.name) != config.field_default(f), f.name


def test_table_says_which_rows_timed_the_error_report(tmp_path):
    import argparse

    quality = _quality()
    args = argparse.Namespace(out_dir=str(tmp_path), protocol="p", model="m", nsamples=4, seqlen=8, seed=0,
                              wikitext_windows=2, c4_windows=2, eval_seqlen=8, blocks=None, refine_passes=3,
                              plot_methods="svd-llm", plot_ratio=0.4, peer_runs=None)
    row = {"ratio": 0.4, "wikitext2_ppl": 10.0, "c4_ppl": 20.0, "compress_seconds": 60.0, "protocol": "p",
           "device": "cpu"}
    records = [{**row, "method": "dense", "ratio": 0.0},
               {**row, "method": "svd-llm", "track_error": True, "stage_seconds": {"error_tracking": 9.0}},
               {**row, "method": "svd", "track_error": False, "stage_seconds": {"solve": 1.0}},
               {**row, "method": "asvd", "error_tracking_seconds": 12.0},  # older code timed it apart
               {**row, "method": "aa-svd", "error_tracking_seconds": 0.0},  # two streams: nothing to time apart
               {**row, "method": "fwsvd"}]  # older still: counted in compress_seconds
    quality.write_outputs(args, records)
    import json

    flat = {r["method"]: r for r in json.loads((tmp_path / "quality.json").read_text())}
    assert [flat[m]["error_report"] for m in ("dense", "svd-llm", "svd", "asvd", "aa-svd", "fwsvd")] == \
        [None, "on", "off", "excluded", "on", "on"]
    assert flat["svd-llm"]["error_tracking_seconds"] == 9.0 and flat["asvd"]["error_tracking_seconds"] == 12.0
    assert flat["svd-llm"]["stage_seconds"] == {"error_tracking": 9.0}
    text = (tmp_path / "quality.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "| error_report |" in header and "| excluded |" in text and "error report on" in text


def test_a_row_runs_through_the_jobs_code(tiny_checkpoint, tmp_path):
    """A row's child compresses with job.run_job (the CLI's code): in memory and evaluated, or (the memory
    protocol) streamed to a checkpoint in its own process, its job read from JSON."""
    quality = _quality()
    args = _protocol_args(model=str(tiny_checkpoint / "model"), nsamples=4, seqlen=32, batch_size=2)
    calibration = {"calibration": str(tiny_checkpoint / "calib.txt"), "eval_sets": ()}  # no data set needed
    spec = dataclasses.replace(quality.row_spec(args, "svd-llm", 0.3), **calibration)
    record = quality.run_one("svd-llm", spec, "p")
    assert record["method"] == "svd-llm" and record["protocol"] == "p" and record["track_error"] is True
    assert "error_tracking" in record["stage_seconds"] and record["compress_seconds"] >= 0
    assert len(record["layer_errors"]) == 2 and all(e > 0 for e, _ in record["layer_errors"])
    assert record["calibration"] == f"{tiny_checkpoint / 'calib.txt'} 4x32 seed 0"
    assert "model" not in record and "output" not in record and record["refine_passes"] is None
    out = tmp_path / "ckpt"
    streamed = dataclasses.replace(quality.row_spec(args, "svd-llm", 0.3, output=str(out)), **calibration)
    record = quality.run_child("svd-llm", streamed, "memory")
    assert record["protocol"] == "memory" and record["peak_rss_mb"] > 0 and "wikitext2_ppl" not in record
    assert checkpoint.load(str(out))[1]["method"] == "svd-llm"


def test_row_label_overrides_apply_after_the_preset():
    """'best@method=svd-llm' is the best preset (its refinement schedule) started from svd-llm; an override
    names a JobSpec field and is read with that field's type; a bad one is refused in one line."""
    quality = _quality()
    fields, overrides = quality.row_fields("best@method=svd-llm@refine_lr=0.003@refine=false")
    assert fields == {"method": "best"} and overrides == {"method": "svd-llm", "refine_lr": 0.003, "refine": False}
    row = _row(quality, "best@method=svd-llm")
    assert row.method == "svd-llm" and row.refine and row.refine_micro_batch == 1 and row.refine_lr == 1e-3
    assert _row(quality, "best@refine_lr=0.003").refine_lr == 0.003
    with pytest.raises(ValueError, match="@field=value"):
        quality.row_fields("best@no_such_field=1")


def test_ablation_rows_have_their_own_table(tmp_path):
    """Rows named in ABLATION at its ratio go to the ablation table, '@' variants only there; each says
    whether the current code measured it, and which ingredients it has."""
    from lowrank_engine import job

    quality = _quality()
    tuning = job.preset_fields("best", quality.ABLATION_RATIO)
    rec = lambda m, ppl, **kw: {"method": m, "ratio": 0.4, "wikitext2_ppl": ppl, "c4_ppl": ppl / 2,  # noqa: E731
                                "compress_seconds": 1.0, "protocol": quality.PROTOCOL, "device": "cpu", **kw}
    uniform = quality._UNIFORM  # the rows measured before `best` allocated ranks by type
    three, aa_three = ("best@refine_passes=3@distill_passes=0" + uniform,
                       "best@method=aa-svd@refine_passes=3@distill_passes=0" + uniform)
    no_distill, one_pass = "best@distill_passes=0" + uniform, "best@refine_passes=1@distill_passes=1" + uniform
    records = [rec("aa-svd", 576.0),
               rec("best", 150.0, refine_passes=tuning["refine_passes"], track_error=True, start="svd-llm",
                   distill_passes=tuning["distill_passes"], **{"c4-select_ppl": 55.5}),
               rec("best" + uniform, 170.0, refine_passes=tuning["refine_passes"], track_error=True, start="svd-llm",
                   distill_passes=tuning["distill_passes"], **{"c4-select_ppl": 58.25}),
               rec(no_distill, 190.0, refine_passes=tuning["refine_passes"], track_error=True,
                   start="svd-llm", **{"c4-select_ppl": 60.75}),
               rec(three, 205.0, refine_passes=3, track_error=True, start="svd-llm", **{"c4-select_ppl": 61.5}),
               rec(aa_three, 300.0, refine_passes=3, track_error=True, start="aa-svd", **{"c4-select_ppl": 70.25}),
               rec(one_pass, 160.0, refine_passes=1, track_error=True, start="svd-llm")]
    toggle = quality.ABLATION[-1][0]  # the kept dense matrices the other way than `best` at this ratio
    kept = {"rank_alloc": "type-waterfill-dense"}
    records[1]["settings"] = {**kept, "refine_dense_lr_ratio": tuning["refine_dense_lr_ratio"]}
    other = 0.1 if tuning["refine_dense_lr_ratio"] == 0 else 0.0
    records.append(rec(toggle, 149.0, refine_passes=tuning["refine_passes"], track_error=True, start="svd-llm",
                       settings={**kept, "refine_dense_lr_ratio": other}))
    args = _protocol_args(out_dir=str(tmp_path), protocol=quality.PROTOCOL, plot_methods="best")
    quality.write_outputs(args, records)
    md = (tmp_path / "quality.md").read_text()
    main, rest = md.split("## Ablation")
    ablation, starts = rest.split("## `best`'s starting point")
    assert f"| {three} |" not in main and f"| {three} |" in ablation
    rows = {line.split("|")[1].strip(): line for line in ablation.splitlines() if line.startswith("| ")}
    assert "older" in rows["aa-svd"] and "current" in rows["best"] and "per-window" in rows["best"]
    assert "55.50" in rows["best"] and "60.75" in rows[no_distill] and "61.50" in rows[three]
    cells = lambda row: [c.strip() for c in row.split("|")]  # noqa: E731
    uniform_row = "best" + uniform
    assert cells(rows["best"])[3] == job.PRESETS["best"]["rank_alloc"] and cells(rows[uniform_row])[3] == "uniform"
    assert "58.25" in rows[uniform_row]
    assert cells(rows["best"])[4] == ("frozen" if other else f"trained, {tuning['refine_dense_lr_ratio']:g}× lr")
    assert cells(rows[toggle])[4] == ("trained, 0.1× lr" if other else "frozen") and cells(rows[uniform_row])[4] == "-"
    assert cells(rows["best"])[6] == quality._BEST_DISTILL
    assert quality._BEST_DISTILL.startswith(f"{tuning['distill_passes']} passes, lr ")
    assert cells(rows[no_distill])[6] == "off"
    assert f"{tuning['refine_passes']} passes" in cells(rows["best"])[5] and "3 passes" in cells(rows[three])[5]
    assert "1 pass" in cells(rows[one_pass])[5]  # a label that sets the passes
    starts = {line.split("|")[1].strip(): line for line in starts.splitlines() if line.startswith("| ")}
    assert set(starts) == {"method", three, aa_three}
    assert "| svd-llm |" in starts[three] and "| aa-svd |" in starts[aa_three] and "70.25" in starts[aa_three]

def test_a_cached_row_is_reused_only_while_its_resolved_settings_hold(tmp_path, monkeypatch):
    """The runs cache is keyed by the row's label; a row whose resolved job changed since (a preset's new
    setting, here `best`'s tuning) runs again instead of being reused."""
    quality = _quality()
    args = _protocol_args(runs_dir=str(tmp_path), keep_checkpoints=None)
    ran = []

    def fake_child(label, spec, protocol):
        ran.append((label, spec.distill_lr))
        return {"method": label, "ratio": spec.ratio, "wikitext2_ppl": 1.0, "c4_ppl": 1.0, "compress_seconds": 0.0}

    monkeypatch.setattr(quality, "run_child", fake_child)
    quality.run_configs(args, [("best", 0.4)])
    quality.run_configs(args, [("best", 0.4)])
    assert len(ran) == 1  # the second call reads the cache
    tuning = job.PRESETS["best"]["tuning"]
    changed = tuning["distill_lr"] * 3
    monkeypatch.setitem(job.PRESETS, "best", {**job.PRESETS["best"], "tuning": {**tuning, "distill_lr": changed}})
    records = quality.run_configs(args, [("best", 0.4)])
    assert ran[-1] == ("best", changed) and len(ran) == 2
    assert records[0]["settings"]["distill_lr"] == changed
