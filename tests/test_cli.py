"""The CLI end to end on a tiny local checkpoint, and its one-line errors on bad input."""
import json
import os

import pytest
import torch

from lowrank_engine import checkpoint, cli


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def _compress_args(ckpt, out, *extra):
    return ["compress", "--model", ckpt / "model", "--calibration", ckpt / "calib.txt", "--nsamples", 4,
            "--seqlen", 32, "--output", out, "--quiet", "--fidelity-samples", 2, *extra]


@pytest.mark.parametrize("method", ["svd-llm", "aa-svd", "saes"])
def test_compress_eval_roundtrip(tiny_checkpoint, tmp_path, capsys, method):
    out = tmp_path / "out"
    assert run_cli(*_compress_args(tiny_checkpoint, out, "--method", method, "--ratio", 0.3,
                                   "--json", tmp_path / "r.json")) == 0
    text = capsys.readouterr().out
    assert "method" in text and method in text and "compressible" in text
    record = json.loads((tmp_path / "r.json").read_text())[0]
    assert record["method"] == method and 0 < record["compressible_reduction"] < 1
    assert record["kl"] >= 0 and 0 <= record["top1_agreement"] <= 1
    assert (out / "layer_error.png").exists() and (out / checkpoint.INDEX_FILE).exists()
    assert not os.path.exists(str(out) + ".partial")
    model, cfg = checkpoint.load(str(out))
    assert cfg["method"] == method and cfg["calibration"]["nsamples"] == 4
    assert run_cli("eval", "--model", out, "--eval-sets", "", "--dense", tiny_checkpoint / "model",
                   "--fidelity-samples", 2) == 0


def test_streamed_result_matches_in_memory_pipeline(tiny_checkpoint, tmp_path):
    """The lazy, per-block-file path gives the same factors as compressing the model in memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank_engine import data, pipeline

    out = tmp_path / "out"
    assert run_cli(*_compress_args(tiny_checkpoint, out, "--method", "aa-svd", "--fidelity-samples", 0)) == 0
    streamed, _ = checkpoint.load(str(out))
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint / "model")
    calib = data.load_calibration(str(tiny_checkpoint / "calib.txt"), tok, 4, 32, 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint / "model").eval()
    pipeline.compress_model(model, calib.input_ids, pipeline.CompressionConfig(method="aa-svd", ratio=0.2),
                            progress=False)
    with torch.no_grad():
        assert torch.equal(model(calib.input_ids).logits, streamed(calib.input_ids).logits)


def _assert_one_line_error(capsys, pattern):
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowrank-engine: error:") and len(err.splitlines()) == 1, err
    assert pattern in err, err


@pytest.mark.parametrize("extra,pattern", [
    (["--ratio", "1.5"], "ratio"),
    (["--ratio", "0"], "ratio"),
    (["--method", "magic"], "invalid choice"),
])
def test_bad_arguments(tiny_checkpoint, tmp_path, capsys, extra, pattern):
    out = tmp_path / "out"
    if "--method" in extra:
        with pytest.raises(SystemExit) as exc:
            run_cli(*_compress_args(tiny_checkpoint, out, *extra))
        assert exc.value.code != 0
        assert pattern in capsys.readouterr().err
    else:
        assert run_cli(*_compress_args(tiny_checkpoint, out, *extra)) == 2
        _assert_one_line_error(capsys, pattern)
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


def test_missing_model_path(tmp_path, capsys):
    assert run_cli("compress", "--model", tmp_path / "nope", "--output", tmp_path / "o", "--quiet") == 2
    _assert_one_line_error(capsys, "does not exist")
    assert not (tmp_path / "o").exists()


def test_empty_and_short_calibration_files(tiny_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = ["compress", "--model", tiny_checkpoint / "model", "--output", tmp_path / "o", "--quiet"]
    assert run_cli(*args, "--calibration", empty) == 2
    _assert_one_line_error(capsys, "empty")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    assert run_cli(*args, "--calibration", short, "--seqlen", 64) == 2
    _assert_one_line_error(capsys, "fewer than one window")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_rank_past_break_even_is_refused(tiny_checkpoint, tmp_path, capsys):
    rank_map = tmp_path / "ranks.json"
    rank_map.write_text(json.dumps({"model.layers.0.self_attn.q_proj": 30}))
    assert run_cli(*_compress_args(tiny_checkpoint, tmp_path / "o", "--rank-map", rank_map)) == 2
    _assert_one_line_error(capsys, "break-even")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config

    d = tmp_path / "weird"
    d.mkdir()
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(d)  # Conv1D, no nn.Linear blocks
    from transformers import GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(d)
    from conftest import tiny_tokenizer
    tiny_tokenizer().save_pretrained(d)
    capsys.readouterr()
    assert run_cli("compress", "--model", d, "--calibration", "self", "--nsamples", 1, "--seqlen", 4,
                   "--output", tmp_path / "o", "--quiet") == 2
    _assert_one_line_error(capsys, "no decoder blocks found")


def test_corrupt_checkpoint_on_eval(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(*_compress_args(tiny_checkpoint, out, "--method", "svd", "--fidelity-samples", 0)) == 0
    shard = sorted(p for p in out.iterdir() if p.name.startswith("model-block"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    assert run_cli("eval", "--model", out, "--eval-sets", "") == 2
    _assert_one_line_error(capsys, f"{shard.name} is corrupt: its SHA-256 differs")
    assert run_cli("eval", "--model", out, "--eval-sets", "", "--no-verify") == 2
    _assert_one_line_error(capsys, "corrupt or truncated")


def test_flipped_bytes_in_a_block_shard_stop_eval(tiny_checkpoint, tmp_path, capsys):
    """The issue's case: 64 bytes overwritten mid-shard used to give NaN factors, '-' and exit 0."""
    out = tmp_path / "out"
    assert run_cli(*_compress_args(tiny_checkpoint, out, "--method", "svd", "--fidelity-samples", 0)) == 0
    assert (out / checkpoint.CHECKSUMS_FILE).exists()
    shard = sorted(p for p in out.iterdir() if p.name.startswith("model-block"))[1]
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xff" * 64  # NaN bit patterns in float32
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_cli("eval", "--model", out, "--eval-sets", "") == 2
    _assert_one_line_error(capsys, f"{shard.name} is corrupt: its SHA-256 differs")
    assert run_cli("eval", "--model", out, "--eval-sets", "", "--no-verify") == 2
    _assert_one_line_error(capsys, "holds NaN or Inf")


