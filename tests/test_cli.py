"""The CLI end to end on a tiny local checkpoint, and its one-line errors on bad input."""
import json
import os

import pytest
import torch

from lowrank_engine import checkpoint, cli, job


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


# every flag `compress` had before its flags were generated from JobSpec's fields
FLAGS_BEFORE_GENERATION = (
    "--model", "--method", "--ratio", "--rank-map", "--rank-alloc", "--last-layers", "--calibration", "--nsamples",
    "--seqlen", "--seed", "--beta-search", "--residual-split", "--residual-stage2", "--refine", "--refine-passes",
    "--refine-lr", "--refine-weight-decay", "--refine-warmup", "--refine-final-lr", "--refine-clip",
    "--refine-tokens", "--refine-micro-batch", "--device", "--offload", "--batch-size", "--max-memory",
    "--solve-dtype", "--compute-dtype", "--output", "--resume", "--no-save", "--eval-sets", "--eval-windows",
    "--eval-seqlen", "--fidelity-samples", "--json", "--trust-remote-code", "--quiet")


def _compress_parser():
    import argparse

    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["compress"]


def _help(capsys, *command):
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    return capsys.readouterr().out


def test_help_documents_every_flag(capsys):
    text = _help(capsys, "compress")
    flags = {s for a in _compress_parser()._actions for s in a.option_strings}
    for flag in FLAGS_BEFORE_GENERATION + ("--no-track-error",):
        assert flag in flags and f"{flag} " in text, flag
    assert "(default: best)" in text and "(default: 0.2)" in text and "(default: 64)" in text
    compression = text.split("compression settings")[1].split("job settings")[0]
    assert "--method " in compression  # under the heading of the class that defines it, whose default JobSpec changes


def test_every_setting_is_a_compress_flag_that_parses_back(tmp_path, capsys):
    """Each JobSpec field with CLI metadata is a flag in --help, and a non-default value given on the command
    line comes back as that field's value: a new setting is covered without touching this test."""
    from lowrank_engine import config, job

    text = _help(capsys, "compress")
    actions = {a.dest: a for a in _compress_parser()._actions}
    argv, expected = [], {}
    for f in config.cli_fields(job.JobSpec):
        action = actions[f.name]  # every setting is a flag
        flag = action.option_strings[0]
        assert f"{flag} " in text, flag
        default = config.cli_default(f)
        if action.nargs == 0:  # a bare flag flips the default
            argv.append(flag)
            expected[f.name] = not default
            continue
        if action.metavar == "FILE":
            token = str(tmp_path / f"{f.name}.json")
            (tmp_path / f"{f.name}.json").write_text(json.dumps({"model.layers.0.mlp.up_proj": 5}))
        elif action.choices:
            token = next(c for c in action.choices if c != default)
        else:
            token = next(str(v) for v in {int: (7, 9), float: (0.37, 0.41), str: ("x-7", "x-9")}[action.type]
                         if str(v) != str(default))
        argv += [flag, token]
        convert = f.metadata.get("from_cli")
        expected[f.name] = convert(action.type(token)) if convert else action.type(token)
    spec, explicit = cli.compress_spec(cli.build_parser().parse_args(["compress", *argv]))
    assert spec == job.JobSpec(**expected) and explicit == set(expected)
    for f in config.cli_fields(job.JobSpec):
        assert getattr(spec, f.name) != config.field_default(f), f.name  # the flag changed it
    assert spec.rank_map == {"model.layers.0.mlp.up_proj": 5} and spec.progress is False


def test_compress_without_flags_is_the_jobspecs_defaults():
    from lowrank_engine import config, job

    spec, explicit = cli.compress_spec(cli.build_parser().parse_args(["compress"]))
    assert spec == job.JobSpec(device=config.default_device()) and explicit == set()
    assert (spec.method, spec.ratio, spec.calibration, spec.nsamples, spec.seqlen) == ("best", 0.2, "self", 64, 512)
    quick_start = job.resolve(spec, explicit)
    assert quick_start.preset == "best" and quick_start.refine and job.refinement_warning(quick_start) is None
    assert spec.track_error and spec.save and spec.progress


