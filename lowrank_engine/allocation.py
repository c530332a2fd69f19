"""Rank allocation beyond uniform: every policy returns a rank map {module name: rank or None}
(None keeps the module dense) that meets the global ratio to within one rank unit per matrix.

- `waterfill`: spend the global parameter budget where the truncation loss falls fastest. The
  loss of a linear at rank k is its whitened spectrum's tail Σ_{i>k} σ_i² (normalized by the
  layer's total, so every layer's output counts alike); adding rank unit k+1 gains σ_{k+1}² at a
  cost of m+n parameters. The gains of one layer never increase, so the greedy choice by gain per
  parameter solves the fractional relaxation exactly; with unequal costs m+n the integer result
  is within one rank unit per matrix of it.
- `waterfill(..., groups=matrix_types(...))` (type-waterfill): the same greedy with one rank per
  matrix type shared by every block; a unit costs and gains the sum over the group. Moving budget between
  types and not depths is what survived refinement on SmolLM2 (README, the `best` preset).
- `waterfill(..., allow_dense=True)` (type-waterfill-dense, `best`): a group may also stay dense. Near
  break-even rank a factor pair stores almost as much as W yet still loses the spectrum's tail, so storing
  W whole can be the cheaper way to keep a type exact: every subset of groups is tried dense, the rest are
  water-filled with the budget left, and the smallest total normalized loss wins (exact over the subsets,
  2^groups of them: meant for the few matrix types of a block).
- `last_layers` (ResSVD): keep the first N−k blocks dense and compress the last k blocks at the
  ratio that removes the same number of parameters in total. `search_last_layers` picks k by the
  calibration error: it compresses with a few feasible k on a slice of the calibration windows and
  keeps the k whose last block output is closest to the dense model's.
"""
from __future__ import annotations

import heapq
import itertools
import math
from typing import Optional

import torch

from lowrank_engine import solvers