def test_existing_output_and_resume_guard(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli(*_compress_args(tiny_checkpoint, out)) == 2
    _assert_one_line_error(capsys, "already exists")
    out.rmdir()
    (tmp_path / "out.partial").mkdir()
    assert run_cli(*_compress_args(tiny_checkpoint, out)) == 2
    _assert_one_line_error(capsys, "--resume")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--method", "--ratio", "--rank-map", "--calibration", "--nsamples", "--seqlen",
                 "--seed", "--beta-search", "--device", "--offload", "--output", "--resume", "--eval-sets"):
        assert flag in text


def test_info(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "whitening ->" in text and "triton" in text
    assert "ops backend: auto" in text and "CUDA tensors: covariance and low-rank linear ->" in text


@pytest.mark.parametrize("alloc", [["--rank-alloc", "waterfill"], ["--rank-alloc", "last-layers", "--last-layers", 1],
                                   ["--rank-alloc", "last-layers"]])
def test_rank_allocations_meet_the_ratio(tiny_checkpoint, tmp_path, alloc):
    out = tmp_path / "out"
    assert run_cli(*_compress_args(tiny_checkpoint, out, "--method", "svd-llm", "--ratio", 0.2, "--fidelity-samples",
                                   0, "--json", tmp_path / "r.json", *alloc)) == 0
    record = json.loads((tmp_path / "r.json").read_text())[0]
    assert record["compressible_reduction"] == pytest.approx(0.2, abs=0.03)
    _, cfg = checkpoint.load(str(out))
    if "last-layers" in alloc:  # compressed blocks are a suffix (K=1: block 0 stays dense, no ranks for it)
        compressed = sorted({int(name.split(".layers.")[1].split(".")[0]) for name in cfg["ranks"]})
        assert compressed == list(range(2 - len(compressed), 2))
        if "--last-layers" in alloc:
            assert compressed == [1]
    else:
        assert len(set(cfg["ranks"].values())) > 2  # not uniform


def test_refine_flags_reach_the_pipeline(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert run_cli(*_compress_args(tiny_checkpoint, out, "--method", "svd-llm", "--fidelity-samples", 0,
                                   "--refine", "--refine-passes", 2, "--refine-lr", 1e-3, "--refine-tokens", 64,
                                   "--json", tmp_path / "r.json")) == 0
    record = json.loads((tmp_path / "r.json").read_text())[0]
    assert record["stage_seconds"]["refine"] > 0


def test_fwsvd_through_the_cli(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert run_cli(*_compress_args(tiny_checkpoint, out, "--method", "fwsvd", "--fidelity-samples", 0)) == 0
    _, cfg = checkpoint.load(str(out))
    assert cfg["method"] == "fwsvd" and len(cfg["ranks"]) == 14


def test_best_preset_composes_anchoring_and_refinement(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert run_cli(*_compress_args(tiny_checkpoint, out, "--method", "best", "--ratio", 0.3, "--fidelity-samples", 0,
                                   "--refine-passes", 2, "--json", tmp_path / "r.json")) == 0
    record = json.loads((tmp_path / "r.json").read_text())[0]
    assert record["method"] == "best" and record["stage_seconds"]["refine"] > 0
    assert record["compressible_reduction"] == pytest.approx(0.3, abs=0.03)
    _, cfg = checkpoint.load(str(out))
    assert cfg["method"] == "aa-svd"  # anchored, then refined


def test_a_preset_fills_refinement_settings_the_job_leaves_unset():
    from lowrank_engine import job

    spec = job.expand_preset(job.JobSpec(model="m", method="best", refine={"refine_lr": 5e-4, "refine_passes": 7}))
    assert spec.method == "aa-svd" and spec.preset == "best"
    assert spec.refine == {"refine": True, "refine_micro_batch": 1, "refine_lr": 5e-4, "refine_passes": 7}
    plain = job.expand_preset(job.JobSpec(model="m", method="aa-svd"))
    assert plain.refine == {} and plain.preset is None


def test_refining_on_a_small_or_short_calibration_set_warns():
    from lowrank_engine import job

    def warning(**kw):
        return job.refinement_warning(job.expand_preset(job.JobSpec(model="m", **kw)))

    assert "128-token windows" in warning(method="best", nsamples=256, seqlen=128, eval_seqlen=512)
    assert "8×512 calibration tokens" in warning(method="best", nsamples=8, seqlen=512)
    assert warning(method="best", nsamples=64, seqlen=512) is None
    assert warning(method="aa-svd", nsamples=8, seqlen=128) is None
