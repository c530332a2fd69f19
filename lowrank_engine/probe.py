"""What the model does with its blocks, found by running it: the arguments each block receives, and
inside a block, which linears share an input (groups), in what order they run, and which child
module ends in which linear (for the two-stream replay). No per-model code: everything is recorded
from the model's own forward.
"""
from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from lowrank_engine.models import UnsupportedArchitecture, block_linears

PROBE_TOKENS = 8  # a block's structure does not depend on the sequence length
_NOT_REPLAYED = ("past_key_value", "past_key_values", "cache", "use_cache")  # no KV cache in a block-by-block run


class StopForward(Exception):
    """Raised by a hook once it has what it came for, to end the forward there (the rest is not needed)."""


def call_until_stopped(fn: Callable[[], object]) -> None:
    """Run `fn`; a hook ending it early with StopForward is the expected way out."""
    try:
        fn()
    except StopForward:
        pass


@contextlib.contextmanager
def swapped_forward(modules: list[nn.Module], forwards: list[Callable]):
    """Give each module another forward for the duration; a forward already set on the instance (an
    accelerate hook of a device_map model) is put back afterwards, not deleted."""
    own = [m.__dict__.get("forward") for m in modules]
    for module, forward in zip(modules, forwards):
        module.forward = forward
    try:
        yield
    finally:
        for module, previous in zip(modules, own):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    return first_output(block(hidden.to(device), **kwargs))


def slice_kwargs(kwargs: dict, batch: int, windows: slice = slice(None), tokens: Optional[int] = None) -> dict:
    """A block's keyword arguments for some of a batch's windows, optionally cut to their first `tokens`
    tokens. Per-window tensors (leading dim = batch) are cut, broadcast ones (leading dim 1) are shared;
    the token cut applies to what is indexed by position (rotary tables, masks, position ids)."""
    def cut(key, v):
        if isinstance(v, (tuple, list)):
            return type(v)(cut(key, x) for x in v)
        if not isinstance(v, torch.Tensor):
            return v
        if key == "cache_position":
            return v if tokens is None else v[..., :tokens]
        if v.dim() >= 2 and v.shape[0] == batch and batch > 1:
            v = v[windows]
        if tokens is None:
            return v
        if key == "position_embeddings":
            return v[:, :tokens]
        if key == "attention_mask":
            return v[..., :tokens, :tokens] if v.dim() == 4 else v[:, :tokens]
        if key == "position_ids":
            return v[..., :tokens]
        return v
    return {k: cut(k, v) for k, v in kwargs.items()}


