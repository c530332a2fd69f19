"""The streaming pipeline on tiny LLaMA (GQA), Mistral and Qwen2 models."""
import contextlib
import dataclasses
import os
import time

import pytest
import torch

from lowrank_engine import ops, pipeline, probe, replay, solvers, statistics
from lowrank_engine.models import UnsupportedArchitecture, block_linears, find_decoder_blocks
from lowrank_engine.modules import LowRankLinear

from conftest import needs_cuda, tiny_model


def _ids(n=6, t=24, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


@torch.no_grad()
def _rel_err(a, b):
    return float((a - b).pow(2).sum() / b.pow(2).sum())


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_groups_are_discovered_generically(kind):
    model = tiny_model(kind)
    _, blocks = find_decoder_blocks(model)
    ids = _ids()
    x = []
    kw = pipeline.capture_block_inputs(model, blocks, ids, 3, "cpu", x)[0]
    groups = pipeline.discover_groups(blocks[0], x[0], kw[0], "cpu")
    assert [sorted(g) for g in groups] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("method", sorted(solvers.METHODS))
def test_every_method_compresses_every_architecture(kind, method):
    model = tiny_model(kind)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    result = pipeline.compress_model(model, ids, pipeline.CompressionConfig(method=method, ratio=0.3, batch_size=4),
                                     progress=False)
    _, blocks = find_decoder_blocks(model)
    for block in blocks:
        assert all(isinstance(m, LowRankLinear) for m in block_linears(block).values())
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert _rel_err(out, ref) < 1.0
    assert len(result.blocks) == len(blocks)
    assert set(result.ranks) == {f"model.layers.{i}.{n}" for i in range(len(blocks))
                                 for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    if kind == "qwen2":  # q/k/v biases survive factorization
        assert blocks[0].self_attn.q_proj.bias is not None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "accelerated"])
@pytest.mark.parametrize("method", ["svd-llm", "aa-svd"])
def test_cuda_compression_lands_where_the_cpu_run_does(method, backend):
    """The pipeline on CUDA through the default paths and through the opt-in GPU paths (the Triton kernels
    and the extension's CUDA whitening): the compressed model's error matches the CPU run's."""
    ids = _ids(8, 32)
    errors = {}
    for device in ("cpu", "cuda"):
        model = tiny_model("llama", layers=2)
        with torch.no_grad():
            ref = model(ids).logits
        with ops.backend(backend if device == "cuda" else "auto"):
            result = pipeline.compress_model(model, ids, pipeline.CompressionConfig(
                method=method, ratio=0.4, device=device, solve_dtype="float64"), progress=False)
        assert len(result.blocks) == 2
        model.to("cpu")
        with torch.no_grad():
            out = model(ids).logits
        assert torch.isfinite(out).all()
        errors[device] = _rel_err(out, ref)
    assert 0 < errors["cpu"] < 1.0
    assert errors["cuda"] == pytest.approx(errors["cpu"], rel=0.05), errors


def test_data_aware_methods_beat_plain_svd():
    ids = _ids(8, 32)
    errors = {}
    for method in ("svd", "svd-llm", "aa-svd"):
        model = tiny_model("llama", layers=2)
        with torch.no_grad():
            ref = model(ids).logits
        pipeline.compress_model(model, ids, pipeline.CompressionConfig(method=method, ratio=0.4), progress=False)
        with torch.no_grad():
            errors[method] = _rel_err(model(ids).logits, ref)
    assert errors["svd-llm"] < errors["svd"]
    assert errors["aa-svd"] < errors["svd"]


def test_first_block_svd_llm_is_layerwise_optimal():
    """Block 0 sees X' = X, so each layer's output error equals Σ_{i>k}σ² of its whitened target."""
    model = tiny_model("llama", layers=1)
    ids = _ids(4, 20)
    _, blocks = find_decoder_blocks(model)
    x = []
    kw = pipeline.capture_block_inputs(model, blocks, ids, 4, "cpu", x)[0]
    q = blocks[0].self_attn.q_proj
    with torch.no_grad():
        inp = pipeline.group_inputs(blocks[0], "self_attn.q_proj", x[0], kw[0], "cpu").reshape(-1, 48).double()
    W = q.weight.detach().double().clone()
    result = pipeline.compress_model(model, ids, pipeline.CompressionConfig(method="svd-llm", ratio=0.5,
                                                                            solve_dtype="float64"), progress=False)
    lr = blocks[0].self_attn.q_proj
    Wp = (lr.U @ lr.V.T).detach().double()
    err = float(((inp @ W.T - inp @ Wp.T) ** 2).sum())
    assert err == pytest.approx(result.blocks[0].modules["self_attn.q_proj"]["truncation_loss"], rel=1e-3)