def kept_budget(shapes: dict[str, tuple[int, int]], ratio: float) -> int:
    """Parameters the factors may keep: (1 − ratio) of the compressible linears."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1) (fraction of parameters removed), got {ratio}")
    return math.floor((1.0 - ratio) * sum(m * n for m, n in shapes.values()))


MAX_DENSE_GROUPS = 12  # allow_dense tries 2^groups subsets


def waterfill(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ratio: float,
              min_rank: int = 1, groups: Optional[dict[str, str]] = None,
              allow_dense: bool = False) -> dict[str, Optional[int]]:
    """Greedy water-filling of ranks by normalized truncation-loss gain per parameter.

    `groups` maps each name to a group whose matrices share one rank (one rank unit of a group costs the
    sum of its members' m+n and gains the sum of their normalized σ²); without it every matrix is its own
    group. `allow_dense`: a group may instead keep its matrices dense (rank None), chosen over every subset
    of groups by the total normalized loss that is left."""
    budget = kept_budget(shapes, ratio)
    members: dict[str, list[str]] = {}
    for name in shapes:
        members.setdefault(groups[name] if groups else name, []).append(name)
    units = {group: _rank_units(names, spectra, shapes) for group, names in members.items()}
    ranks = _fill(units, budget, min_rank)
    if ranks is None:
        raise ValueError(f"ratio {ratio} leaves less than rank {min_rank} per matrix")
    if allow_dense:
        if len(members) > MAX_DENSE_GROUPS:
            raise ValueError(f"a dense choice per group tries 2^groups subsets: at most {MAX_DENSE_GROUPS} groups, "
                             f"got {len(members)} (group the matrices by type)")
        best_loss = _loss(units, ranks)
        for count in range(1, len(members)):
            for dense in itertools.combinations(members, count):
                rest = {group: u for group, u in units.items() if group not in dense}
                filled = _fill(rest, budget - sum(units[group][3] for group in dense), min_rank)
                loss = _loss(rest, filled) if filled is not None else math.inf
                if loss < best_loss:
                    best_loss, ranks = loss, {**filled, **{group: None for group in dense}}
    return {name: ranks[group] for group, names in members.items() for name in names}


def _rank_units(names: list[str], spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]) -> tuple:
    """(gain of each rank unit, largest rank below break-even, parameters per unit, parameters kept dense) of
    a group of matrices sharing one rank."""
    cost = sum(sum(shapes[name]) for name in names)
    summed = torch.zeros(max(len(spectra[name]) for name in names), dtype=torch.float64)
    for name in names:
        s2 = spectra[name].double().pow(2)
        summed[:len(s2)] += s2 / (float(s2.sum()) or 1.0)
    cap = min(min(solvers.break_even_rank(*shapes[name]), min(shapes[name])) - 1 for name in names)
    cap = min(cap, min(len(spectra[name]) for name in names))
    return summed.tolist(), cap, cost, sum(shapes[name][0] * shapes[name][1] for name in names)


def _fill(units: dict[str, tuple], budget: int, min_rank: int) -> Optional[dict[str, int]]:
    """The greedy ranks of `units`' groups within `budget` parameters; None if min_rank does not fit."""
    ranks, heap = {}, []
    for group, (gains, cap, cost, _) in units.items():
        ranks[group] = min_rank
        budget -= min_rank * cost
        if min_rank < cap:
            heapq.heappush(heap, (-gains[min_rank] / cost, group))
    if budget < 0:
        return None
    while heap:
        _, group = heapq.heappop(heap)
        gains, cap, cost, _ = units[group]
        if cost > budget:
            continue  # too wide for what is left; narrower groups may still fit
        budget -= cost
        ranks[group] += 1
        if ranks[group] < cap:
            heapq.heappush(heap, (-gains[ranks[group]] / cost, group))
    return ranks


def _loss(units: dict[str, tuple], ranks: dict[str, int]) -> float:
    """Normalized truncation loss left at `ranks`: the spectra's tails summed over the groups."""
    return sum(sum(units[group][0][ranks[group]:]) for group in units)


def matrix_types(block_shapes: list[dict[str, tuple[int, int]]], blocks_name: str) -> dict[str, str]:
    """Each full module name → its name inside the block ('self_attn.q_proj'): the same linear of every block."""
    return {name: name[len(f"{blocks_name}.{i}."):] for i, b in enumerate(block_shapes) for name in b}


def _tail_ratio(block_shapes: list[dict[str, tuple[int, int]]], ratio: float, k: int) -> float:
    """The ratio the last k blocks must lose for the whole model to lose `ratio`."""
    total = sum(m * n for b in block_shapes for m, n in b.values())
    return ratio * total / sum(m * n for b in block_shapes[len(block_shapes) - k:] for m, n in b.values())


def last_layers(block_shapes: list[dict[str, tuple[int, int]]], ratio: float, k: int) -> dict[str, Optional[int]]:
    """First N−k blocks dense, the last k at the ratio removing `ratio` of all compressible parameters.

    `block_shapes[i]` maps full module names of block i to (m, n)."""
    N = len(block_shapes)
    if not 1 <= k <= N:
        raise ValueError(f"last-layers k must be in [1, {N}], got {k}")
    local = _tail_ratio(block_shapes, ratio, k)
    if local >= 1.0:
        raise ValueError(f"compressing only the last {k} of {N} blocks cannot remove {ratio:.0%} of the parameters "
                         f"(it would take {local:.0%} of theirs); use a larger k (> {math.ceil(N * ratio)})")
    ranks: dict[str, Optional[int]] = {name: None for b in block_shapes[:N - k] for name in b}
    for b in block_shapes[N - k:]:
        ranks.update({name: solvers.rank_for_ratio(m, n, local) for name, (m, n) in b.items()})
    return ranks


def feasible_last_layers(block_shapes: list[dict[str, tuple[int, int]]], ratio: float, count: int = 5) -> list[int]:
    """Up to `count` values of k, evenly spread from the smallest k that can remove `ratio` to all N blocks."""
    N = len(block_shapes)
    smallest = next((k for k in range(1, N + 1) if _tail_ratio(block_shapes, ratio, k) < 1.0), None)
    if smallest is None:
        raise ValueError(f"no number of last blocks can remove {ratio:.0%} of the parameters")
    if count <= 1 or smallest == N:
        return [N] if count <= 1 else [smallest]
    step = (N - smallest) / (count - 1)
    return sorted({round(smallest + i * step) for i in range(count)})


def search_last_layers(path: str, input_ids: torch.Tensor, ratio: float, method: str,
                       candidates: Optional[list[int]] = None, windows: int = 8, trust_remote_code: bool = False,
                       progress: bool = True, **run_options) -> tuple[int, dict[int, float]]:
    """The k of `last_layers` with the smallest calibration error: each candidate compresses the model
    with `method` on the first `windows` calibration windows; the error is the relative MSE of the last
    block's output against the dense model's (‖X'−X‖²/‖X‖²). Returns (k, {k: error})."""
    from lowrank_engine import pipeline

    shapes = model_shapes(pipeline.LazyBlockSource(path, trust_remote_code))
    errors: dict[int, float] = {}
    for k in candidates or feasible_last_layers(shapes, ratio):
        source = pipeline.LazyBlockSource(path, trust_remote_code, keep_compressed=False)
        cfg = pipeline.CompressionConfig(method=method, ratio=None, track_error=True,
                                         rank_map=last_layers(shapes, ratio, k), **run_options)
        result = pipeline.Compressor(source, cfg, progress=False).run(input_ids[:windows])
        errors[k] = result.blocks[-1].output_rel_mse
        if progress:
            print(f"[last-layers] k={k}: last-block relative error {errors[k]:.4g}", flush=True)
    return min(errors, key=errors.get), errors


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
    return pipeline.Compressor(source, cfg, progress=progress, keep_spectra=True).run(input_ids).spectra


def waterfill_from_model(path: str, source, input_ids: torch.Tensor, ratio: float, by_type: bool = False,
                         allow_dense: bool = False, **run_options) -> dict[str, Optional[int]]:
    """The water-filled rank map of a checkpoint: its dense spectra (one streamed pass with
    `run_options`, see dense_spectra), then waterfill over every linear of `source`; `by_type`: one rank per
    matrix type, shared by every block; `allow_dense`: a type may stay dense."""
    spectra = dense_spectra(path, input_ids, **run_options)
    block_shapes = model_shapes(source)
    groups = matrix_types(block_shapes, source.blocks_name) if by_type else None
    return waterfill(spectra, {k: v for b in block_shapes for k, v in b.items()}, ratio, groups=groups,
                     allow_dense=allow_dense)


def kept_parameters(ranks: dict[str, Optional[int]], shapes: dict[str, tuple[int, int]]) -> int:
    return sum(m * n if ranks.get(name) is None else ranks[name] * (m + n) for name, (m, n) in shapes.items())
