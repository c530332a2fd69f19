"""The architecture matrix: the contract behind `models.SUPPORTED_ARCHITECTURES`.

One tiny random float32 config per supported model type, each with the feature that matters switched on
(GQA, sliding windows shorter than the test sequence, sliding/global alternation with a rotary base per
layer type, q/k norms, four norms per block, fused qkv/gate-up projections, biases, Granite's
multipliers), and the three measurements the tests and `benchmarks/architectures.py` both use:

- `stream_divergence`: the engine's dense stream, streamed block by block from a checkpoint saved by
  transformers, against the model's own forward, at every block;
- `methods_roundtrip`: every method compresses the model, and save → load is bit-identical;
- `block_error_mismatch`: the per-block errors the engine reports for a streamed run against the errors
  of the saved checkpoint run through transformers' own forward, block by block.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable

import torch
from torch import nn

SEQLEN = 40  # tokens per window: longer than every sliding window below
WINDOW = 12  # the sliding window of every config that has one
WINDOWS, BATCH = 4, 2  # calibration windows, windows per batch: two batches

TINY_DEFAULTS = dict(vocab_size=128, hidden_size=64, intermediate_size=104, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     initializer_range=0.08,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)  # special tokens inside the tiny vocabulary
_ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _config(class_name: str, **overrides):
    import transformers

    return getattr(transformers, class_name)(**{**TINY_DEFAULTS, **overrides})


# model_type → the tiny config that exercises what makes the architecture different
TINY_CONFIGS: dict[str, Callable] = {
    "llama": lambda: _config("LlamaConfig"),  # GQA (4 query heads, 2 KV heads)
    "mistral": lambda: _config("MistralConfig", sliding_window=WINDOW),  # one sliding mask for every layer
    # q/k/v biases; the last two layers slide (max_window_layers)
    "qwen2": lambda: _config("Qwen2Config", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    # q/k norms; sliding and full layers alternate (each block gets its own mask)
    "qwen3": lambda: _config("Qwen3Config", head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                             layer_types=list(_ALTERNATING)),
    # sliding/global alternation, logit soft-capping, four norms per block, (1 + w) norm scales
    "gemma2": lambda: _config("Gemma2Config", head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                              layer_types=list(_ALTERNATING)),
    # as gemma2 plus q/k norms and another RoPE base for global layers (each block its own rotary table)
    "gemma3_text": lambda: _config("Gemma3TextConfig", head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                "sliding_attention"]),
    "phi3": lambda: _config("Phi3Config", sliding_window=WINDOW),  # fused qkv_proj and gate_up_proj
    "olmo2": lambda: _config("Olmo2Config"),  # q/k norms over whole projections, norms after attention and MLP
    # embedding, residual, attention and logit multipliers
    "granite": lambda: _config("GraniteConfig", embedding_multiplier=3.0, residual_multiplier=0.4,
                               attention_multiplier=0.2, logits_scaling=2.0),
}


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    """A random float32 model of `model_type`, in eval mode. Norm weights are randomized too, so that a
    norm applied with the wrong weight (or not at all) shows."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type]()).float().eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                module.weight.add_(0.3 * torch.randn_like(module.weight))
    return model


