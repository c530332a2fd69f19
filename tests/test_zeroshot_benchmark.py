"""benchmarks/zeroshot.py: its configurations and its table (the runs themselves take a CPU-hour)."""
import importlib.util
import json
import os

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
