"""The statistics of one block: what each group of linears collects (its plan), and collecting it.

Single-stream methods read only the dense stream X: its statistics are folded while the dense block
propagates X (`dense_pass`). Two-stream methods pair X with X', the input in the model compressed so
far: the dense pass keeps what each group will pair (its dense inputs X, or its linears' dense
outputs Y), then `two_stream_statistics` re-runs the partly compressed block for X', group by group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from lowrank_engine import distributed, ops, solvers
from lowrank_engine.probe import group_inputs


class ActivationError(ValueError):
    """NaN or Inf reached a layer's input."""


def check_finite(x: torch.Tensor, where: str) -> None:
    # one fp32 reduction (a NaN or Inf anywhere makes the sum non-finite) instead of an elementwise
    # mask: isfinite(x).all() cost ~7% of a two-stream run on CPU
    if not bool(torch.isfinite(x.sum(dtype=torch.float32))):
        raise ActivationError(f"NaN or Inf in the activations entering {where}")


def check_statistics(stats: solvers.GroupStatistics, where: str) -> None:
    """A NaN or Inf in any folded input reaches the diagonal of XᵀX (or YᵀY, or the |x| sums): one
    check per block instead of a pass over every batch's activations."""
    for t in stats.accumulators():
        if not bool(torch.isfinite(t.diagonal() if t.dim() == 2 else t).all()):
            raise ActivationError(f"NaN or Inf in the activations entering {where} (or their squares overflow "
                                  "float32)")


@dataclass
class GroupPlan:
    """A group of linears sharing one input: which of them are compressed, and their path."""
    linears: list[str]  # in execution order
    compressed: list[str]  # those with a rank (the others stay dense)
    path: solvers.GroupPath
    ranks: dict = field(default_factory=dict)  # compressed linear → rank
    shapes: dict = field(default_factory=dict)  # compressed linear → (out, in)

    @property
    def first(self) -> str:
        return self.linears[0]


def plan_groups(method: solvers.Method, groups: list[list[str]], linears: dict[str, nn.Linear],
                ranks: dict[str, Optional[int]]) -> list[GroupPlan]:
    plans = []
    for group in groups:
        compressed = [n for n in group if ranks[n] is not None]
        shapes = {n: tuple(linears[n].weight.shape) for n in compressed}
        plans.append(GroupPlan(group, compressed, solvers.group_path(method, list(shapes.values())),
                               {n: ranks[n] for n in compressed}, shapes))
    return plans


def _zeros(*shape, device) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float32, device=device)


def _single_stream_accumulators(plan: GroupPlan, linears: dict, device) -> solvers.GroupStatistics:
    """D, A, or the outputs' YᵀY of the group's compressed linears (none when all stay dense)."""
    if plan.path.statistics == "D":
        return solvers.GroupStatistics(D=_zeros(linears[plan.first].in_features, device=device))
    if plan.path.statistics == "YtY":
        return solvers.GroupStatistics(outputs={n: _zeros(linears[n].out_features, linears[n].out_features,
                                                          device=device) for n in plan.compressed})
    if plan.path.statistics == "A":
        n = linears[plan.first].in_features
        return solvers.GroupStatistics(A=_zeros(n, n, device=device))
    return solvers.GroupStatistics()


def _fold(stats: solvers.GroupStatistics, x: torch.Tensor, diagonal: Optional[str]) -> None:
    """Add one batch of inputs to A, or to D (Σ|x| or max|x| per channel); YᵀY is folded by output hooks."""
    if stats.outputs is not None:
        return
    if stats.A is not None:
        ops.covariance_accumulate(stats.A, x)
        return
    flat = x.reshape(-1, x.shape[-1]).float().abs()
    if diagonal == "absmax":
        torch.maximum(stats.D, flat.amax(0), out=stats.D)
    else:
        stats.D += flat.sum(0)
    stats.tokens += flat.shape[0]