def calibration_ids(model: nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.get_text_config().vocab_size, (WINDOWS, SEQLEN), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@torch.no_grad()
def block_outputs(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder block's output in the model's own forward: `output_hidden_states` for all but the
    last block (transformers replaces the last entry with the final norm's output), a hook for the last."""
    from lowrank_engine.models import find_decoder_blocks

    _, blocks = find_decoder_blocks(model)
    last = []
    handle = blocks[-1].register_forward_hook(lambda mod, args, out: last.append(out[0] if isinstance(out, tuple)
                                                                                  else out))
    try:
        hidden = model(input_ids=input_ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        handle.remove()
    return list(hidden[1:len(blocks)]) + last


@torch.no_grad()
def stream_divergence(directory: str, input_ids: torch.Tensor, block_0_arguments: bool = False) -> list[float]:
    """Relative error ‖engine − model‖/‖model‖ of each block's output: the engine streams the checkpoint
    in `directory` one block at a time (the others on `meta`) with the arguments it captured for each
    block; the model is transformers' own, loaded whole. `block_0_arguments` replays block 0's arguments
    to every block instead (what the engine did before), to show what the matrix catches."""
    from transformers import AutoModelForCausalLM

    from lowrank_engine import pipeline

    reference = block_outputs(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval(), input_ids)
    source = pipeline.LazyBlockSource(directory)
    hidden: list = []
    kwargs = pipeline.capture_block_inputs(source.model, source.blocks, input_ids, BATCH, "cpu", hidden)
    errors = []
    for index in range(len(source.blocks)):
        block = source.materialize(index, "cpu")
        hidden = [pipeline.run_block(block, x, kw, "cpu")
                  for x, kw in zip(hidden, kwargs[0 if block_0_arguments else index])]
        errors.append(_rel(torch.cat(hidden), reference[index]))
        source.release(index, block)
    return errors


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def methods_roundtrip(model_type: str, methods=None, ratio: float = 0.4) -> dict[str, dict]:
    """method → {"ok": compressed with every linear factorized and finite logits, "roundtrip": save → load
    gives bit-identical tensors and logits}. `aa-svd+refine` covers refinement (norms are trained)."""
    from lowrank_engine import checkpoint, pipeline, solvers
    from lowrank_engine.models import block_linears, find_decoder_blocks
    from lowrank_engine.modules import LowRankLinear

    methods = methods or sorted(solvers.METHODS) + ["aa-svd+refine"]
    out = {}
    for method in methods:
        model = tiny_model(model_type)
        ids = calibration_ids(model)
        base, _, refined = method.partition("+")
        cfg = pipeline.CompressionConfig(method=base, ratio=ratio, batch_size=BATCH, refine=bool(refined),
                                         refine_passes=2)
        compressor = pipeline.Compressor(pipeline.BlockSource(model), cfg, progress=False)
        compressor.prepare(ids, lambda: model)
        compressor.run(ids)
        with torch.no_grad():
            logits = model(ids).logits
        _, blocks = find_decoder_blocks(model)
        ok = bool(torch.isfinite(logits).all()) and all(
            isinstance(m, LowRankLinear) for b in blocks for m in block_linears(b).values())
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save(model, os.path.join(tmp, "ckpt"), method=method, ratio=ratio)
            loaded, _ = checkpoint.load(os.path.join(tmp, "ckpt"))
            with torch.no_grad():
                same_logits = torch.equal(loaded(ids).logits, logits)
            roundtrip = same_logits and _same_state(model, loaded)
        out[method] = {"ok": ok, "roundtrip": roundtrip}
    return out


@torch.no_grad()
def block_error_mismatch(directory: str, input_ids: torch.Tensor, method: str = "svd-llm",
                         ratio: float = 0.4) -> dict:
    """Compress the checkpoint in `directory` as the CLI does (streamed, per-block files, assembled),
    then measure each block's relative output error ‖Y' − Y‖²/‖Y‖² with transformers' own forward of the
    saved checkpoint against the dense model. Returns the reported and measured errors and the largest
    relative mismatch between them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowrank_engine import checkpoint, pipeline

    with tempfile.TemporaryDirectory() as tmp:
        source = pipeline.LazyBlockSource(directory)
        cfg = pipeline.CompressionConfig(method=method, ratio=ratio, batch_size=BATCH)
        work = os.path.join(tmp, "work")
        os.makedirs(work)
        result = pipeline.Compressor(source, cfg, work_dir=work, progress=False).run(input_ids)
        output = os.path.join(tmp, "out")
        checkpoint.assemble_checkpoint(work, output, source.non_block_state(), AutoConfig.from_pretrained(directory),
                                       None, checkpoint.build_lowrank_config(result.ranks, method, ratio, {}))
        compressed, _ = checkpoint.load(output)
        dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        measured = [float((c.double() - d.double()).pow(2).sum() / d.double().pow(2).sum())
                    for c, d in zip(block_outputs(compressed, input_ids), block_outputs(dense, input_ids))]
    reported = [b.output_rel_mse for b in result.blocks]
    mismatch = max(abs(r - m) / max(abs(m), 1e-300) for r, m in zip(reported, measured))
    return {"reported": reported, "measured": measured, "max_mismatch": mismatch}


def saved_checkpoint(model_type: str, directory: str) -> str:
    """`tiny_model(model_type)` written by transformers itself (`save_pretrained`)."""
    tiny_model(model_type).save_pretrained(directory)
    return directory


def measure(model_type: str, methods=None) -> dict:
    """The matrix record of one architecture."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = saved_checkpoint(model_type, os.path.join(tmp, "dense"))
        model = tiny_model(model_type)
        ids = calibration_ids(model)
        stream = stream_divergence(directory, ids)
        stream_block_0 = stream_divergence(directory, ids, block_0_arguments=True)
        errors = block_error_mismatch(directory, ids)
    runs = methods_roundtrip(model_type, methods)
    return {"model_type": model_type, "blocks": len(stream), "seqlen": SEQLEN,
            "sliding_window": getattr(model.config, "sliding_window", None),
            "layer_types": getattr(model.config, "layer_types", None),
            "max_stream_rel_err": max(stream), "stream_rel_err": stream,
            "max_stream_rel_err_block_0_arguments": max(stream_block_0),
            "max_block_error_mismatch": errors["max_mismatch"], "block_errors_reported": errors["reported"],
            "block_errors_measured": errors["measured"],
            "methods_ok": sorted(m for m, r in runs.items() if r["ok"]),
            "methods_failed": sorted(m for m, r in runs.items() if not r["ok"]),
            "roundtrip_ok": all(r["roundtrip"] for r in runs.values())}