def test_rank_map_overrides_ratio_and_is_validated():
    model = tiny_model("llama")
    ids = _ids()
    rank_map = {"model.layers.0.self_attn.q_proj": 3, "model.layers.1.mlp.down_proj": 7}
    result = pipeline.compress_model(model, ids, pipeline.CompressionConfig(method="svd-llm", ratio=0.5,
                                                                            rank_map=rank_map), progress=False)
    assert result.ranks["model.layers.0.self_attn.q_proj"] == 3
    assert result.ranks["model.layers.1.mlp.down_proj"] == 7
    with pytest.raises(ValueError, match="break-even"):
        pipeline.compress_model(tiny_model("llama"), ids, pipeline.CompressionConfig(
            method="svd-llm", ratio=0.5, rank_map={"model.layers.0.self_attn.q_proj": 40}), progress=False)
    with pytest.raises(ValueError, match="not compressible"):
        pipeline.compress_model(tiny_model("llama"), ids, pipeline.CompressionConfig(
            method="svd-llm", ratio=0.5, rank_map={"model.layers.0.nope": 4}), progress=False)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.2, -0.5])
def test_bad_ratio_is_rejected(ratio):
    with pytest.raises(ValueError, match="ratio"):
        pipeline.compress_model(tiny_model("llama"), _ids(), pipeline.CompressionConfig(ratio=ratio), progress=False)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        pipeline.compress_model(tiny_model("llama"), _ids(), pipeline.CompressionConfig(method="magic"),
                                progress=False)


def test_nan_activation_names_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("nan")
    with pytest.raises(pipeline.ActivationError, match="block 1 .*q_proj"):
        pipeline.compress_model(model, _ids(), pipeline.CompressionConfig(method="svd-llm", ratio=0.3),
                                progress=False)


def test_no_decoder_blocks_lists_supported():
    with pytest.raises(UnsupportedArchitecture, match="llama"):
        find_decoder_blocks(torch.nn.Sequential(torch.nn.Linear(3, 3)))


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offload_gives_identical_factors(offload, tmp_path):
    ids = _ids()
    a, b = tiny_model("llama"), tiny_model("llama")
    pipeline.compress_model(a, ids, pipeline.CompressionConfig(method="aa-svd", ratio=0.3, batch_size=2),
                            progress=False)
    pipeline.compress_model(b, ids, pipeline.CompressionConfig(method="aa-svd", ratio=0.3, batch_size=2,
                                                               offload=offload),
                            work_dir=str(tmp_path / "work"), progress=False)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    assert not (tmp_path / "work" / "streams").exists()  # spilled activations are cleaned up