def _without_bias(mod: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return out if mod.bias is None else out - mod.bias


@dataclass
class DensePass:
    """What the dense block's pass leaves behind: its output X_next and, per group (by first linear),
    folded single-stream statistics, or the dense inputs / outputs a two-stream group pairs with X'."""
    x_next: object
    statistics: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # first linear → stream of X
    outputs: dict = field(default_factory=dict)  # first linear → {linear → stream of Y}


def dense_pass(dense: nn.Module, plans: list[GroupPlan], method: solvers.Method, propagate, store, device,
               where: str) -> DensePass:
    """Run the dense block over its stream (`propagate(block)` returns the output stream), collecting
    what each group's plan asks of the dense side."""
    linears = {n: dense.get_submodule(n) for p in plans for n in p.linears}
    fold = not method.two_stream and bool(method.needs & {"A", "D"})
    statistics = {p.first: _single_stream_accumulators(p, linears, device) for p in plans} if fold else {}
    anchored = [p for p in plans if p.path.statistics == "anchored"]
    outputs = {p.first: {n: store.stream("out") for n in p.compressed} for p in anchored}
    inputs = {p.first: store.stream("in") for p in plans if p.first not in outputs} \
        if method.two_stream and method.needs & {"A", "C"} else {}

    def keep_input(first, x):
        if fold and statistics[first].accumulators():  # checked once, on the sums (below)
            _fold(statistics[first], x, method.diagonal)
            return
        check_finite(x, f"{where} {first}")
        if first in inputs:
            inputs[first].append(x)

    handles = [dense.get_submodule(p.first).register_forward_pre_hook(
        lambda mod, args, first=p.first: keep_input(first, args[0]))
        for p in plans if fold or p.first in inputs or p.first in outputs]
    handles += [dense.get_submodule(name).register_forward_hook(
        lambda mod, args, out, stat=stat: ops.covariance_accumulate(stat, _without_bias(mod, out)))
        for st in statistics.values() for name, stat in (st.outputs or {}).items()]
    handles += [dense.get_submodule(name).register_forward_hook(
        lambda mod, args, out, kept=kept: kept.append(_without_bias(mod, out)))
        for kept_outputs in outputs.values() for name, kept in kept_outputs.items()]
    try:
        x_next = propagate(dense)
    finally:
        for h in handles:
            h.remove()
    for first, st in statistics.items():
        check_statistics(st, f"{where} {first}")
        distributed.reduce_statistics(st, method.diagonal)
    return DensePass(x_next, statistics, inputs, outputs)


def two_stream_statistics(plan: GroupPlan, comp: nn.Module, xp_stream, kwargs: list, dense: DensePass,
                          needs: frozenset, device, where: str, replay=None) -> solvers.GroupStatistics:
    """A group's two-stream statistics: A, B, C from X and X', or B and the anchors W·C = YᵀX' from X' and
    the kept dense outputs Y. X' is the group's input in the partly compressed block `comp`."""
    n = comp.get_submodule(plan.first).in_features
    dense_inputs, dense_outputs = dense.inputs.get(plan.first), dense.outputs.get(plan.first)
    if dense_outputs is not None:
        stats = solvers.GroupStatistics(B=_zeros(n, n, device=device), anchors={
            name: _zeros(comp.get_submodule(name).out_features, n, device=device) for name in dense_outputs})
    else:
        stats = solvers.GroupStatistics(A=_zeros(n, n, device=device) if "A" in needs else None,
                                        B=_zeros(n, n, device=device) if needs & {"B", "C"} else None,
                                        C=_zeros(n, n, device=device) if "C" in needs else None)
    where = f"{where} {', '.join(plan.linears)}"
    for b, kw in enumerate(kwargs):
        x = dense_inputs[b].to(device) if dense_inputs is not None else None
        xp = group_inputs(comp, plan.first, xp_stream[b], kw, device,
                          replay.replay(b) if replay else None) if stats.B is not None else None
        if replay and xp is not None:
            replay.keep_group_input(plan.linears, b, xp)
        for t in (x, xp):
            if t is not None:
                check_finite(t, where)
        if stats.B is not None and stats.C is not None:
            ops.covariance_accumulate(stats.A, x, stats.B, stats.C, xp)
        elif stats.B is not None:
            ops.covariance_accumulate(stats.B, xp)
        if stats.A is not None and stats.C is None:
            ops.covariance_accumulate(stats.A, x)
        for name, anchor in (stats.anchors or {}).items():
            ops.cross_covariance_accumulate(anchor, dense_outputs[name][b].to(device), xp)
    distributed.all_reduce_sum_(stats.A, stats.B, stats.C, *(stats.anchors or {}).values())
    return stats


def release_group(dense: DensePass, first: str) -> None:
    """Free what the dense pass kept for a group once its statistics are collected."""
    if first in dense.inputs:
        dense.inputs.pop(first).release()
    for kept in dense.outputs.pop(first, {}).values():
        kept.release()
