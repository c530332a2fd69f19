"""What a new user meets first: Python run from the repository root, misuse of the CLI, and runs
that must never mix (a resume of another run, two processes on one output)."""
import json
import math
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from conftest import save_tiny_checkpoint, tiny_model
from lowrank_engine import cli, pipeline, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def _one_line_error(capsys, *patterns):
    """The error is the last line on stderr, alone (progress bars of model loading may precede it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("lowrank-engine: error:"), err
    for pattern in patterns:
        assert pattern in last, err
    return last


def _compress_args(ckpt, out, *extra):
    return ["compress", "--model", ckpt / "model", "--calibration", ckpt / "calib.txt", "--nsamples", 4,
            "--seqlen", 32, "--batch-size", 2, "--method", "svd-llm", "--output", out, "--quiet",
            "--fidelity-samples", 0, "--eval-sets", "", *extra]


def _from_root(*argv, env=None):
    """A Python started from the repository root: the root is first on sys.path."""
    env = dict(os.environ if env is None else env)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------------------
# nothing in the repository shadows an installed distribution
# --------------------------------------------------------------------------------------
def test_hub_kernels_integration_imports_from_the_repository_root():
    assert metadata.version("kernels")  # the lock installs it; without it this test proves nothing
    done = _from_root("-c", "import transformers.integrations.hub_kernels as h, kernels, os; "
                            "from kernels import CUDAProperties; print(os.path.abspath(kernels.__file__))")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not done.stdout.strip().startswith(ROOT + os.sep + "kernels"), done.stdout


@pytest.mark.parametrize("folder", [".", "benchmarks", "tests"])
def test_no_module_here_takes_an_installed_distributions_name(folder):
    """`python -m`/`-c` from the root puts the root first on sys.path, `python benchmarks/x.py` puts
    benchmarks/ there, pytest puts tests/ there: no regular module or package in them may carry the
    import name of an installed distribution."""
    installed = metadata.packages_distributions()
    path = os.path.join(ROOT, folder)
    names = {entry[:-3] for entry in os.listdir(path) if entry.endswith(".py")}
    names |= {entry for entry in os.listdir(path) if os.path.isfile(os.path.join(path, entry, "__init__.py"))}
    clashes = {name: installed[name] for name in names if name in installed and name != "lowrank_engine"}
    assert not clashes, f"{folder}/ shadows installed distributions: {clashes}"


def test_cli_as_a_module_from_the_repository_root(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    done = _from_root("-m", "lowrank_engine.cli", *map(str, _compress_args(tiny_checkpoint, out)))
    assert done.returncode == 0, done.stderr[-2000:]
    done = _from_root("-m", "lowrank_engine.cli", "eval", "--model", str(out), "--eval-sets", "",
                      "--dense", str(tiny_checkpoint / "model"), "--fidelity-samples", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "top1_agreement" in done.stdout


# --------------------------------------------------------------------------------------
# bad input: one line, nothing on disk
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry,pattern", [
    ({"model.layers.0.self_attn.q_proj": 10_000}, "must be < min(m, n)"),
    ({"model.layers.0.self_attn.nope": 4}, "not compressible linears"),
    ({"model.layers.0.mlp.up_proj": -3}, "rank"),
])
def test_a_bad_rank_map_leaves_nothing_on_disk(tiny_checkpoint, tmp_path, capsys, entry, pattern):
    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps(entry))
    out = tmp_path / "out"
    assert run_cli(*_compress_args(tiny_checkpoint, out, "--rank-map", ranks)) == 2
    _one_line_error(capsys, pattern)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory):
    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    return save_tiny_checkpoint(tmp_path_factory.mktemp("nan"), model)


def test_nan_weights_are_named_with_self_calibration(nan_checkpoint, tmp_path, capsys):
    args = _compress_args(nan_checkpoint, tmp_path / "o")
    args[args.index("--calibration") + 1] = "self"
    assert run_cli(*args) == 2
    _one_line_error(capsys, "model.layers.1.mlp.down_proj.weight")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_nan_weights_are_named_with_a_data_set(nan_checkpoint, tmp_path, capsys):
    assert run_cli(*_compress_args(nan_checkpoint, tmp_path / "o")) == 2
    _one_line_error(capsys, "NaN or Inf", "block 1")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()  # block 0 was written, then removed


def test_an_unreachable_named_data_set_is_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOWRANK_ENGINE_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = _compress_args(tiny_checkpoint, tmp_path / "o")
    args[args.index("--calibration") + 1] = "c4"
    assert run_cli(*args) == 2
    _one_line_error(capsys, "allenai/c4", "LOWRANK_ENGINE_DATA")
    assert run_cli("eval", "--model", tiny_checkpoint / "model", "--eval-sets", "wikitext2") == 2
    _one_line_error(capsys, "wikitext", "LOWRANK_ENGINE_DATA")


def test_a_nan_perplexity_is_a_failed_evaluation(nan_checkpoint, tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # a local data directory with a tiny C4 sample, so that the evaluation really runs
    data = tmp_path / "data"
    (data / "c4").mkdir(parents=True)
    text = (nan_checkpoint / "calib.txt").read_text()
    pq.write_table(pa.table({"text": [text] * 2000}), data / "c4" / "c4_validation_2k.parquet")
    monkeypatch.setenv("LOWRANK_ENGINE_DATA", str(data))
    report = tmp_path / "r.json"
    code = run_cli("eval", "--model", nan_checkpoint / "model", "--eval-sets", "c4", "--eval-windows", 1,
                   "--eval-seqlen", 16, "--json", report)
    assert code == 2
    _one_line_error(capsys, "c4_ppl")
    text = report.read_text()
    assert "NaN" not in text and json.loads(text)[0]["c4_ppl"] is None


# --------------------------------------------------------------------------------------
# --resume continues only the very same run
# --------------------------------------------------------------------------------------
def _interrupt_after_first_block(monkeypatch):
    write = pipeline.Compressor._write_block

    def write_then_stop(self, index, comp, report):
        write(self, index, comp, report)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(pipeline.Compressor, "_write_block", write_then_stop)


@pytest.fixture
def interrupted(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after_first_block(m)
        assert run_cli(*_compress_args(tiny_checkpoint, out)) == 130
    assert (tmp_path / "out.partial" / "progress.json").exists() and not out.exists()
    return out


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """The same architecture and tokenizer with other weights."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("other"), tiny_model("llama", layers=2, seed=7)) / "model"


