"""benchmarks/device_suite.py: its CPU dry run end to end, and the parts that decide what a GPU run reports."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


suite = _load("device_suite")


def test_dry_run_runs_every_step_and_writes_what_comes_back(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET", "LOWRANK_ENGINE_BACKEND")}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "device_suite.py"), "--dry-run",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((tmp_path / "device_suite.json").read_text())
    by = {r["step"]: r for r in summary["records"]}
    assert list(by) == list(suite.STEPS)
    for step in ("build", "kernels", "tests", "whitening", "block"):
        assert by[step]["status"] == "passed", (step, by[step].get("error_tail"))
    vllm = importlib.util.find_spec("vllm") is not None
    assert by["serving"]["status"] != "skipped: vllm not importable" if vllm else by["serving"]["status"] == "skipped: vllm not importable"
    assert by["tests"]["counts"]["passed"] > 0 and not by["tests"]["failed"]
    assert by["kernels"]["measured"] > 0 and by["kernels"]["worst_rel_err"] < 5e-2
    assert by["whitening"]["measured"] > 0 and by["whitening"]["all_finite"]
    assert {r["method"] for r in by["block"]["records"]} == set(suite.BLOCK_METHODS.split(","))
    assert summary["gpu_paths_verified"] is False and summary["dry_run"] is True
    # what the device tool brings back: at most 8 plain files, each naming the device
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(f"{n}.{e}" for n in ("device_suite", "kernels", "whitening", "scale") for e in ("md", "json"))
    device = summary["device"]
    assert device.startswith("cpu (")
    for name in ("device_suite.md", "kernels.md"):
        assert device in (tmp_path / name).read_text()
    assert "cpu" in (tmp_path / "whitening.md").read_text()
    assert device in {r["device"] for r in json.loads((tmp_path / "scale.json").read_text())}


def test_a_step_past_its_cap_is_stopped_and_keeps_its_output(tmp_path):
    rc, timed_out, output = suite.run_children(
        [[sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]], dict(os.environ),
        str(tmp_path / "log"), cap_s=2)
    assert timed_out and rc != 0 and "started" in output


def test_a_failing_command_ends_its_step_with_its_error(tmp_path):
    rc, timed_out, output = suite.run_children(
        [[sys.executable, "-c", "raise SystemExit('first fails')"], [sys.executable, "-c", "print('never')"]],
        dict(os.environ), str(tmp_path / "log"), cap_s=60)
    assert rc == 1 and not timed_out and "first fails" in output and "never" not in output


def test_test_outcomes_are_read_from_the_verbose_log():
    log = "\n".join([
        "tests/test_ops.py::test_a[cuda] PASSED                                   [ 10%]",
        "tests/test_ops.py::test_b[cuda-x] FAILED                                 [ 20%]",
        "tests/test_kernels.py::test_c SKIPPED (LOWRANK_ENGINE_SKIP_AOT=1)        [ 30%]",
        "tests/test_kernels.py::test_d ERROR                                      [ 40%]",
        "FAILED tests/test_ops.py::test_b[cuda-x] - AssertionError",
    ])
    details = suite.tests_details(log)
    assert details["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}
    assert details["failed"] == ["tests/test_kernels.py::test_d", "tests/test_ops.py::test_b[cuda-x]"]
    xdist = "\n".join([  # pytest-xdist's -v lines
        "8 workers [4 items]",
        "[gw0] [ 25%] PASSED tests/test_ops.py::test_a[cuda] ",
        "[gw1] [ 50%] FAILED tests/test_ops.py::test_b[cuda-x] ",
        "[gw2] [ 75%] SKIPPED tests/test_kernels.py::test_c ",
        "[gw0] [100%] PASSED tests/test_kernels.py::test_d ",
        "SKIPPED [1] tests/test_kernels.py:517: LOWRANK_ENGINE_SKIP_AOT=1",
        "FAILED tests/test_ops.py::test_b[cuda-x] - AssertionError",
    ])
    details = suite.tests_details(xdist)
    assert details["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert details["failed"] == ["tests/test_ops.py::test_b[cuda-x]"]


@pytest.mark.parametrize("tests,kernels,verified", [("passed", "passed", True), ("failed", "passed", False),
                                                    ("passed", "timed out after 120 s", False), (None, "passed", False)])
def test_verified_only_when_the_tests_and_the_kernel_benchmark_passed(tests, kernels, verified):
    records = [{"step": "kernels", "status": kernels}] + ([{"step": "tests", "status": tests}] if tests else [])
    ok, why = suite.verdict(records)
    assert ok is verified and bool(why) is not verified


def test_peak_bandwidth_by_device_name():
    bench = _load("kernel_bench")
    assert bench.peak_gbps_for("NVIDIA H200") == 4800
    assert bench.peak_gbps_for("NVIDIA H100 80GB HBM3") == 3350
    assert bench.peak_gbps_for("NVIDIA H100 PCIe") == 2000
    assert bench.peak_gbps_for("NVIDIA GH200 480GB") is None  # not in the table, and not an H200
    assert bench.peak_gbps_for("cpu (2 cores)") is None


def test_a_failed_build_keeps_the_compilers_error_lines():
    log = "\n".join([
        "lowrank-engine: building lowrank_engine._C (CPU+CUDA; torch 2.11.0+cu130)",
        "[1/3] nvcc -c csrc/whitening_cuda.cu",
        "csrc/whitening_cuda.cu(57): error: identifier \"cusolverDnXsyevBatched\" is undefined",
        "csrc/whitening_cuda.cu(60): warning: unused variable",
        "lowrank-engine: building lowrank_engine._C failed (Error compiling objects for extension); the PyTorch "
        "fallback will be used",
        'EXTENSION {"loaded": false, "path": null, "cuda": false}',
    ])
    details = suite.build_details(log)
    assert details["extension"] == {"loaded": False, "path": None, "cuda": False}
    assert details["plan"].startswith("building lowrank_engine._C (CPU+CUDA")
    assert details["build_error"].splitlines() == [log.splitlines()[4][len("lowrank-engine: "):], log.splitlines()[2]]


def test_not_verified_when_kernel_configurations_went_unmeasured_or_erred_nan(tmp_path):
    records = [{"step": "tests", "status": "passed"}, {"step": "kernels", "status": "passed", "skipped": 2}]
    ok, why = suite.verdict(records)
    assert not ok and "2 configurations unmeasured" in why[0]
    rows = [{"bench": "covariance", "max_rel_err": 1e-6}, {"bench": "lowrank", "max_rel_err": float("nan")}]
    (tmp_path / "kernels.json").write_text(json.dumps(rows))
    details = suite.kernels_details(type("Ctx", (), {"out": str(tmp_path)})())
    assert details["measured"] == 2 and math.isnan(details["worst_rel_err"])
