"""Where a vLLM decode step spends its time in the linears: `LLM(...).apply_model(time_linears)`.

Run inside vLLM's worker (apply_model ships the function by reference, so it lives in an importable
module), on dense and factorized models alike: each linear is called eagerly, as vLLM's compiled graph
calls it, on random inputs of `tokens` rows, and timed alone.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch


def _timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def time_linears(model: torch.nn.Module, tokens: int = 1, repeats: int = 30) -> dict:
    """Milliseconds per decode step of `tokens` rows, summed over the blocks, per kind of linear
    (qkv_proj, o_proj, gate_up_proj, down_proj, lm_head), and the method that serves each kind."""
    from vllm.model_executor.layers.linear import LinearBase

    per_kind, methods = defaultdict(float), {}
    with torch.inference_mode():
        for name, module in model.named_modules():
            if not isinstance(module, LinearBase):
                continue
            kind = name.rsplit(".", 1)[-1]
            dtype = module.params_dtype
            width = getattr(module, "input_size_per_partition", module.input_size)
            x = torch.randn(tokens, width, dtype=dtype)
            per_kind[kind] += 1000.0 * _timed(lambda: module.quant_method.apply(module, x, module.bias), repeats)
            methods[kind] = type(module.quant_method).__name__
        head = getattr(model, "lm_head", None)
        if head is not None and hasattr(head, "quant_method"):
            x = torch.randn(tokens, head.embedding_dim, dtype=head.weight.dtype)
            per_kind["lm_head"] = 1000.0 * _timed(lambda: head.quant_method.apply(head, x, None), repeats)
            methods["lm_head"] = type(head.quant_method).__name__
    return {"ms": dict(per_kind), "methods": methods, "threads": torch.get_num_threads()}