def test_disk_stream_round_trips_and_cleans_up(tmp_path):
    from lowrank_engine import streams

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "stale.bin").write_bytes(b"x")  # a killed run's spill is cleared
    store = streams.StreamStore("disk", "cpu", str(tmp_path / "s"))
    assert not (tmp_path / "s" / "stale.bin").exists()
    stream = store.stream("x")
    batches = [torch.randn(2, 5, 7, dtype=dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    for t in batches:
        stream.append(t)
    copy = store.copy(stream)
    assert len(stream) == 3 and all(torch.equal(a, b) for a, b in zip(batches, copy))
    stream[0].add_(1.0)  # reading maps privately: the file is not changed
    assert torch.equal(stream[0], batches[0])
    stream.release()
    assert len(os.listdir(store.directory)) == 3  # only the copy's files remain
    private = store.directory
    store.close()
    assert not os.path.exists(private) and (tmp_path / "s").exists()  # a caller's directory is kept
    with pytest.raises(ValueError, match="offload mode"):
        streams.StreamStore("gpu", "cpu")


def test_resume_after_interruption_is_bit_identical(tmp_path, monkeypatch):
    ids = _ids()
    cfg = pipeline.CompressionConfig(method="saes", ratio=0.3)
    full = tiny_model("llama", layers=3)
    pipeline.compress_model(full, ids, cfg, work_dir=str(tmp_path / "full"), progress=False)

    calls = {"n": 0}
    original = pipeline.Compressor.compress_block

    def crash_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    work = str(tmp_path / "run")
    monkeypatch.setattr(pipeline.Compressor, "compress_block", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        pipeline.compress_model(tiny_model("llama", layers=3), ids, cfg, work_dir=work, progress=False)
    assert sorted(os.listdir(os.path.join(work, "blocks"))) == ["block-00000.safetensors", "block-00001.safetensors"]
    monkeypatch.setattr(pipeline.Compressor, "compress_block", original)

    resumed = tiny_model("llama", layers=3)
    pipeline.compress_model(resumed, ids, cfg, work_dir=work, progress=False)
    for (na, ta), (nb, tb) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na

    with pytest.raises(ValueError, match="different settings"):
        pipeline.compress_model(tiny_model("llama", layers=3), ids,
                                pipeline.CompressionConfig(method="svd-llm", ratio=0.3), work_dir=work, progress=False)


def test_single_stream_without_error_tracking_gives_identical_factors():
    ids = _ids()
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = pipeline.compress_model(a, ids, pipeline.CompressionConfig(method="svd-llm", ratio=0.3), progress=False)
    rb = pipeline.compress_model(b, ids, pipeline.CompressionConfig(method="svd-llm", ratio=0.3, track_error=False),
                                 progress=False)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    assert ra.blocks[0].output_rel_mse > 0 and rb.blocks[0].output_rel_mse != rb.blocks[0].output_rel_mse  # NaN


def test_single_stream_error_report_is_timed_apart(monkeypatch):
    """quality.py subtracts error_tracking from a single-stream method's seconds, so the error
    measurement itself must be inside that stage, not in untimed time."""
    measure = pipeline.stream_error

    def slow_stream_error(x, xp):
        time.sleep(0.25)
        return measure(x, xp)

    monkeypatch.setattr(pipeline, "stream_error", slow_stream_error)
    result = pipeline.compress_model(tiny_model("llama", layers=2), _ids(),
                                     pipeline.CompressionConfig(method="svd-llm", ratio=0.3), progress=False)
    assert result.stage_seconds["error_tracking"] >= 0.5
    assert result.blocks[1].output_rel_mse > 0


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["aa-svd", "saes"])
def test_settled_outputs_replay_changes_nothing_and_skips_attention(kind, method, monkeypatch):
    """Replaying final children (attention as o_proj of its kept input once q/k/v are installed, the
    MLP as down_proj of its kept input) gives bit-identical factors and error reports, runs
    attention on X' once per batch instead of four times, and gate/up once instead of twice."""
    ids = _ids()
    calls = {"replay": 0, "plain": 0}
    gate_calls = {"replay": 0, "plain": 0}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def compress(label):
        def counting_sdpa(*args, **kwargs):
            calls[label] += 1
            return sdpa(*args, **kwargs)

        def count_gate(module, args):
            gate_calls[label] += 1

        model = tiny_model(kind)
        for layer in model.model.layers:  # act_fn(gate_proj(x)): the hook is copied into each compressed block
            layer.mlp.act_fn.register_forward_pre_hook(count_gate)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
        result = pipeline.compress_model(model, ids, pipeline.CompressionConfig(method=method, ratio=0.3,
                                                                                batch_size=2), progress=False)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        return model, result

    a, ra = compress("replay")
    with monkeypatch.context() as m:
        m.setattr(replay.TwoStreamReplay, "replay", lambda self, batch, record=True: contextlib.nullcontext())
        b, rb = compress("plain")
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na
    assert [r.output_rel_mse for r in ra.blocks] == [r.output_rel_mse for r in rb.blocks]
    batches, blocks = 3, 2
    # per block: discovery probes, the dense pass, then X' passes for o, gate/up, down and the X' output
    assert calls["plain"] - calls["replay"] == 3 * batches * blocks
    # the MLP activation runs in the dense pass, the down X' pass and (without replay) the X' output pass
    assert gate_calls["plain"] - gate_calls["replay"] == batches * blocks


def test_replay_off_when_linears_run_out_of_group_order():
    """A block whose linears do not run once each in group order gets no replay (nothing is final early)."""
    model = tiny_model("llama")
    block = find_decoder_blocks(model)[1][0]
    hidden = torch.randn(1, 6, 48)
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, torch.arange(6)[None])}
    structure = probe.probe_block(block, hidden, kwargs, "cpu")
    settled = replay.TwoStreamReplay(block, structure, "cpu", "cpu")
    assert set(settled.needed) == {"self_attn", "mlp"}
    assert settled.needed == {"self_attn": 4, "mlp": 7}
    assert settled.tails == {"self_attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}
    shuffled = replay.TwoStreamReplay(block, dataclasses.replace(structure, groups=structure.groups[::-1]), "cpu",
                                      "cpu")
    assert shuffled.needed == {} and shuffled.tails == {}


def test_replay_tail_needs_the_last_linears_output_untouched():
    """A child that updates its last linear's output in place, or returns more than it, is not replayed
    as that linear of its kept input."""
    model = tiny_model("llama")
    block = find_decoder_blocks(model)[1][0]
    hidden = torch.randn(1, 6, 48)
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, torch.arange(6)[None])}
    mlp = block.mlp
    mlp.forward = lambda x: mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).mul_(0.5)
    settled = replay.TwoStreamReplay(block, probe.probe_block(block, hidden, kwargs, "cpu"), "cpu", "cpu")
    assert settled.needed == {"self_attn": 4, "mlp": 7} and settled.tails == {"self_attn": "self_attn.o_proj"}
    attention = block.self_attn.forward  # attention that also returns a tensor besides o_proj's output
    block.self_attn.forward = lambda *a, **k: (lambda out: (out[0], out[0] * 2))(attention(*a, **k))
    settled = replay.TwoStreamReplay(block, probe.probe_block(block, hidden, kwargs, "cpu"), "cpu", "cpu")
    assert set(settled.needed) == {"self_attn", "mlp"} and settled.tails == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_check_catches_nan_and_inf_but_not_large_sums(dtype):
    x = torch.rand(3, 50, 41).to(dtype) + 1
    statistics.check_finite(x * 30000 if dtype == torch.float16 else x * 1e4, "ok")  # sums past fp16's range
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 7, 5] = bad
        with pytest.raises(pipeline.ActivationError, match="NaN or Inf"):
            statistics.check_finite(y, "here")
    y = x.clone()
    y[0, 0, 0], y[2, 1, 1] = float("inf"), -float("inf")  # they cancel to NaN, still caught
    with pytest.raises(pipeline.ActivationError):
        statistics.check_finite(y, "here")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_output_covariances_give_the_input_side_factors(kind, monkeypatch):
    """svd-llm folds down_proj's output into YᵀY (48² < 112² here) instead of its input's XᵀX; the
    factors match the XᵀX path. Qwen2's q/k/v carry a bias, which the output statistic must leave out:
    forcing every output-side group onto YᵀY covers it."""
    ids = _ids()
    used = []
    gram = solvers.solve_output_gram

    def model():
        m = tiny_model(kind)
        with torch.no_grad():
            for _, lin in block_linears(m.model.layers[0]).items():
                if lin.bias is not None:  # initialised to zero: give it something to leave out
                    lin.bias.uniform_(-1, 1)
        return m

    monkeypatch.setattr(solvers, "solve_output_gram", lambda W, G, k: used.append(W.shape) or gram(W, G, k))
    cfg = dict(method="svd-llm", ratio=0.4, solve_dtype="float64", track_error=False)
    natural = model()
    pipeline.compress_model(natural, ids, pipeline.CompressionConfig(**cfg), progress=False)
    assert (48, 112) in used  # down_proj by its output covariance
    used.clear()
    monkeypatch.setattr(solvers, "output_statistics", lambda method, shapes: solvers.output_side(method, shapes))
    forced = model()
    pipeline.compress_model(forced, ids, pipeline.CompressionConfig(**cfg), progress=False)
    assert (48, 48) in used  # q_proj (biased in Qwen2) and o_proj too
    monkeypatch.setattr(solvers, "output_statistics", lambda method, shapes: False)
    by_input = model()
    pipeline.compress_model(by_input, ids, pipeline.CompressionConfig(**cfg), progress=False)
    for model in (natural, forced):  # both fp32-accumulated: equal up to the rounding of small eigengaps
        for (name, lr), (_, ref) in zip(model.named_modules(), by_input.named_modules()):
            if isinstance(lr, LowRankLinear):
                got, want = lr.U @ lr.V.T, ref.U @ ref.V.T
                assert float((got - want).detach().norm() / want.detach().norm()) < 1e-3, name


