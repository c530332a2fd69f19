"""Block refinement (AA-SVD stage 2): the published schedule, and it lowers the block output error."""
import math

import pytest
import torch

from conftest import tiny_model
from lowrank_engine import pipeline, probe, refine
from lowrank_engine.config import CompressionConfig
from lowrank_engine.modules import LowRankLinear


def _ids(n=6, t=24, seed=0):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def test_schedule_warms_up_then_decays_to_a_tenth():
    cfg = CompressionConfig(refine_passes=10, refine_lr=1e-3)
    lrs = [refine.learning_rate(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # 10% linear warm-up
    assert max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine: never increases
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)  # down to 0.1×


@pytest.mark.parametrize("method", ["aa-svd", "svd-llm"])
def test_refinement_lowers_every_block_error(method):
    ids = _ids()
    plain, refined = tiny_model("llama", layers=2), tiny_model("llama", layers=2)
    base = dict(method=method, ratio=0.5, batch_size=2)
    a = pipeline.compress_model(plain, ids, pipeline.CompressionConfig(**base), progress=False)
    b = pipeline.compress_model(refined, ids, pipeline.CompressionConfig(**base, refine=True, refine_passes=8,
                                                                         refine_lr=3e-4), progress=False)
    for pa, pb in zip(a.blocks, b.blocks):
        assert pb.refine["steps"] == 8 * 3
        assert pb.refine["last_loss"] < pb.refine["first_loss"]
    # block 0 sees the same X' in both runs, so its error must drop; later blocks inherit the gain
    assert b.blocks[0].output_rel_mse < a.blocks[0].output_rel_mse
    assert b.blocks[-1].output_rel_mse < a.blocks[-1].output_rel_mse
    assert "refine" in b.stage_seconds


def test_only_factors_and_norms_train_and_dtype_is_kept():
    model = tiny_model("llama", layers=1).to(torch.bfloat16)
    block = model.model.layers[0]
    block.self_attn.q_proj = LowRankLinear.from_factors(torch.randn(48, 4), torch.randn(48, 4), dtype=torch.bfloat16)
    params = refine.trainable_parameters(block, CompressionConfig())
    names = {n for n, p in block.named_parameters() if any(p is q for q in params)}
    assert names == {"self_attn.q_proj.U", "self_attn.q_proj.V", "input_layernorm.weight",
                     "post_attention_layernorm.weight"}
    cfg = pipeline.CompressionConfig(method="svd-llm", ratio=0.5, batch_size=2, refine=True, refine_passes=1,
                                     refine_tokens=96)
    model2 = tiny_model("llama", layers=1).to(torch.bfloat16)
    result = pipeline.compress_model(model2, _ids(), cfg, progress=False)
    assert result.blocks[0].refine["steps"] == 2  # a 96-token budget: two of the three 2×24 batches
    assert all(p.dtype == torch.bfloat16 for p in model2.parameters())
    assert all(p.grad is None for p in model2.parameters())  # no fp32 gradients left on the model


def test_kept_dense_linears_train_at_their_fraction_of_the_learning_rate():
    """Adam's first step moves every entry by about its group's lr, whatever the gradient's scale: the factors
    by lr, the kept dense linears by lr × refine_dense_lr_ratio, and nothing else in the block."""
    model = tiny_model("llama", layers=1)
    block = model.model.layers[0]
    block.self_attn.q_proj = LowRankLinear.from_factors(torch.randn(48, 4) * 0.1, torch.randn(48, 4) * 0.1)
    x = torch.randn(2, 7, 48)
    kwargs = pipeline.capture_block_inputs(model, model.model.layers, _ids(n=2, t=7), 2, "cpu", [])[0][0]
    for ratio in (0.0, 0.25):
        cfg = CompressionConfig(refine_lr=1e-2, refine_dense_lr_ratio=ratio, refine_weight_decay=0.0)
        params = refine.trainable_parameters(block, cfg)
        names = {n for n, p in block.named_parameters() if any(p is q for q in params)}
        dense = {f"{n}.weight" for n in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                         "mlp.up_proj", "mlp.down_proj")}
        assert names == {"self_attn.q_proj.U", "self_attn.q_proj.V", "input_layernorm.weight",
                         "post_attention_layernorm.weight"} | (dense if ratio else set())
        before = {n: p.detach().clone() for n, p in block.named_parameters()}
        with refine.trained_in_fp32(block, params), torch.enable_grad():
            optimizer = refine.adamw(refine.parameter_groups(block, cfg), cfg)
            loss = pipeline.run_block(block, x, kwargs, "cpu").square().mean()
            refine.optimizer_step(optimizer, params, loss, cfg, lr=1e-2)
        for name, p in block.named_parameters():
            moved = float((p.detach() - before[name]).abs().max())
            expected = 1e-2 * ratio if name in dense else 1e-2 if name in names else 0.0
            assert moved == pytest.approx(expected, rel=1e-3, abs=1e-9), name


