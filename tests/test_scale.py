"""Large-model machinery on tiny models: sharded lazy input, kill -9 and --resume, the memory plan."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import SAMPLE_TEXT, tiny_model, tiny_tokenizer
from lowrank_engine import checkpoint, cli, memory, pipeline, solvers, workdir


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """A 4-block LLaMA with tied embeddings, saved as several safetensors shards with an index."""
    root = tmp_path_factory.mktemp("sharded")
    model = tiny_model("llama", layers=4, tie_word_embeddings=True)
    tokenizer = tiny_tokenizer()
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.save_pretrained(root / "model", max_shard_size="40KB")
    tokenizer.save_pretrained(root / "model")
    (root / "calib.txt").write_text(SAMPLE_TEXT)
    assert (root / "model" / checkpoint.INDEX_FILE).exists()
    return root


def _ids(n=4, t=32, seed=3):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def test_sharded_tied_checkpoint_streams_like_in_memory(sharded_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    path = str(sharded_checkpoint / "model")
    source = pipeline.LazyBlockSource(path, keep_compressed=True)
    assert all(p.is_meta for b in source.blocks for p in b.parameters())  # nothing read before its turn
    emb = source.model.get_input_embeddings().weight
    assert source.model.get_output_embeddings().weight is emb  # tied, read once
    cfg = pipeline.CompressionConfig(method="aa-svd", ratio=0.3, batch_size=2)
    pipeline.Compressor(source, cfg, work_dir=str(tmp_path / "w"), progress=False).run(_ids())
    dense = AutoModelForCausalLM.from_pretrained(path).eval()
    pipeline.compress_model(dense, _ids(), cfg, progress=False)
    with torch.no_grad():
        assert torch.equal(dense(_ids()).logits, source.model(_ids()).logits)


_KILLER = """
import os, signal, sys
from lowrank_engine import cli, pipeline
write = pipeline.Compressor._write_block
def write_then_die(self, index, comp, report):
    write(self, index, comp, report)
    if index == int(os.environ["KILL_AFTER_BLOCK"]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup handlers, no atexit: a real crash
pipeline.Compressor._write_block = write_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def _compress_cmd(ckpt, out, *extra):
    return [sys.executable, "-c", _KILLER, "compress", "--model", str(ckpt / "model"), "--method", "aa-svd",
            "--ratio", "0.3", "--calibration", str(ckpt / "calib.txt"), "--nsamples", "4", "--seqlen", "32",
            "--batch-size", "2", "--output", str(out), "--quiet", "--fidelity-samples", "0", "--eval-sets", "",
            *extra]


def test_kill_9_then_resume_is_bit_identical(sharded_checkpoint, tmp_path):
    env = dict(os.environ, KILL_AFTER_BLOCK="-1")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    subprocess.run(_compress_cmd(sharded_checkpoint, full, "--offload", "disk"), env=env, check=True)

    killed = subprocess.run(_compress_cmd(sharded_checkpoint, resumed, "--offload", "disk"),
                            env=dict(env, KILL_AFTER_BLOCK="1"))
    assert killed.returncode == -signal.SIGKILL
    assert not resumed.exists()  # nothing that looks like a finished checkpoint
    progress = json.loads((tmp_path / "resumed.partial" / "progress.json").read_text())
    assert progress["done"] == [0, 1]

    again = subprocess.run(_compress_cmd(sharded_checkpoint, resumed), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # an interrupted run is never silently redone
    subprocess.run(_compress_cmd(sharded_checkpoint, resumed, "--resume"), env=env, check=True)
    assert not (tmp_path / "resumed.partial").exists()

    a = checkpoint.read_tensors(checkpoint.tensor_files(str(full)), checkpoint.tensor_files(str(full)))
    b = checkpoint.read_tensors(checkpoint.tensor_files(str(resumed)), checkpoint.tensor_files(str(resumed)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sizes_and_budgets_parse():
    assert memory.parse_size("24GiB") == 24 * 2**30
    assert memory.parse_size("1.5 GB") == 1_500_000_000
    assert memory.parse_size("512mib") == 512 * 2**20
    assert memory.parse_budget("20GiB", "cpu") == {"cpu": 20 * 2**30}
    assert memory.parse_budget("cuda:60GiB,cpu:24GiB", "cuda") == {"cuda": 60 * 2**30, "cpu": 24 * 2**30}
    with pytest.raises(ValueError, match="memory size"):
        memory.parse_size("lots")


def test_plan_shrinks_with_offload_and_grows_with_tokens(sharded_checkpoint):
    source = pipeline.LazyBlockSource(str(sharded_checkpoint / "model"))
    method = solvers.get_method("saes")

    def peak(offload, n):
        return memory.plan(source, method, device="cpu", offload=offload, n_samples=n, seqlen=512, batch_size=4,
                           solve_dtype=torch.float64).peak("cpu")

    assert peak("disk", 64) < peak("cpu", 64) < peak("cpu", 128)
    assert peak("disk", 64) == peak("disk", 128)  # on disk only one batch is resident
    block = source.block_bytes(0)
    assert block == sum(p.numel() * 4 for p in tiny_model("llama").model.layers[0].parameters())


def test_budget_too_small_fails_before_any_output(sharded_checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["compress", "--model", sharded_checkpoint / "model", "--calibration", sharded_checkpoint / "calib.txt",
            "--nsamples", 4, "--seqlen", 32, "--output", out, "--quiet", "--max-memory", "1MiB"]
    assert cli.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowrank-engine: error:") and "--max-memory" in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "o.partial").exists()


def test_run_prints_planned_and_measured_peak(sharded_checkpoint, tmp_path, capsys):
    source = pipeline.LazyBlockSource(str(sharded_checkpoint / "model"))
    cfg = pipeline.CompressionConfig(method="svd-llm", ratio=0.3, max_memory="cpu:64GiB")
    pipeline.Compressor(source, cfg, progress=True).run(_ids())
    text = capsys.readouterr()
    text = text.out + text.err
    assert "planned peak on cpu" in text and "measured peak: cpu" in text


@pytest.mark.parametrize("method", ["svd-llm", "saes", "asvd-max"])
def test_two_gloo_processes_match_one(sharded_checkpoint, tmp_path, method):
    """torchrun with 2 CPU processes (gloo): windows split, statistics all-reduced, solves spread, factors
    broadcast; the result equals a one-process run to fp32 round-off."""
    common = ["compress", "--model", str(sharded_checkpoint / "model"), "--method", method, "--ratio", "0.3",
              "--calibration", str(sharded_checkpoint / "calib.txt"), "--nsamples", "4", "--seqlen", "32",
              "--batch-size", "1", "--quiet", "--fidelity-samples", "0", "--eval-sets", ""]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "lowrank_engine.cli", *common, "--output", str(tmp_path / "one")],
                   env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "lowrank_engine.cli", *common, "--output", str(tmp_path / "two")], env=env, check=True)
    one, cfg_one = checkpoint.load(str(tmp_path / "one"))
    two, cfg_two = checkpoint.load(str(tmp_path / "two"))
    assert cfg_one["ranks"] == cfg_two["ranks"]
    from lowrank_engine.modules import LowRankLinear

    pairs = [(a, b) for a, b in zip(one.modules(), two.modules()) if isinstance(a, LowRankLinear)]
    assert len(pairs) == 4 * 7
    with torch.no_grad():
        errs = []
        for a, b in pairs:  # factors are unique up to signs; their product is not
            wa, wb = (a.U.double() @ a.V.double().T), (b.U.double() @ b.V.double().T)
            errs.append(float((wa - wb).norm() / wa.norm()))
        la, lb = one(_ids()).logits, two(_ids()).logits
    # the function is what must agree; a weight can move along directions the calibration data
    # barely excites (down_proj sees 128 tokens for 112 inputs), so only most weights agree to 1e-4
    assert float((la - lb).abs().max()) < 1e-4 * float(la.abs().max())
    assert sorted(errs)[len(errs) // 2] < 1e-4 and max(errs) < 0.05  # a wrong broadcast gives ~1


def test_streaming_run_frees_embeddings_and_rereads_them(sharded_checkpoint, tmp_path):
    path = str(sharded_checkpoint / "model")
    source = pipeline.LazyBlockSource(path, keep_compressed=False)
    before = {k: v.clone() for k, v in source.non_block_state().items()}
    cfg = pipeline.CompressionConfig(method="svd-llm", ratio=0.3)
    pipeline.Compressor(source, cfg, work_dir=str(tmp_path / "w"), progress=False).run(_ids())
    assert source.model.get_input_embeddings().weight.is_meta  # freed once block 0's input existed
    after = source.non_block_state()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    tiny_model("llama", layers=3).to(torch.bfloat16).save_pretrained(root / "model", max_shard_size="40KB")
    return str(root / "model")


def test_half_checkpoint_runs_in_fp32_on_cpu_and_is_written_in_its_dtype(bf16_checkpoint, tmp_path):
    """CPU bf16 GEMMs are ~100× slower than fp32: blocks run in fp32, factors are rounded to and
    written in bf16, and a resumed run (every block replayed from disk) lands on the same model."""
    from safetensors import safe_open

    cfg = pipeline.CompressionConfig(method="svd-llm", ratio=0.3, batch_size=2)
    source = pipeline.LazyBlockSource(bf16_checkpoint, keep_compressed=True)
    compressor = pipeline.Compressor(source, cfg, work_dir=str(tmp_path / "w"), progress=False)
    assert compressor.compute_dtype == torch.float32 and compressor.storage_dtype == torch.bfloat16
    compressor.run(_ids())
    with safe_open(str(tmp_path / "w" / "blocks" / "block-00001.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in source.model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = source.model(_ids()).logits
    assert torch.isfinite(logits).all()

    replayed = pipeline.LazyBlockSource(bf16_checkpoint, keep_compressed=True)
    pipeline.Compressor(replayed, cfg, work_dir=str(tmp_path / "w"), progress=False).run(_ids())
    with torch.no_grad():
        assert torch.equal(replayed.model(_ids()).logits, logits)

    # an explicit compute dtype is honoured (and is part of the run's identity)
    cfg16 = pipeline.CompressionConfig(method="svd-llm", ratio=0.3, batch_size=2, compute_dtype="bfloat16")
    assert pipeline.Compressor(pipeline.LazyBlockSource(bf16_checkpoint), cfg16, progress=False).compute_dtype \
        == torch.bfloat16
    assert workdir.run_fingerprint(cfg16, _ids(), "m", 1) != workdir.run_fingerprint(cfg, _ids(), "m", 1)


def test_memory_plan_counts_the_compute_dtype_and_the_output_side_solve(bf16_checkpoint):
    source = pipeline.LazyBlockSource(bf16_checkpoint)
    kw = dict(device="cpu", offload="none", n_samples=4, seqlen=32, batch_size=2, solve_dtype=torch.float32)
    half = memory.plan(source, solvers.get_method("svd-llm"), **kw)
    full = memory.plan(source, solvers.get_method("svd-llm"), compute_dtype=torch.float32, **kw)
    assert full.parts["cpu"]["dense + compressed block"] == 2 * half.parts["cpu"]["dense + compressed block"]
    anchored = memory.plan(source, solvers.get_method("aa-svd"), **kw)
    assert half.parts["cpu"]["solver workspace"] < anchored.parts["cpu"]["solver workspace"]


def test_scale_benchmark_extrapolation_arithmetic():
    """benchmarks/scale.py: per-block stage times → 80 blocks at 256×2048 tokens, here and on one H100."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "scale.py")
    spec = importlib.util.spec_from_file_location("scale_benchmark", path)
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    record = {"model": "70b-l2", "device": "cpu (2 cores)", "calibration": "random 16x256",
              "gemm_fp32_gflops": 80.0, "eigh4096_fp32_s": 12.0, "planned_h100_gpu_mb": 30 * 1024,
              "load_s_per_block": 10.0, "statistics_s_per_block": 100.0, "whitening_s_per_block": 50.0,
              "solve_s_per_block": 300.0, "propagate_s_per_block": 0.0, "write_s_per_block": 5.0}
    text = "\n".join(scale.extrapolate(record))
    token_scale = 256 * 2048 / (16 * 256)  # 128
    gemm = scale.H100["gemm_tflops"] * 1e12 / 80e9
    lapack = 12.0 / scale.H100["eigh4096_s"]
    here = 10 + 100 * token_scale + 50 + 300 + 5
    h100 = 10 + 100 * token_scale / gemm + (50 + 300) / lapack + 5
    assert f"{here:,.0f} s/block × 80 = {here * 80 / 3600:,.1f} h" in text
    assert f"{h100:.1f} s/block × 80 = {h100 * 80 / 60:.0f} min" in text
    assert "30.0 GiB" in text


def test_scale_benchmark_gpu_records_extrapolate_from_their_own_rates(tmp_path):
    """A GPU record (device_suite.py's block step) replaces the assumed-rate extrapolation: token stages
    scale to 256×2048 tokens, the others stay as measured; without one, scale.md says nothing ran on a GPU."""
    import argparse
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "scale.py")
    spec = importlib.util.spec_from_file_location("scale_benchmark", path)
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    cpu = {"model": "70b-l2", "method": "svd-llm", "device": "cpu (2 cores)", "calibration": "random 16x256",
           "compress_seconds": 100.0, "gemm_fp32_gflops": 80.0, "eigh4096_fp32_s": 12.0,
           **{f"{s}_s_per_block": 1.0 for s in scale.STAGES}}
    gpu = {"model": "70b-l1", "method": "aa-svd", "ratio": 0.4, "device": "NVIDIA H200", "calibration": "random 64x2048",
           "offload": "none", "ops_backend": "accelerated", "peak_gpu_mb": 30 * 1024, "compress_seconds": 50.0,
           "load_s_per_block": 2.0, "statistics_s_per_block": 3.0, "whitening_s_per_block": 10.0,
           "solve_s_per_block": 5.0, "propagate_s_per_block": 1.5, "write_s_per_block": 1.0}
    total = 2.0 + 3.0 * 4 + 10.0 + 5.0 + 1.5 * 4 + 1.0  # 64×2048 is a quarter of the target's tokens
    text = "\n".join(scale.extrapolate_measured(gpu))
    assert f"{total:.1f} s/block × 80 = {total * 80 / 60:.0f} min" in text
    assert "scaled ×4" in text and "30.0 GiB" in text
    args = argparse.Namespace(out_dir=str(tmp_path))
    scale.render([cpu], args)
    md = (tmp_path / "scale.md").read_text()
    assert "Nothing has run on a GPU yet" in md and "assumed rates" in md
    scale.render([cpu, gpu], args)
    md = (tmp_path / "scale.md").read_text()
    assert "from measured rates" in md and "Nothing has run on a GPU" not in md and "assumed rates" not in md
    assert json.loads((tmp_path / "scale.json").read_text())[1]["device"] == "NVIDIA H200"
