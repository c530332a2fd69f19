"""benchmarks/zeroshot.py: its configurations and its table (the runs themselves take a CPU-hour)."""
import argparse
import dataclasses
import importlib.util
import json
import os

import pytest

from lowrank_engine import checkpoint, job
from test_quality_benchmark import _protocol_args as protocol_args, _quality

HERE = os.path.dirname(os.path.abspath(__file__))


def _zeroshot():
    spec = importlib.util.spec_from_file_location("zeroshot_benchmark",
                                                  os.path.join(HERE, "..", "benchmarks", "zeroshot.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dense_once_then_each_method_at_each_ratio(tmp_path):
    bench = _zeroshot()
    args = bench.parse_args(["--work-dir", str(tmp_path), "--methods", "dense,svd-llm,best", "--ratios", "0.2,0.4"])
    assert bench.configs(args) == [("dense", 0.0), ("svd-llm", 0.2), ("svd-llm", 0.4), ("best", 0.2), ("best", 0.4)]


def test_table_has_one_record_per_model_and_task(tmp_path):
    bench = _zeroshot()
    args = bench.parse_args(["--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), "--limit", "7",
                          "--methods", "dense,svd-llm", "--ratios", "0.4"])
    os.makedirs(tmp_path / "work" / "scores")
    for method, ratio in bench.configs(args):
        rows = [{"method": method, "ratio": ratio, "task": task, "acc": 0.5, "acc_norm": None if task == "lambada_openai"
                 else 0.25, "n": 7, "cpu": "Test CPU", "lm_eval": "0.4.x"} for task in bench.TASKS.split(",")]
        with open(bench.score_file(args, method, ratio), "w") as f:
            json.dump(rows, f)
    bench.write_table(args)
    records = json.loads((tmp_path / "out" / "zeroshot.json").read_text())
    assert len(records) == 10 and {"method", "ratio", "task", "acc", "acc_norm", "n"} <= set(records[0])
    text = (tmp_path / "out" / "zeroshot.md").read_text()
    assert "the first 7 documents of each task" in text and "Test CPU" in text and "| svd-llm" in text


def test_kept_checkpoints_save_the_rows_job_and_zeroshot_scores_that_job(tiny_checkpoint, tmp_path):
    """--keep-checkpoints makes a row a saved job; zeroshot.py compresses a configuration with the same job,
    into the directory it scores, without perplexity or error report."""
    quality, zeroshot = _quality(), _zeroshot()
    kept = quality.row_job(protocol_args(keep_checkpoints=str(tmp_path / "kept")), "best", 0.2)
    assert kept == dataclasses.replace(quality.row_spec(protocol_args(), "best", 0.2), save=True,
                                       output=str(tmp_path / "kept" / "best_0.2"))
    assert quality.row_job(protocol_args(keep_checkpoints="x"), "dense", 0.0) == quality.row_spec(
        protocol_args(), "dense", 0.0)
    args = zeroshot.parse_args(["--work-dir", str(tmp_path / "zs"), "--method", "best", "--ratio", "0.2"])
    spec = zeroshot.compression_job(args)
    assert spec == dataclasses.replace(quality.row_spec(protocol_args(model=args.model), "best", 0.2), save=True,
                                       output=zeroshot.checkpoint_dir(args, "best", 0.2), eval_sets=(),
                                       track_error=False)
    assert spec.output == str(tmp_path / "zs" / "checkpoints" / "best_0.2")
    tiny = dataclasses.replace(spec, method="svd-llm", preset=None, refine=False, model=str(tiny_checkpoint / "model"),
                               calibration=str(tiny_checkpoint / "calib.txt"), nsamples=4, seqlen=32, batch_size=2)
    record = job.run_job(tiny)
    assert "wikitext2_ppl" not in record and record["track_error"] is False
    assert checkpoint.load(spec.output)[1]["method"] == "svd-llm"


def test_a_kept_checkpoint_of_another_job_is_refused_and_a_stale_score_is_redone(tiny_checkpoint, tmp_path,
                                                                                  monkeypatch):
    """The work directory is keyed by label; a checkpoint whose stored settings are not what the label resolves
    to now (a preset changed) is refused, and a score made for other settings is scored again."""
    zeroshot = _zeroshot()
    args = zeroshot.parse_args(["--work-dir", str(tmp_path / "zs"), "--methods", "best", "--ratios", "0.2",
                                "--limit", "2"])
    spec = zeroshot.compression_job(argparse.Namespace(**{**vars(args), "method": "best", "ratio": 0.2}))
    tiny = dataclasses.replace(spec, method="svd-llm", preset=None, refine=False, model=str(tiny_checkpoint / "model"),
                               calibration=str(tiny_checkpoint / "calib.txt"), nsamples=4, seqlen=32, batch_size=2)
    job.run_job(tiny)
    with pytest.raises(SystemExit, match=r"other settings than best at 0.2 resolves to now \(.*preset.*refine.*\)"):
        zeroshot.run_compressions(args)
    # the same label resolving to the job that made the checkpoint: kept, and its old score is redone
    monkeypatch.setattr(zeroshot, "compression_job", lambda a: dataclasses.replace(tiny, eval_sets=("wikitext2",)))
    zeroshot.run_compressions(args)
    os.makedirs(tmp_path / "zs" / "scores")
    with open(zeroshot.score_file(args, "best", 0.2), "w") as f:
        json.dump([{"method": "best", "ratio": 0.2, "task": "arc_easy", "acc": 0.0}], f)  # no settings: stale
    scored = []
    monkeypatch.setattr(zeroshot, "score_one", lambda a, m, r: scored.append(m) or [{"method": m, "task": "t"}])
    zeroshot.run_scoring(args)
    zeroshot.run_scoring(args)  # now current: not scored again
    assert scored == ["best"]
    saved = json.loads(open(zeroshot.score_file(args, "best", 0.2)).read())
    assert saved[0]["settings"] == job.settings(tiny, evaluation=False)


def test_zeroshot_average_is_over_every_task_and_relative_to_dense():
    average = _zeroshot().average_accuracy
    rec = lambda m, ratio, task, acc: {"method": m, "ratio": ratio, "task": task, "acc": acc}  # noqa: E731
    records = [rec("dense", 0.0, "a", 0.5), rec("dense", 0.0, "b", 0.3), rec("best", 0.2, "a", 0.4),
               rec("best", 0.2, "b", 0.2), rec("svd", 0.2, "a", 0.9)]  # svd lacks task b: no average
    rows = {(r["method"], r["ratio"]): r for r in average(records, ["a", "b"])}
    assert set(rows) == {("dense", 0.0), ("best", 0.2)}
    assert rows["best", 0.2]["mean_acc"] == pytest.approx(0.3) and rows["best", 0.2]["of_dense"] == pytest.approx(0.75)
    assert average(records[2:4], ["a", "b"])[0]["of_dense"] is None  # dense not scored
