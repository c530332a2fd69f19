"""The memory plan: what one block of the pipeline needs on each device, checked before any work.

The plan is an upper estimate built from tensor shapes only (no weights are read): the largest
block twice (the dense block and its compressed copy), the non-block tensors, the statistics
(fp32), the solver's workspace (in the solve dtype), one batch's forward activations, and the
two activation streams with their successors wherever `--offload` puts them.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from lowrank_engine.models import block_linears
from lowrank_engine.solvers import group_path

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
PROCESS_BASELINE = 600 * 2**20  # torch, transformers and the Python process itself (measured on CPU)


class MemoryBudgetError(ValueError):
    """The budget cannot hold one block of the pipeline."""


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 24GiB, 60GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_budget(spec: str, compute_device: str) -> dict[str, int]:
    """'20GiB' (the compute device) or 'cuda:60GiB,cpu:24GiB' → {device type: bytes}."""
    budget = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        device, sep, size = part.rpartition(":")
        if not sep:
            device = torch.device(compute_device).type
        budget[torch.device(device).type] = parse_size(size)
    return budget


@dataclass
class MemoryPlan:
    parts: dict = field(default_factory=lambda: defaultdict(dict))  # device type → {item: bytes}

    def add(self, device: str, item: str, nbytes: float) -> None:
        self.parts[device][item] = self.parts[device].get(item, 0) + int(nbytes)

    def peak(self, device: str) -> int:
        return sum(self.parts.get(device, {}).values())

    @property
    def devices(self) -> list:
        return sorted(self.parts)

    def describe(self) -> str:
        lines = []
        for device in self.devices:
            items = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in sorted(self.parts[device].items(), key=lambda kv: -kv[1]))
            lines.append(f"planned peak on {device}: {self.peak(device) / 2**30:.2f} GiB ({items})")
        return "\n".join(lines)

    def check(self, budget: dict[str, int]) -> None:
        for device, limit in budget.items():
            if self.peak(device) > limit:
                biggest = max(self.parts[device].items(), key=lambda kv: kv[1])
                raise MemoryBudgetError(
                    f"one block needs about {self.peak(device) / 2**30:.2f} GiB on {device} but --max-memory allows "
                    f"{limit / 2**30:.2f} GiB (largest item: {biggest[0]} {biggest[1] / 2**30:.2f} GiB); "
                    "try --offload disk, a smaller --batch-size, fewer calibration tokens or --solve-dtype float32")


def _groups(block) -> list[tuple[int, int]]:
    """(in_features, out_features) per linear. Which linears share an input is known only after a
    forward pass, so every linear counts as its own group: an upper bound (q/k/v share one)."""
    return [(linear.in_features, linear.out_features) for linear in block_linears(block).values()]


def plan(source, method, *, device: str, offload: str, n_samples: int, seqlen: int, batch_size: int,
         solve_dtype: torch.dtype, track_error: bool = True, refine: bool = False,
         compute_dtype: Optional[torch.dtype] = None) -> MemoryPlan:
    """Estimate the peak per device type for running `method` over `source`'s blocks."""
    compute = torch.device(device).type
    hold = {"none": compute, "cpu": "cpu", "disk": None}[offload]
    config = source.model.config
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", 1)
    stored_bytes = torch.finfo(source.activation_dtype()).bits // 8
    act_bytes = torch.finfo(compute_dtype or source.activation_dtype()).bits // 8  # blocks run (and stream) in it
    solve_bytes = torch.finfo(solve_dtype).bits // 8
    tokens = n_samples * seqlen
    batch_tokens = min(batch_size, n_samples) * seqlen
    two_stream = method.two_stream

    plan = MemoryPlan()
    plan.add("cpu", "process", PROCESS_BASELINE)
    block_bytes = max(source.block_bytes(i) for i in range(len(source.blocks)))
    plan.add(compute, "dense + compressed block", 2 * block_bytes * act_bytes // stored_bytes)
    resident = source.resident_bytes()
    if resident:  # an in-memory model, or compressed blocks kept for evaluation
        plan.add("cpu", "resident model", resident)
    if not source.drops_non_block_after_capture:  # a streaming run frees them before block 0
        plan.add(compute, "embeddings, norms, head", source.non_block_bytes())

    groups = max((_groups(b) for b in source.blocks), key=lambda g: sum(n * n for n, _ in g))
    if two_stream:
        count = max(len(method.needs & {"A", "B", "C"}), 2)  # B and C at least
        plan.add(compute, "statistics (fp32)", count * 4 * max(n * n for n, _ in groups))
        if solve_bytes != 4:  # the solver's own copies of A, B, C in its dtype
            plan.add(compute, "statistics (solve dtype)", count * solve_bytes * max(n * n for n, _ in groups))
    elif "A" in method.needs:  # XᵀX, or the outputs' YᵀY where smaller (per linear: a bound on any grouping)
        plan.add(compute, "statistics (fp32)", 4 * sum(m * m if group_path(method, [(m, n)]).statistics == "YtY" else n * n
                                                       for n, m in groups))
    if method.coefficients is not None or method.adaptive_beta:
        def workspace(n, m):
            if group_path(method, [(m, n)]).solve in ("output_side", "output_gram"):  # W·H, W·H·Wᵀ, eigenvectors
                return m * n + 3 * m * m
            return 4 * n * n + 3 * m * n  # metric, eigenvectors, L⁻ᵀ and a product of its size; G and its factors
        plan.add(compute, "solver workspace", solve_bytes * max(workspace(n, m) for n, m in groups))
    else:
        plan.add(compute, "solver workspace", solve_bytes * max(3 * m * n for n, m in groups))
    widest = max(max(n, m) for n, m in groups)
    attention = min(batch_size, n_samples) * heads * seqlen * seqlen * 4
    plan.add(compute, "forward activations (one batch)", batch_tokens * (4 * widest + 8 * hidden) * 4 + 2 * attention)

    if refine:  # an fp32 block, its gradients and AdamW's two moments, and one batch's saved activations
        plan.add(compute, "refinement (fp32 block, grads, AdamW, autograd)",
                 block_bytes * (4 / stored_bytes) * 4 + 2 * (batch_tokens * (4 * widest + 8 * hidden) * 4 + 2 * attention))
    streams = 4 if (two_stream or track_error or refine) else 2  # X, X' and their successors during propagation
    if two_stream and hold is not None:  # the two-stream replay: one replayed child output (attention) per token
        streams += 1
    stream_bytes = streams * tokens * hidden * act_bytes
    # dense inputs wait for their group's X' pass; X' inputs of linears that end a child (o_proj,
    # down_proj) are kept for replay. Groups run in order, so only the current group is in both.
    group_inputs = tokens * (sum(n for n, _ in groups) + max(n for n, _ in groups)) * act_bytes if two_stream else 0
    if hold is None:  # on disk: one batch resident at a time
        plan.add(compute, "activation streams (one batch from disk)", 2 * batch_tokens * max(hidden, widest) * act_bytes)
    else:
        plan.add(hold, "activation streams", stream_bytes)
        if group_inputs:
            plan.add(hold, "dense group inputs", group_inputs)
    return plan