def test_an_unreadable_rank_map_is_one_line(tmp_path, capsys):
    bad = tmp_path / "ranks.json"
    bad.write_text("{not json")
    assert run_cli("compress", "--rank-map", bad, "--output", tmp_path / "o", "--quiet") == 2
    _assert_one_line_error(capsys, "cannot read rank map")
    bad.write_text(json.dumps({"model.layers.0.mlp.up_proj": 2.5}))
    assert run_cli("compress", "--rank-map", bad, "--output", tmp_path / "o", "--quiet") == 2
    _assert_one_line_error(capsys, "integer rank")
    assert not (tmp_path / "o").exists()


def test_no_track_error_skips_the_report_and_leaves_the_factors(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    records, shards = {}, {}
    for name, extra in (("on", []), ("off", ["--no-track-error"])):
        out = tmp_path / name
        assert run_cli(*_compress_args(tiny_checkpoint, out, "--method", "svd-llm", "--fidelity-samples", 0,
                                       "--json", tmp_path / f"{name}.json", *extra)) == 0
        records[name] = json.loads((tmp_path / f"{name}.json").read_text())[0]
        shards[name] = {p.name: load_file(str(p)) for p in sorted(out.glob("*.safetensors"))}
    on, off = records["on"], records["off"]
    assert on["track_error"] is True and off["track_error"] is False
    assert "error_tracking" in on["stage_seconds"] and "error_tracking" not in off["stage_seconds"]
    assert all(e > 0 for e, _ in on["layer_errors"])
    assert all(e is None and c is None for e, c in off["layer_errors"])  # NaN, written as null
    assert shards["on"].keys() == shards["off"].keys() and shards["on"]
    for name, tensors in shards["on"].items():
        assert tensors.keys() == shards["off"][name].keys()
        for key, t in tensors.items():
            assert t.dtype == shards["off"][name][key].dtype and torch.equal(t, shards["off"][name][key]), key


def test_info(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "whitening ->" in text and "triton" in text
    assert "ops backend: auto" in text and "CUDA tensors: covariance and low-rank linear ->" in text


@pytest.mark.parametrize("alloc", [["--rank-alloc", "waterfill"], ["--rank-alloc", "type-waterfill"],
                                   ["--rank-alloc", "type-waterfill-dense"],
                                   ["--rank-alloc", "last-layers", "--last-layers", 1],
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
    elif "type-waterfill-dense" not in alloc:
        assert len(set(cfg["ranks"].values())) > 2  # not uniform
    if alloc[1].startswith("type-waterfill"):  # one rank per matrix type, the same in every block
        by_block_and_type = {}
        for name, rank in cfg["ranks"].items():
            block, kind = name.split(".layers.")[1].split(".", 1)
            by_block_and_type.setdefault(kind, {})[block] = rank
        assert all(len(set(ranks.values())) == 1 for ranks in by_block_and_type.values())
        # a type kept dense is dense in every block (absent from the ranks); plain type-waterfill keeps none
        assert all(len(ranks) == 2 for ranks in by_block_and_type.values())
        if alloc[1] == "type-waterfill":
            assert len(by_block_and_type) == 7


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


def test_best_preset_composes_svd_llm_refinement_and_distillation(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert run_cli(*_compress_args(tiny_checkpoint, out, "--method", "best", "--ratio", 0.3, "--fidelity-samples", 0,
                                   "--refine-passes", 2, "--json", tmp_path / "r.json")) == 0
    record = json.loads((tmp_path / "r.json").read_text())[0]
    assert record["method"] == "best" and record["stage_seconds"]["refine"] > 0
    passes = job.preset_fields("best", 0.3)["distill_passes"]
    assert record["distill"]["steps"] == 4 * passes and record["stage_seconds"]["distill"] > 0  # a step per window
    assert record["compressible_reduction"] == pytest.approx(0.3, abs=0.03)
    _, cfg = checkpoint.load(str(out))
    assert cfg["method"] == "svd-llm"  # svd-llm's closed form, then refined


def test_a_preset_fills_refinement_settings_the_job_leaves_unset():
    spec = job.expand_preset(job.JobSpec(model="m", method="best", refine_lr=5e-4, refine_passes=7))
    assert spec.method == "svd-llm" and spec.preset == "best"
    assert (spec.refine, spec.refine_micro_batch, spec.refine_lr, spec.refine_passes) == (True, 1, 5e-4, 7)
    plain = job.expand_preset(job.JobSpec(model="m", method="aa-svd"))
    assert plain == job.JobSpec(model="m", method="aa-svd") and not plain.refine and plain.preset is None
    # a setting the user gave wins even at its default value (the CLI passes the flags it was given)
    given = job.expand_preset(job.JobSpec(model="m", method="best", refine_lr=1e-4, rank_alloc="waterfill"),
                              explicit={"method", "refine_lr", "rank_alloc"})
    assert (given.refine_lr, given.rank_alloc) == (1e-4, "waterfill")
    assert given.refine_passes == job.PRESETS["best"]["tuning"]["refine_passes"]


def test_a_preset_chooses_by_ratio_and_the_user_still_wins():
    preset = job.PRESETS["best"]
    base = {**{k: v for k, v in preset.items() if k not in ("tuning", "from_ratio")}, **preset["tuning"]}
    thresholds = sorted(preset["from_ratio"])
    for i, threshold in enumerate(thresholds):
        below = job.expand_preset(job.JobSpec(model="m", method="best", ratio=threshold - 0.05))
        above = job.expand_preset(job.JobSpec(model="m", method="best", ratio=threshold + 0.05))
        wanted = dict(base)
        for earlier in thresholds[:i + 1]:
            wanted.update(preset["from_ratio"][earlier])
        for name, value in preset["from_ratio"][threshold].items():
            assert getattr(below, name) != value == getattr(above, name), (threshold, name)
        assert all(getattr(above, name) == value for name, value in wanted.items() if name != "method")
    threshold, changes = thresholds[-1], preset["from_ratio"][thresholds[-1]]
    given = job.expand_preset(job.JobSpec(model="m", method="best", ratio=threshold + 0.1, rank_alloc="uniform"),
                              explicit={"method", "ratio", "rank_alloc"})
    assert given.rank_alloc == "uniform" != changes["rank_alloc"]


def test_the_cli_passes_the_settings_it_was_given_to_the_preset():
    args = cli.build_parser().parse_args(["compress", "--method", "best", "--refine-lr", "1e-4", "--quiet"])
    spec, explicit = cli.compress_spec(args)
    assert explicit == {"method", "refine_lr", "progress"}
    expanded = job.expand_preset(spec, explicit)
    assert expanded.refine_lr == 1e-4 and expanded.refine_micro_batch == 1
    assert expanded.refine_passes == job.PRESETS["best"]["tuning"]["refine_passes"]


def test_refining_on_a_small_or_short_calibration_set_warns():
    def warning(**kw):
        return job.refinement_warning(job.expand_preset(job.JobSpec(model="m", **kw)))

    assert "128-token windows" in warning(method="best", nsamples=256, seqlen=128, eval_seqlen=512)
    assert "8×512 calibration tokens" in warning(method="best", nsamples=8, seqlen=512)
    assert warning(method="best", nsamples=64, seqlen=512) is None
    assert warning() is None  # the quick start's defaults: best on 64×512 tokens
    assert warning(method="aa-svd", nsamples=8, seqlen=128) is None


def test_compress_seconds_count_rank_allocation_and_the_fisher_pass(tiny_checkpoint, tmp_path, monkeypatch):
    """compress_seconds are what the user waits for from the start of compression to the last factor."""
    import time

    allocate = job.allocate_ranks

    def slow_allocation(*args, **kwargs):
        time.sleep(0.5)
        return allocate(*args, **kwargs)

    monkeypatch.setattr(job, "allocate_ranks", slow_allocation)
    assert run_cli(*_compress_args(tiny_checkpoint, tmp_path / "out", "--method", "fwsvd", "--rank-alloc", "waterfill",
                                   "--fidelity-samples", 0, "--json", tmp_path / "r.json")) == 0
    record = json.loads((tmp_path / "r.json").read_text())[0]
    stages = record["stage_seconds"]
    assert stages["rank_allocation"] >= 0.5 and stages["fisher"] > 0 and stages["error_tracking"] > 0
    assert record["compress_seconds"] >= stages["rank_allocation"] + stages["fisher"] + stages["error_tracking"]
    assert record["track_error"] is True