@pytest.mark.parametrize("flag,value,pattern", [
    ("--batch-size", 4, "batch_size"),
    ("--nsamples", 6, "calibration"),
    ("--seqlen", 24, "calibration"),
    ("--seed", 1, "calibration"),
    ("--calibration", "other.txt", "calibration"),
    ("--method", "aa-svd", "method"),
    ("--ratio", 0.3, "ratio"),
    ("--model", "other", "another model"),
])
def test_resume_refuses_any_change(tiny_checkpoint, other_weights, interrupted, tmp_path, capsys, flag, value,
                                   pattern):
    args = _compress_args(tiny_checkpoint, interrupted, "--resume")
    if flag == "--calibration":
        (tmp_path / "other.txt").write_text((tiny_checkpoint / "calib.txt").read_text()[::-1])
        value = tmp_path / "other.txt"
    if flag == "--model":
        value = other_weights
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    capsys.readouterr()
    assert run_cli(*args) == 2
    _one_line_error(capsys, "different settings", pattern)
    assert run_cli(*_compress_args(tiny_checkpoint, interrupted, "--resume")) == 0  # the same run still resumes
    assert not os.path.exists(str(interrupted) + ".partial")


def test_the_device_is_part_of_the_fingerprint():
    ids = torch.arange(12).view(3, 4)
    cpu = workdir.run_fingerprint(pipeline.CompressionConfig(device="cpu"), ids, "m", 1)
    assert cpu == workdir.run_fingerprint(pipeline.CompressionConfig(device="cpu", offload="disk"), ids, "m", 1)
    cuda = workdir.run_fingerprint(pipeline.CompressionConfig(device="cuda"), ids, "m", 1)
    assert "device 'cpu' → 'cuda'" in workdir.describe_mismatch(cpu, cuda)
    assert "processes" in workdir.describe_mismatch(cpu, workdir.run_fingerprint(
        pipeline.CompressionConfig(device="cpu"), ids, "m", 2))


def test_model_identity_sees_the_weights(tiny_checkpoint, other_weights, tmp_path):
    a = pipeline.LazyBlockSource(str(tiny_checkpoint / "model")).identity()
    assert a == pipeline.LazyBlockSource(str(tiny_checkpoint / "model")).identity()
    assert a != pipeline.LazyBlockSource(str(other_weights)).identity()
    m = tiny_model("llama")
    before = pipeline.BlockSource(m).identity()
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight.mul_(1.001)
    assert pipeline.BlockSource(m).identity() != before


# --------------------------------------------------------------------------------------
# one output directory, one process
# --------------------------------------------------------------------------------------
def test_a_second_process_is_refused_while_the_first_holds_the_output(tiny_checkpoint, interrupted, capsys):
    work = str(interrupted) + ".partial"
    entries = sorted(os.listdir(work))
    with workdir.WorkDirLock(work):  # as a running process holds it
        for extra in ((), ("--resume",)):
            assert run_cli(*_compress_args(tiny_checkpoint, interrupted, *extra)) == 2
            _one_line_error(capsys, "in use by another lowrank-engine process", f"pid {os.getpid()}")
    assert sorted(os.listdir(work)) == entries  # the holder's files are untouched
    assert run_cli(*_compress_args(tiny_checkpoint, interrupted, "--resume")) == 0  # released: resumes


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from lowrank_engine import workdir; "
                               f"workdir.WorkDirLock({str(work)!r}).acquire(); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir.WorkDirBusy, match=f"pid {holder.pid}"):
            workdir.check_not_busy(str(work))
    finally:
        holder.kill()
        holder.wait()
    workdir.check_not_busy(str(work))  # the kernel dropped the lock with its process
    with workdir.WorkDirLock(str(work)):
        pass


def test_json_never_holds_nan(tmp_path):
    from lowrank_engine import report

    report.write_json([{"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf}, "e": 2.5}], tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == [{"a": None, "b": [1.0, None], "c": {"d": None}, "e": 2.5}]


def test_the_fingerprint_sees_every_window_before_they_are_split_over_processes(tmp_path, monkeypatch):
    """Each process streams its own share of the windows: the fingerprint still covers all of them."""
    monkeypatch.setattr(pipeline.distributed, "shard", lambda ids: ids[:2])  # this process's share
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = pipeline.CompressionConfig(method="svd-llm", ratio=0.3)
    work = str(tmp_path / "w")
    pipeline.compress_model(tiny_model("llama"), ids, cfg, work_dir=work, progress=False)
    other = ids.clone()
    other[3] = (other[3] + 1) % 96  # only another process's windows differ
    with pytest.raises(ValueError, match="different settings.*calibration"):
        pipeline.compress_model(tiny_model("llama"), other, cfg, work_dir=work, progress=False)