def test_training_the_kept_dense_linears_lowers_the_refined_error():
    keep = {f"model.layers.0.{n}": None for n in ("self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")}
    base = dict(method="svd-llm", ratio=0.6, rank_map=keep, batch_size=2, refine=True, refine_passes=4,
                refine_lr=1e-3, refine_micro_batch=1)
    frozen, trained = tiny_model("llama", layers=1), tiny_model("llama", layers=1)
    dense_before = trained.model.layers[0].mlp.down_proj.weight.detach().clone()
    a = pipeline.compress_model(frozen, _ids(), CompressionConfig(**base), progress=False)
    b = pipeline.compress_model(trained, _ids(), CompressionConfig(**base, refine_dense_lr_ratio=0.3), progress=False)
    assert torch.equal(frozen.model.layers[0].mlp.down_proj.weight, dense_before)
    assert not torch.equal(trained.model.layers[0].mlp.down_proj.weight, dense_before)
    assert b.blocks[0].refine["last_loss"] < a.blocks[0].refine["last_loss"]
    assert all(p.grad is None and p.requires_grad for p in trained.parameters())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="refinement"):
        pipeline.compress_model(tiny_model(), _ids(), pipeline.CompressionConfig(refine=True, refine_lr=-1.0),
                                progress=False)
    with pytest.raises(ValueError, match="refine_dense_lr_ratio=-0.1"):
        CompressionConfig(refine_dense_lr_ratio=-0.1).validate()
    assert math.isfinite(refine.learning_rate(0, 1, CompressionConfig()))


