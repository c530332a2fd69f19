"""Model distillation after the last block: it lowers the KL to the dense model, trains factors and norms
only, keeps dtypes, and its checkpoint (saved, resumed) is the distilled model."""
import copy
import json
import os

import pytest
import torch

from conftest import tiny_model
from lowrank_engine import checkpoint, cli, distill, pipeline, refine
from lowrank_engine.config import CompressionConfig
from lowrank_engine.modules import LowRankLinear


def _ids(n=6, t=24, seed=0):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _kl(teacher, student, ids):
    return float(distill.kl_to_dense(student(input_ids=ids).logits, teacher(input_ids=ids).logits))


def test_kl_matches_a_float64_reference():
    g = torch.Generator().manual_seed(3)
    p_logits, q_logits = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    reference = float((p * (p.log() - q.log())).sum(-1).mean())
    assert float(distill.kl_to_dense(q_logits, p_logits)) == pytest.approx(reference, rel=1e-5)
    assert float(distill.kl_to_dense(p_logits, p_logits)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_lowers_the_kl_and_trains_only_factors_and_norms():
    teacher = tiny_model("llama", layers=2)
    student = copy.deepcopy(teacher)
    ids = _ids()
    pipeline.compress_model(student, ids, CompressionConfig(method="svd-llm", ratio=0.5, batch_size=2), progress=False)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters()
              if not any(p is q for q in refine.trainable_parameters(student, CompressionConfig()))}
    assert "model.embed_tokens.weight" in frozen and "model.norm.weight" not in frozen  # the final norm trains
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    before = _kl(teacher, student, ids)
    cfg = CompressionConfig(distill_passes=4, distill_lr=1e-3, refine_micro_batch=2)
    report = distill.distill_model(student, teacher, ids, cfg)
    assert report["steps"] == 4 * 3 and report["last_loss"] < report["first_loss"]
    assert _kl(teacher, student, ids) < 0.8 * before
    for name, p in student.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert all(p.grad is None and p.requires_grad == flags[n] for n, p in student.named_parameters())


def test_distillation_trains_the_kept_dense_block_linears_when_asked_and_nothing_outside_the_blocks():
    teacher = tiny_model("llama", layers=2)
    student = copy.deepcopy(teacher)
    ids = _ids()
    keep = {"model.layers.0.mlp.down_proj": None, "model.layers.1.self_attn.v_proj": None}
    pipeline.compress_model(student, ids, CompressionConfig(method="svd-llm", ratio=0.5, rank_map=keep, batch_size=2),
                            progress=False)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = CompressionConfig(distill_passes=2, distill_lr=1e-3, refine_micro_batch=2, refine_dense_lr_ratio=0.5)
    distill.distill_model(student, teacher, ids, cfg)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert {"model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight"} <= changed
    assert not any(n.startswith(("model.embed_tokens", "lm_head")) for n in changed)  # not block linears
    assert not any("layers" in n and n.endswith("proj.weight") and n not in changed for n in before)


def test_distillation_keeps_a_bf16_models_dtypes_and_zero_passes_change_nothing():
    teacher = tiny_model("llama", layers=1)
    student = copy.deepcopy(teacher).to(torch.bfloat16)
    student.model.layers[0].self_attn.q_proj = LowRankLinear.from_factors(
        torch.randn(48, 4) * 0.1, torch.randn(48, 4) * 0.1, dtype=torch.bfloat16)
    state = {n: t.clone() for n, t in student.state_dict().items()}
    none = distill.distill_model(student, teacher, _ids(), CompressionConfig(distill_passes=0))
    assert none["steps"] == 0 and all(torch.equal(t, student.state_dict()[n]) for n, t in state.items())
    distill.distill_model(student, teacher, _ids(), CompressionConfig(distill_passes=1, distill_lr=1e-3))
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.U"], student.model.layers[0].self_attn.q_proj.U)


def test_block_errors_of_the_whole_model_match_the_pipelines_report():
    """Measured end to end on the final model, the per-block errors are the pipeline's own report (which
    propagates X' through the compressed blocks), and zero for an unchanged copy."""
    teacher = tiny_model("llama", layers=2)
    student = copy.deepcopy(teacher)
    ids = _ids()
    same = distill.block_output_errors(teacher, student, ids, batch_size=4)
    assert len(same) == 2 and all(rel_mse == 0 and abs(cosine) < 1e-12 for rel_mse, cosine in same)
    result = pipeline.compress_model(student, ids, CompressionConfig(method="svd-llm", ratio=0.5, batch_size=2),
                                     progress=False)
    measured = distill.block_output_errors(teacher, student, ids, batch_size=4)
    for (rel_mse, cosine), block in zip(measured, result.blocks):
        assert rel_mse == pytest.approx(block.output_rel_mse, rel=1e-4) and rel_mse > 0
        assert cosine == pytest.approx(block.output_cosine_distance, rel=1e-3, abs=1e-7)


