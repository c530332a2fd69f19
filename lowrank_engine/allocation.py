"""Rank allocation beyond uniform: every policy returns a rank map {module name: rank or None}
(None keeps the module dense) that meets the global ratio to within one rank unit per matrix.

- `waterfill`: spend the global parameter budget where the truncation loss falls fastest. The
  loss of a linear at rank k is its whitened spectrum's tail Σ_{i>k} σ_i² (normalized by the
  layer's total, so every layer's output counts alike); adding rank unit k+1 gains σ_{k+1}² at a
  cost of m+n parameters. The gains of one layer never increase, so the greedy choice by gain per
  parameter solves the fractional relaxation exactly; with unequal costs m+n the integer result
  is within one rank unit per matrix of it.
- `last_layers` (ResSVD): keep the first N−k blocks dense and compress the last k blocks at the
  ratio that removes the same number of parameters in total.
"""
from __future__ import annotations

import heapq
import math
from typing import Optional

import torch

from lowrank_engine import solvers


def kept_budget(shapes: dict[str, tuple[int, int]], ratio: float) -> int:
    """Parameters the factors may keep: (1 − ratio) of the compressible linears."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1) (fraction of parameters removed), got {ratio}")
    return math.floor((1.0 - ratio) * sum(m * n for m, n in shapes.values()))


def waterfill(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ratio: float,
              min_rank: int = 1) -> dict[str, int]:
    """Greedy water-filling of ranks by normalized truncation-loss gain per parameter."""
    budget = kept_budget(shapes, ratio)
    ranks, heap = {}, []
    for name, (m, n) in shapes.items():
        s2 = spectra[name].double().pow(2)
        total = float(s2.sum()) or 1.0
        ranks[name] = min_rank
        budget -= min_rank * (m + n)
        gains = (s2 / total).tolist()
        cap = min(solvers.break_even_rank(m, n) - 1, min(m, n) - 1, len(gains))
        if min_rank < cap:
            heapq.heappush(heap, (-gains[min_rank] / (m + n), name, gains, cap))
    if budget < 0:
        raise ValueError(f"ratio {ratio} leaves less than rank {min_rank} per matrix")
    while heap:
        _, name, gains, cap = heapq.heappop(heap)
        m, n = shapes[name]
        if m + n > budget:
            continue  # too wide for what is left; narrower matrices may still fit
        budget -= m + n
        ranks[name] += 1
        if ranks[name] < cap:
            heapq.heappush(heap, (-gains[ranks[name]] / (m + n), name, gains, cap))
    return ranks


def last_layers(block_shapes: list[dict[str, tuple[int, int]]], ratio: float, k: int) -> dict[str, Optional[int]]:
    """First N−k blocks dense, the last k at the ratio removing `ratio` of all compressible parameters.

    `block_shapes[i]` maps full module names of block i to (m, n)."""
    N = len(block_shapes)
    if not 1 <= k <= N:
        raise ValueError(f"last-layers k must be in [1, {N}], got {k}")
    total = sum(m * n for b in block_shapes for m, n in b.values())
    tail = sum(m * n for b in block_shapes[N - k:] for m, n in b.values())
    local = ratio * total / tail
    if local >= 1.0:
        raise ValueError(f"compressing only the last {k} of {N} blocks cannot remove {ratio:.0%} of the parameters "
                         f"(it would take {local:.0%} of theirs); use a larger k (> {math.ceil(N * ratio)})")
    ranks: dict[str, Optional[int]] = {name: None for b in block_shapes[:N - k] for name in b}
    for b in block_shapes[N - k:]:
        ranks.update({name: solvers.rank_for_ratio(m, n, local) for name, (m, n) in b.items()})
    return ranks


def model_shapes(source) -> list[dict[str, tuple[int, int]]]:
    """Per block, full module name → (out, in) of every compressible linear (from the skeleton)."""
    from lowrank_engine.models import block_linears

    return [{f"{source.blocks_name}.{i}.{n}": (m.out_features, m.in_features) for n, m in block_linears(b).items()}
            for i, b in enumerate(source.blocks)]


def dense_spectra(path: str, input_ids: torch.Tensor, device: str = "cpu", batch_size: int = 8,
                  trust_remote_code: bool = False, progress: bool = True, offload: str = "none",
                  solve_dtype=None, max_memory=None, compute_dtype=None) -> dict[str, torch.Tensor]:
    """σ(W L_A) for every linear: SVD-LLM's whitened spectra on the dense statistics, one streamed pass
    under the run's own device, offload, precision and memory budget."""
    from lowrank_engine import pipeline

    source = pipeline.LazyBlockSource(path, trust_remote_code, keep_compressed=False)
    cfg = pipeline.CompressionConfig(method="svd-llm", ratio=0.5, device=device, batch_size=batch_size,
                                     track_error=False, offload=offload, solve_dtype=solve_dtype,
                                     compute_dtype=compute_dtype,
                                     max_memory=max_memory)
    compressor = pipeline.Compressor(source, cfg, progress=progress)
    compressor.spectra = {}
    compressor.run(input_ids)
    return compressor.spectra


def waterfill_from_model(path: str, source, input_ids: torch.Tensor, ratio: float, **run_options) -> dict[str, int]:
    """The water-filled rank map of a checkpoint: its dense spectra (one streamed pass with
    `run_options`, see dense_spectra), then waterfill over every linear of `source`."""
    spectra = dense_spectra(path, input_ids, **run_options)
    return waterfill(spectra, {k: v for b in model_shapes(source) for k, v in b.items()}, ratio)


def kept_parameters(ranks: dict[str, Optional[int]], shapes: dict[str, tuple[int, int]]) -> int:
    return sum(m * n if ranks.get(name) is None else ranks[name] * (m + n) for name, (m, n) in shapes.items())