def test_dense_modules_get_no_gradients_and_keep_their_flags():
    model = tiny_model("llama", layers=2)
    keep = {"model.layers.0.mlp.down_proj": None, **{f"model.layers.1.{n}": None for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = pipeline.CompressionConfig(method="aa-svd", ratio=0.5, rank_map=keep, batch_size=2, refine=True,
                                     refine_passes=2)
    result = pipeline.compress_model(model, _ids(), cfg, progress=False)
    assert result.blocks[0].refine["steps"] == 6 and result.blocks[1].refine["steps"] == 0  # all-dense: untouched
    assert not isinstance(model.model.layers[0].mlp.down_proj, LowRankLinear)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters() if "layers" not in n} == \
        {n: f for n, f in flags.items() if "layers" not in n}



def test_balancing_keeps_the_product_and_equalizes_the_factors():
    layer = LowRankLinear.from_factors(torch.randn(30, 5) * 1e3, torch.randn(20, 5) * 1e-3)
    before = layer.dense_weight().clone()
    refine.balance_factors(torch.nn.Sequential(layer))
    torch.testing.assert_close(layer.dense_weight(), before)
    torch.testing.assert_close(layer.U.norm(dim=0), layer.V.norm(dim=0))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_slice_of_the_batch_runs_like_the_same_windows_of_the_whole_batch(kind):
    model = tiny_model(kind, layers=1)
    ids = _ids(n=3, t=17, seed=3)
    ids[0, :5] = 0  # padding-like tokens: the per-window masks and positions must follow their windows
    hidden = []
    kwargs = pipeline.capture_block_inputs(model, model.model.layers, ids, 3, "cpu", hidden)[0]
    block = model.model.layers[0]
    whole = pipeline.run_block(block, hidden[0], kwargs[0], "cpu")
    for part in (slice(0, 1), slice(1, 3), slice(2, 3)):
        piece = pipeline.run_block(block, hidden[0][part], probe.slice_kwargs(kwargs[0], 3, part), "cpu")
        torch.testing.assert_close(piece, whole[part], rtol=1e-5, atol=1e-6)


def test_micro_batches_take_one_step_per_slice_and_lower_the_error():
    ids = _ids(n=5)  # batches of 2, 2, 1 windows
    base = dict(method="aa-svd", ratio=0.5, batch_size=2, refine=True, refine_passes=3, refine_lr=3e-4)
    whole, micro = tiny_model("llama", layers=2), tiny_model("llama", layers=2)
    a = pipeline.compress_model(whole, ids, pipeline.CompressionConfig(**base), progress=False)
    b = pipeline.compress_model(micro, ids, pipeline.CompressionConfig(**base, refine_micro_batch=1), progress=False)
    assert [blk.refine["steps"] for blk in a.blocks] == [3 * 3] * 2
    assert [blk.refine["steps"] for blk in b.blocks] == [3 * 5] * 2
    for blk in b.blocks:
        assert blk.refine["last_loss"] < blk.refine["first_loss"]
    with pytest.raises(ValueError, match="refinement"):
        pipeline.compress_model(tiny_model(), ids, pipeline.CompressionConfig(refine=True, refine_micro_batch=0),
                                progress=False)


def test_slice_kwargs_cuts_per_window_tensors_and_shares_broadcast_ones():
    mask, pos = torch.randn(3, 1, 3, 3), torch.arange(9).view(3, 3)
    cos = torch.randn(1, 3, 4)
    kw = probe.slice_kwargs({"attention_mask": mask, "position_ids": pos, "position_embeddings": (cos, cos + 1),
                             "cache_position": torch.arange(3), "flag": True}, 3, slice(1, 3))
    assert torch.equal(kw["attention_mask"], mask[1:]) and torch.equal(kw["position_ids"], pos[1:])
    assert kw["position_embeddings"][0] is cos and torch.equal(kw["cache_position"], torch.arange(3))
    assert kw["flag"] is True


def test_fused_adamw_takes_the_reference_steps():
    """The refinement's optimizer is AdamW's fused kernel on the CPU, and it moves the parameters as the
    per-tensor AdamW does (odd shapes, fresh gradients every step)."""
    cfg = CompressionConfig(refine_lr=1e-2, refine_weight_decay=0.01)
    fused = [torch.nn.Parameter(torch.randn(37, 5)), torch.nn.Parameter(torch.randn(11))]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    start = [p.detach().clone() for p in fused]
    opt = refine.adamw(fused, cfg)
    assert opt.defaults.get("fused")
    ref = torch.optim.AdamW(plain, lr=cfg.refine_lr, weight_decay=cfg.refine_weight_decay)
    for _ in range(5):
        for a, b in zip(fused, plain):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b, a0 in zip(fused, plain, start):
        assert float((a.detach() - a0).abs().max()) > 1e-3  # it moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weight_decay_shrinks_the_factors_and_never_the_norms(monkeypatch):
    """At a zero loss every gradient is exactly zero, so in the first step the only force is weight decay:
    the factors shrink by (1 − lr·wd), the norm weights (random values, not ones) must not move at all."""
    torch.manual_seed(7)
    model = tiny_model("llama", layers=1)
    block = model.model.layers[0]
    for norm in (block.input_layernorm, block.post_attention_layernorm):
        norm.weight.data = torch.rand_like(norm.weight) + 0.5
    block.mlp.up_proj = LowRankLinear.from_factors(torch.randn(112, 5), torch.randn(48, 5))
    ids = _ids(n=2, t=13, seed=5)
    hidden = []
    kwargs = pipeline.capture_block_inputs(model, model.model.layers, ids, 2, "cpu", hidden)[0]
    with torch.no_grad():
        targets = [pipeline.run_block(block, hidden[0], kwargs[0], "cpu")]
    monkeypatch.setattr(refine, "balance_factors", lambda block: None)  # it would round the product
    norms_before = {n: p.detach().clone() for n, p in block.named_parameters() if "norm" in n}
    factors_before = {n: p.detach().clone() for n, p in block.mlp.up_proj.named_parameters()}
    cfg = CompressionConfig(refine_passes=1, refine_lr=0.1, refine_weight_decay=0.5, refine_warmup=0.0)  # one step
    refine.refine_block(block, hidden, targets, kwargs, "cpu", cfg, pipeline.run_block)
    for n, p in block.named_parameters():
        if "norm" in n:
            assert torch.equal(p, norms_before[n]), n
    for n, p in block.mlp.up_proj.named_parameters():
        torch.testing.assert_close(p.detach(), factors_before[n] * (1 - 0.1 * 0.5))


def test_slice_kwargs_cuts_windows_and_tokens_for_the_probe():
    """The probe's cut (one window, the first tokens) and the refinement's (some windows) are one function."""
    mask, pos = torch.randn(3, 1, 9, 9), torch.arange(27).view(3, 9)
    cos = torch.randn(3, 9, 4)
    kw = probe.slice_kwargs({"attention_mask": mask, "position_ids": pos, "position_embeddings": (cos, cos + 1),
                             "cache_position": torch.arange(9)}, 3, slice(0, 1), tokens=4)
    assert torch.equal(kw["attention_mask"], mask[:1, :, :4, :4]) and torch.equal(kw["position_ids"], pos[:1, :4])
    assert torch.equal(kw["position_embeddings"][1], (cos + 1)[:1, :4])
    assert torch.equal(kw["cache_position"], torch.arange(4))