@pytest.mark.parametrize("method,where", [("svd-llm", "q_proj"), ("svd-llm", "down_proj"), ("asvd", "down_proj"),
                                          ("asvd-max", "q_proj")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_folded_statistics_catch_a_bad_activation_in_any_batch(method, where, bad):
    """Single-stream methods check the folded sums, not each batch: one bad value in the last batch of
    a group's input (down_proj's input reaches svd-llm only through its output covariance) still stops
    the run and names the group."""
    model = tiny_model("llama")
    ids = _ids(6, 24)
    layer = model.model.layers[1]
    target = layer.self_attn.q_proj if where == "q_proj" else layer.mlp.down_proj
    calls = []

    def poison(mod, args):
        calls.append(1)
        if len(calls) == 3:  # the last of 3 batches of 2 windows
            x = args[0].clone()
            x[1, 5, 7] = bad
            return (x,)
    target.register_forward_pre_hook(poison)
    with pytest.raises(pipeline.ActivationError, match=f"block 1 .*{where}"):
        pipeline.compress_model(model, ids, pipeline.CompressionConfig(method=method, ratio=0.3, batch_size=2),
                                progress=False)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["aa-svd", "saes"])
def test_anchored_statistics_give_the_full_cross_covariance_factors(kind, method, monkeypatch):
    """Two-stream methods keep down_proj's 48-wide dense output and accumulate W·C = YᵀX' instead of
    its 112-wide input and C = XᵀX'; the solves match the C path. Forcing every group onto anchors
    covers Qwen2's biased q/k/v (the bias is not part of W·C). Layers are compared by their
    truncation loss: this tiny model's o_proj has near-equal singular values at its rank, so fp32
    rounding upstream turns its factors (not its loss) by a percent."""
    ids = _ids()

    def run(**patch):
        for name, fn in patch.items():
            monkeypatch.setattr(solvers, name, fn)
        model = tiny_model(kind)
        with torch.no_grad():
            for lin in block_linears(model.model.layers[0]).values():
                if lin.bias is not None:
                    lin.bias.uniform_(-1, 1)
        result = pipeline.compress_model(model, ids, pipeline.CompressionConfig(method=method, ratio=0.4,
                                                                                 solve_dtype="float64"), progress=False)
        return model, result

    kept = []
    cross = ops.cross_covariance_accumulate
    monkeypatch.setattr(ops, "cross_covariance_accumulate",
                        lambda acc, y, x: kept.append(tuple(acc.shape)) or cross(acc, y, x))
    natural = run()
    assert set(kept) == {(48, 112)}  # down_proj only
    forced = run(anchored_statistics=lambda m, shapes: "C" in m.needs and "A" not in m.needs)
    assert (24, 48) in kept  # k_proj, biased in Qwen2
    by_c = run(anchored_statistics=lambda *a: False)
    if method == "saes":  # ACES's β moves with rounding (at block 0, X' = X makes RER flat in β): compare outputs
        with torch.no_grad():
            dense = tiny_model(kind)(ids).logits
            errors = [_rel_err(model(ids).logits, dense) for model, _ in (natural, forced, by_c)]
        assert errors[0] == pytest.approx(errors[2], rel=0.05) and errors[1] == pytest.approx(errors[2], rel=0.05)
        return
    for _, result in (natural, forced):
        for block, ref in zip(result.blocks, by_c[1].blocks):
            scale = max(module["truncation_loss"] for module in ref.modules.values())
            for name, module in ref.modules.items():
                assert block.modules[name]["truncation_loss"] == pytest.approx(module["truncation_loss"], rel=2e-3,
                                                                               abs=1e-4 * scale), (block.index, name)
