"""The two-stream replay: re-running a partly compressed block without recomputing what is final.

Groups are solved in execution order, each from inputs X' got by re-running the partly compressed
block. Once every linear that runs before a child returns is installed, the child's output is final.
A child whose output is its last linear's output (LLaMA attention ends in o_proj, the MLP in
down_proj) is then replayed as that linear applied to the input kept from the linear's own
statistics pass: attention and q/k/v run once per batch on X' instead of four times, gate/up once
instead of twice. A final child's output is stored the first time it is computed and copied to the
later passes. Blocks whose linears do not run once each, in group order, get no replay.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn

from lowrank_engine.probe import BlockStructure, map_tensors, swapped_forward


class TwoStreamReplay:
    def __init__(self, block: nn.Module, structure: BlockStructure, device, holding_device):
        self.block, self.device, self.holding = block, device, holding_device
        in_order = structure.calls == [n for g in structure.groups for n in g]
        # a child is final once this many linears (in call order) are installed
        self.needed = {c: e[0] for c, e in structure.child_ends.items() if in_order and len(e) == 1}
        self.tails = {c: structure.tails[c][0] for c in self.needed if c in structure.tails}
        self.extras = {c: structure.tails[c][1] for c in self.tails}
        self.installed = 0
        self.outputs: dict[str, dict[int, object]] = defaultdict(dict)
        self.tail_inputs: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)  # linear → batch → input

    def installed_group(self, group: list[str]) -> None:
        self.installed += len(group)

    def keep_group_input(self, group: list[str], batch: int, x: torch.Tensor) -> None:
        """Keep a group's X' input when a child ends in one of its linears."""
        kept = [linear for linear in group if linear in self.tails.values()]
        if kept:
            x = x.detach()
            x = (x.clone() if x._base is not None else x).to(self.holding)  # not a view pinning a larger base
            for linear in kept:
                self.tail_inputs[linear][batch] = x

    def _store(self, name: str, batch: int, out) -> None:
        self.outputs[name][batch] = map_tensors(out, lambda t: t.detach().to(self.holding, copy=True))
        self.tail_inputs.get(self.tails.get(name), {}).pop(batch, None)  # the output supersedes it

    def _stored_forward(self, out):
        # a copy: code after the child may update its output in place
        return lambda *args, **kwargs: map_tensors(out, lambda t: t.to(self.device, copy=True))

    def _tail_forward(self, name: str, x: torch.Tensor):
        linear, extras = self.block.get_submodule(self.tails[name]), self.extras[name]

        def forward(*args, **kwargs):
            out = linear(x.to(self.device))
            return out if extras is None else extras[0]((out,) + (None,) * extras[1])
        return forward

    @contextlib.contextmanager
    def replay(self, batch: int, record: bool = True):
        """Within this context, final children are replayed for `batch` (from their last linear's kept
        input, or from their stored output); with `record`, the others store their output."""
        swapped, forwards, handles = [], [], []
        for name, needed in self.needed.items():
            if needed > self.installed:
                continue
            child = self.block.get_submodule(name)
            if batch in self.outputs[name]:
                swapped.append(child)
                forwards.append(self._stored_forward(self.outputs[name][batch]))
                continue
            tail_input = self.tail_inputs.get(self.tails.get(name), {}).get(batch)
            if tail_input is not None:  # the last linear is installed (needed ≤ installed)
                swapped.append(child)
                forwards.append(self._tail_forward(name, tail_input))
            if record:  # later passes copy the output instead of running even the last linear again
                handles.append(child.register_forward_hook(
                    lambda mod, args, out, name=name: self._store(name, batch, out)))
        try:
            with swapped_forward(swapped, forwards):
                yield
        finally:
            for h in handles:
                h.remove()