def _to_shared(obj, device, memo: dict):
    """`obj` with its tensors on `device`; a tensor met before (by identity, within one forward) maps to
    the same moved tensor, so arguments the model shares between blocks stay shared."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the original is kept alive: its id stays unique
        return memo[id(obj)][1]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_shared(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_shared(v, device, memo) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int,
                         device, hidden) -> list[list[dict]]:
    """Fill `hidden` (a stream or a list) with the states entering block 0; returns the keyword arguments
    the model passes to each block, `[block][batch]`.

    Models may give every block its own arguments (sliding/global attention masks, a rotary table per
    layer type), so they are recorded from the model's own forward at every block. Each block's compute
    is skipped (it returns its input), so no block weight is read: lazily loaded blocks stay on `meta`.
    The forward ends at the last block. A tensor the model hands to several blocks is stored once."""
    per_block: list[list[dict]] = [[] for _ in blocks]
    memo: dict = {}

    def skip(index, *args, **kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        if index == 0:
            hidden.append(h)
        per_block[index].append(_to_shared({k: v for k, v in kwargs.items() if k not in _NOT_REPLAYED}, device, memo))
        if index == len(blocks) - 1:
            raise StopForward
        return h

    try:
        with swapped_forward(list(blocks), [functools.partial(skip, i) for i in range(len(blocks))]):
            for batch, start in enumerate(range(0, input_ids.shape[0], batch_size)):
                memo.clear()
                call_until_stopped(lambda: model(input_ids=input_ids[start:start + batch_size].to(device),
                                                 use_cache=False))
                calls = [len(kw) - batch for kw in per_block]
                if any(c != 1 for c in calls):
                    raise UnsupportedArchitecture(
                        f"{type(model).__name__} does not call each decoder block once per forward (calls per "
                        f"block: {calls}); the engine streams blocks in order and cannot compress it")
    finally:
        memo.clear()
    return per_block


@torch.no_grad()
def group_inputs(block: nn.Module, first_linear: str, hidden: torch.Tensor, kwargs: dict, device,
                 replay: Optional[contextlib.AbstractContextManager] = None) -> torch.Tensor:
    """The input of `first_linear` for one batch; the block's forward ends there (`replay`: a
    TwoStreamReplay.replay context for this batch)."""
    captured = []

    def hook(mod, args):
        captured.append(args[0])
        raise StopForward

    handle = block.get_submodule(first_linear).register_forward_pre_hook(hook)
    try:
        with replay or contextlib.nullcontext():
            call_until_stopped(lambda: run_block(block, hidden, kwargs, device))
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{first_linear} was never called by its block")
    return captured[0]


@dataclass
class BlockStructure:
    """One short forward of a block, recorded.

    groups: linears grouped by the input tensor they read, in execution order (qkv, o, gate/up, down).
    calls: the linears in the order they ran. child_ends: for each top-level child holding linears,
    how many linear calls had run each time it returned. tails: a child whose output is its last
    linear's output, untouched → (that linear, how to rebuild the child's return: (tuple type,
    trailing Nones) or None for a bare tensor)."""
    groups: list[list[str]]
    calls: list[str]
    child_ends: dict[str, list[int]] = field(default_factory=dict)
    tails: dict[str, tuple] = field(default_factory=dict)


@torch.no_grad()
def probe_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> BlockStructure:
    """Run `block` once on the first window's first PROBE_TOKENS tokens, recording its structure."""
    linears = block_linears(block)
    children = [name for name, child in block.named_children() if block_linears(child)]
    seen: dict[int, list[str]] = {}
    order: list[int] = []
    alive = []  # inputs stay referenced, so that no id() is reused during the probe
    calls: list[str] = []
    starts: dict[str, int] = {}
    ends: dict[str, list[int]] = defaultdict(list)
    returned: dict[str, tuple] = {}  # linear → (its output, a copy of its value then)
    tails: dict[str, tuple] = {}

    def before_linear(name, args):
        calls.append(name)
        key = id(args[0])
        alive.append(args[0])
        if key not in seen:
            seen[key] = []
            order.append(key)
        if name not in seen[key]:
            seen[key].append(name)

    def child_end(c, out):
        ends[c].append(len(calls))
        last = calls[-1] if len(calls) > starts[c] else None
        first, rest = (out[0], out[1:]) if isinstance(out, (tuple, list)) and out else (out, ())
        if last is not None and first is returned[last][0] and all(r is None for r in rest) \
                and torch.equal(first, returned[last][1]):  # not updated in place after the linear
            tails[c] = (last, (type(out), len(rest)) if isinstance(out, (tuple, list)) else None)

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: before_linear(n, args)) for n, m in linears.items()]
    handles += [m.register_forward_hook(lambda mod, args, out, n=n: returned.__setitem__(n, (out, out.detach().clone())))
                for n, m in linears.items()]
    handles += [block.get_submodule(c).register_forward_pre_hook(lambda mod, args, c=c: starts.__setitem__(c, len(calls)))
                for c in children]
    handles += [block.get_submodule(c).register_forward_hook(lambda mod, args, out, c=c: child_end(c, out))
                for c in children]
    tokens = min(hidden.shape[1], PROBE_TOKENS)
    try:
        run_block(block, hidden[:1, :tokens], slice_kwargs(kwargs, hidden.shape[0], slice(0, 1), tokens), device)
    finally:
        for h in handles:
            h.remove()
    return BlockStructure(groups=[seen[k] for k in order], calls=calls, child_ends=dict(ends), tails=tails)


def discover_groups(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> list[list[str]]:
    """Linears grouped by the input tensor they read, in execution order (e.g. qkv, o, gate/up, down)."""
    return probe_block(block, hidden, kwargs, device).groups