def test_bad_distillation_settings_are_refused():
    for bad in ({"distill_passes": -1}, {"distill_lr": 0.0}):
        with pytest.raises(ValueError, match="bad refinement settings"):
            CompressionConfig(**bad).validate()


def _compress(ckpt, out, *extra):
    return cli.main([str(a) for a in ["compress", "--model", ckpt / "model", "--calibration", ckpt / "calib.txt",
                                      "--nsamples", 4, "--seqlen", 32, "--output", out, "--quiet",
                                      "--fidelity-samples", 0, "--method", "svd-llm", "--ratio", 0.4, *extra]])


def test_the_checkpoint_holds_the_distilled_model_and_a_resume_distills_again(tiny_checkpoint, tmp_path, monkeypatch):
    plain, distilled = tmp_path / "plain", tmp_path / "distilled"
    assert _compress(tiny_checkpoint, plain) == 0
    assert _compress(tiny_checkpoint, distilled, "--distill-passes", 2, "--distill-lr", 1e-3,
                     "--json", tmp_path / "r.json") == 0
    record = json.loads((tmp_path / "r.json").read_text())[0]
    assert record["distill"]["steps"] == 2 * 4 and record["stage_seconds"]["distill"] > 0
    # the per-block report is the distilled model's; the pipeline's (before distillation) is kept beside it
    assert len(record["layer_errors"]) == len(record["layer_errors_before_distill"]) == 2
    assert record["layer_errors"] != record["layer_errors_before_distill"]
    assert not os.path.exists(str(distilled) + ".partial")
    a, _ = checkpoint.load(str(plain))
    b, cfg = checkpoint.load(str(distilled))
    assert cfg["ranks"] == checkpoint.load(str(plain))[1]["ranks"]
    changed = [n for n, t in b.state_dict().items() if not torch.equal(t, a.state_dict()[n])]
    assert "model.norm.weight" in changed and any(n.endswith(".U") for n in changed)

    # a run killed after its last block file: the resume replays the blocks and distills them again
    resumed = tmp_path / "resumed"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(distill, "distill_model", killed)
        assert _compress(tiny_checkpoint, resumed, "--distill-passes", 2, "--distill-lr", 1e-3) != 0
    assert len(os.listdir(os.path.join(str(resumed) + ".partial", "blocks"))) == 2 and not resumed.exists()
    assert _compress(tiny_checkpoint, resumed, "--distill-passes", 2, "--distill-lr", 1e-3, "--resume") == 0
    c, _ = checkpoint.load(str(resumed))
    for name, t in b.state_dict().items():
        torch.testing.assert_close(c.state_dict()[name], t, rtol=1e-5, atol=1e-6, msg=name)


def test_trained_dense_linears_reach_the_checkpoint(tiny_checkpoint, tmp_path):
    """Kept dense linears that refinement and distillation trained are saved as trained (not re-read from the
    source checkpoint), and they load through transformers' quantizer as plain nn.Linear."""
    rank_map = tmp_path / "ranks.json"
    rank_map.write_text(json.dumps({"model.layers.0.mlp.down_proj": None, "model.layers.1.self_attn.v_proj": None}))
    frozen, trained = tmp_path / "frozen", tmp_path / "trained"
    common = ("--rank-map", rank_map, "--refine", "--refine-passes", 2, "--refine-lr", 1e-3, "--distill-passes", 1)
    assert _compress(tiny_checkpoint, frozen, *common) == 0
    assert _compress(tiny_checkpoint, trained, *common, "--refine-dense-lr", 0.5) == 0
    a, _ = checkpoint.load(str(frozen))
    b, _ = checkpoint.load(str(trained))
    from transformers import AutoModelForCausalLM
    source = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint / "model"))
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"):
        kept, tuned = a.get_submodule(name), b.get_submodule(name)
        assert not isinstance(tuned, LowRankLinear)
        assert torch.equal(kept.weight, source.get_submodule(name).weight), name
        assert not torch.equal(kept.weight, tuned.weight), name
    loaded = AutoModelForCausalLM.from_pretrained(str(trained))
    for name, t in b.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, msg=name)


def test_a_distillation_that_cannot_fit_is_refused_before_any_work(tiny_checkpoint, tmp_path, capsys):
    assert distill.memory_needed(1000, 10, 4, 1) == 20 * 1000 + 3 * 4 * 4 * 10
    out = tmp_path / "out"
    # 100 KiB holds one tiny block (the block stages pass) but not two whole models with AdamW state
    assert _compress(tiny_checkpoint, out, "--distill-passes", 1, "--max-memory", "100KiB") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "distillation holds the dense and the compressed model whole" in err[-1] and "--distill-passes 0" in err[-1]
    assert "--max-memory allows 100.0 KiB on cpu" in err[-1]
    assert not out.exists() and not os.path.exists(str(out) + ".partial")
