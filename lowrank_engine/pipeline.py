"""The streaming pipeline: one decoder block at a time, two activation streams.

    load block ℓ → X (dense) and X' (compressed) streams → statistics per input group
    → whitening → solve → factors → write block → propagate X, X' → free

X is the input the block sees in the original model, X' the input it sees in the model
compressed so far. A method only decides which statistics (A = XᵀX, B = X'ᵀX', C = XᵀX')
are accumulated and how the one solver combines them.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import resource
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_engine import checkpoint, distributed, memory, ops, refine, solvers, streams, workdir
from lowrank_engine.config import CompressionConfig
from lowrank_engine.models import (UnsupportedArchitecture, block_linears, checkpoint_names, find_decoder_blocks,
                                   set_submodule, warn_if_untested)
from lowrank_engine.modules import LowRankLinear

logger = logging.getLogger("lowrank_engine")


class ActivationError(ValueError):
    """NaN or Inf reached a layer's input."""


@dataclass
class BlockReport:
    index: int
    seconds: dict = field(default_factory=dict)
    output_rel_mse: float = float("nan")
    output_cosine_distance: float = float("nan")
    modules: dict = field(default_factory=dict)  # name → {rank, truncation_loss, retained_energy, beta}
    refine: dict = field(default_factory=dict)  # first/last pass loss and steps, when refined


@dataclass
class CompressionResult:
    ranks: dict
    blocks: list
    seconds: float
    peak_rss_mb: float
    peak_gpu_mb: float
    stage_seconds: dict


class _StopForward(Exception):
    pass


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) so a stage's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_glibc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc
        return None


_GLIBC = _load_glibc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
HEAP_REUSE_LIMIT = 32 * 1024 * 1024  # glibc's ceiling for the mmap threshold


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS. Without it glibc keeps each block's freed
    buffers around, fragmented, and the resident size creeps up with depth."""
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


@contextlib.contextmanager
def reuse_freed_heap():
    """Within a block, keep freed activations (up to 32 MiB each) in the heap for the next batch.

    Every batch allocates the same tensors. By default glibc returns large freed buffers to the
    kernel, and the next batch page-faults them back in, zeroed: about a million minor faults on
    4 SmolLM2 blocks (64×512 tokens), half of them avoidable, and a tenth of the CPU time. The
    blocks still release their memory at each block boundary (return_freed_memory)."""
    if _GLIBC is None:
        yield
        return
    _GLIBC.mallopt(_M_MMAP_THRESHOLD, HEAP_REUSE_LIMIT)
    _GLIBC.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        _GLIBC.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        _GLIBC.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        return_freed_memory()


def move_non_block_tensors(model: nn.Module, blocks_name: str, device) -> None:
    """Put embeddings, final norm and head on `device`; blocks stay where they are (tied weights stay tied)."""
    moved: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules():
        if name == blocks_name or name.startswith(blocks_name + "."):
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.device != torch.device(device):
                if id(param) not in moved:
                    moved[id(param)] = nn.Parameter(param.data.to(device), requires_grad=param.requires_grad)
                module._parameters[pname] = moved[id(param)]
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf is not None:
                module._buffers[bname] = buf.to(device)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------
# block inputs and groups
# --------------------------------------------------------------------------------------
_NOT_REPLAYED = ("past_key_value", "past_key_values", "cache", "use_cache")  # no KV cache in a block-by-block run


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
    A tensor the model hands to several blocks is stored once."""
    per_block: list[list[dict]] = [[] for _ in blocks]
    memo: dict = {}

    def skip(index, *args, **kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        if index == 0:
            hidden.append(h)
        kw = {k: v for k, v in kwargs.items() if k not in _NOT_REPLAYED}
        per_block[index].append(_to_shared(kw, device, memo))
        if index == len(blocks) - 1:
            raise _StopForward
        return h

    # a forward set on the instance (an accelerate hook of a device_map model) is put back afterwards
    own_forwards = [block.__dict__.get("forward") for block in blocks]
    for index, block in enumerate(blocks):
        block.forward = functools.partial(skip, index)
    try:
        for batch, start in enumerate(range(0, input_ids.shape[0], batch_size)):
            memo.clear()
            try:
                model(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            calls = [len(kw) - batch for kw in per_block]
            if any(c != 1 for c in calls):
                raise UnsupportedArchitecture(
                    f"{type(model).__name__} does not call each decoder block once per forward (calls per "
                    f"block: {calls}); the engine streams blocks in order and cannot compress it")
    finally:
        for block, own in zip(blocks, own_forwards):
            if own is None:
                del block.forward
            else:
                block.forward = own
        memo.clear()
    return per_block


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    return _first(block(hidden.to(device), **kwargs))


@torch.no_grad()
def discover_groups(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> list[list[str]]:
    """Linears grouped by the input tensor they read, in execution order (e.g. qkv, o, gate/up, down)."""
    seen: dict[int, list[str]] = {}
    order: list[int] = []
    alive = []  # keep inputs referenced so that no id() is reused during the probe
    handles = []
    for name, module in block_linears(block).items():
        def hook(mod, args, name=name):
            key = id(args[0])
            alive.append(args[0])
            if key not in seen:
                seen[key] = []
                order.append(key)
            if name not in seen[key]:
                seen[key].append(name)
        handles.append(module.register_forward_pre_hook(hook))
    try:
        run_block(block, hidden[:1, : min(hidden.shape[1], 8)], _slice_kwargs(kwargs, min(hidden.shape[1], 8)), device)
    finally:
        for h in handles:
            h.remove()
    return [seen[k] for k in order]


def _slice_kwargs(kwargs: dict, length: int) -> dict:
    """Keyword arguments for a 1-sample, `length`-token probe (masks and rotary tables trimmed)."""
    out = {}
    for key, value in kwargs.items():
        if key == "position_embeddings" and isinstance(value, (tuple, list)):
            out[key] = type(value)(v[:1, :length] for v in value)
        elif key == "attention_mask" and isinstance(value, torch.Tensor):
            out[key] = value[:1, ..., :length, :length] if value.dim() == 4 else value[:1, :length]
        elif key in ("position_ids", "cache_position") and isinstance(value, torch.Tensor):
            out[key] = value[..., :length][:1] if value.dim() > 1 else value[:length]
        else:
            out[key] = value
    return out


@torch.no_grad()
def group_inputs(block: nn.Module, first_linear: str, hidden: torch.Tensor, kwargs: dict, device,
                 settled: Optional[contextlib.AbstractContextManager] = None) -> torch.Tensor:
    """The input of `first_linear` for one batch, stopping the forward there (`settled`: a
    SettledOutputs.replay context for this batch)."""
    captured = []

    def hook(mod, args):
        captured.append(args[0])
        raise _StopForward

    handle = block.get_submodule(first_linear).register_forward_pre_hook(hook)
    try:
        with settled or contextlib.nullcontext():
            run_block(block, hidden, kwargs, device)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{first_linear} was never called by its block")
    return captured[0]


class SettledOutputs:
    """Replays the per-batch outputs of a block's top-level children that can no longer change.

    Groups are solved in execution order, each from inputs X' got by re-running the partly
    compressed block. Once every linear that runs before a child returns is installed, the child's
    output is final. A child whose output is its last linear's output (LLaMA attention ends in
    o_proj, the MLP in down_proj) is then replayed as that linear applied to the input kept from
    the linear's own statistics pass: attention and q/k/v run once per batch on X' instead of four
    times, gate/up once instead of twice. A final child's output is stored the first time it is
    computed and copied to the later passes. Blocks whose linears do not run once each, in group
    order, get no replay."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict, device, groups: list[list[str]],
                 holding_device):
        self.block, self.device, self.holding = block, device, holding_device
        calls: list[str] = []
        ends: dict[str, list[int]] = defaultdict(list)
        starts: dict[str, int] = {}
        returned: dict[str, tuple] = {}  # linear → (its output, a copy of its value then)
        tails: dict[str, tuple] = {}  # child → (the linear whose output it returns untouched, output shape)
        children = {name: child for name, child in block.named_children() if block_linears(child)}

        def child_end(c, out):
            ends[c].append(len(calls))
            last = calls[-1] if len(calls) > starts[c] else None
            first, rest = (out[0], out[1:]) if isinstance(out, (tuple, list)) and out else (out, ())
            if last is not None and first is returned[last][0] and all(r is None for r in rest) \
                    and torch.equal(first, returned[last][1]):  # not updated in place after the linear
                # a tuple's type and its trailing Nones, or None for a bare tensor
                tails[c] = (last, (type(out), len(rest)) if isinstance(out, (tuple, list)) else None)

        handles = [block.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: calls.append(n))
                   for n in block_linears(block)]
        handles += [block.get_submodule(n).register_forward_hook(
            lambda mod, args, out, n=n: returned.__setitem__(n, (out, out.detach().clone())))
            for n in block_linears(block)]
        handles += [child.register_forward_pre_hook(lambda mod, args, c=c: starts.__setitem__(c, len(calls)))
                    for c, child in children.items()]
        handles += [child.register_forward_hook(lambda mod, args, out, c=c: child_end(c, out))
                    for c, child in children.items()]
        try:
            with torch.no_grad():
                run_block(block, hidden[:1, : min(hidden.shape[1], 8)],
                          _slice_kwargs(kwargs, min(hidden.shape[1], 8)), device)
        finally:
            for h in handles:
                h.remove()
        in_order = calls == [n for g in groups for n in g]
        # a child is final once this many linears (in call order) are installed
        self.needed = {c: e[0] for c, e in ends.items() if in_order and len(e) == 1}
        self.tails = {c: tails[c][0] for c in self.needed if c in tails}
        self.extras = {c: tails[c][1] for c in self.tails}
        self.children = children
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
        self.outputs[name][batch] = _map_tensors(out, lambda t: t.detach().to(self.holding, copy=True))
        self.tail_inputs.get(self.tails.get(name), {}).pop(batch, None)  # the output supersedes it

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
        patched, handles = [], []
        for name, needed in self.needed.items():
            if needed > self.installed:
                continue
            child, stored = self.children[name], self.outputs[name]
            if batch in stored:  # a copy: code after the child may update its output in place
                out = stored[batch]
                child.forward = lambda *a, out=out, **k: _map_tensors(out, lambda t: t.to(self.device, copy=True))
                patched.append(child)
                continue
            tail_input = self.tail_inputs.get(self.tails.get(name), {}).get(batch)
            if tail_input is not None:  # the last linear is installed (needed ≤ installed)
                child.forward = self._tail_forward(name, tail_input)
                patched.append(child)
            if record:  # later passes copy the output instead of running even the last linear again
                handles.append(child.register_forward_hook(
                    lambda mod, args, out, name=name: self._store(name, batch, out)))
        try:
            yield
        finally:
            for child in patched:
                del child.forward
            for h in handles:
                h.remove()


def _check_finite(x: torch.Tensor, where: str) -> None:
    # one fp32 reduction (a NaN or Inf anywhere makes the sum non-finite) instead of an elementwise
    # mask: isfinite(x).all() cost ~7% of a two-stream run on CPU
    if not bool(torch.isfinite(x.sum(dtype=torch.float32))):
        raise ActivationError(f"NaN or Inf in the activations entering {where}")


def _check_statistics(stats: solvers.GroupStatistics, where: str) -> None:
    """A NaN or Inf in any folded input reaches the diagonal of XᵀX (or YᵀY, or the |x| sums): one
    check per block instead of a pass over every batch's activations."""
    for t in stats.accumulators():
        if not bool(torch.isfinite(t.diagonal() if t.dim() == 2 else t).all()):
            raise ActivationError(f"NaN or Inf in the activations entering {where} (or their squares overflow "
                                  "float32)")


# --------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------
def module_rank(name: str, module: nn.Linear, cfg: CompressionConfig) -> Optional[int]:
    """The module's rank; None keeps it dense (a rank map entry of null)."""
    m, n = module.out_features, module.in_features
    if cfg.rank_map and name in cfg.rank_map:
        if cfg.rank_map[name] is None:
            return None
        k = int(cfg.rank_map[name])
    elif cfg.ratio is not None:
        k = solvers.rank_for_ratio(m, n, cfg.ratio)
    else:
        raise ValueError(f"no rank for {name}: give a ratio or a rank map entry")
    solvers.check_rank(name, m, n, k)
    return k


def validate_rank_map(rank_map: dict, model_linears: dict) -> None:
    unknown = sorted(set(rank_map) - set(model_linears))
    if unknown:
        raise ValueError(f"rank map names modules that are not compressible linears: {unknown[:5]}")
    for name, k in rank_map.items():
        if k is not None:  # null keeps the module dense
            mod = model_linears[name]
            solvers.check_rank(name, mod.out_features, mod.in_features, int(k))


# --------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------
class BlockSource:
    """In-memory blocks (the default); lazy sources override materialize/release."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks_name, self.blocks = find_decoder_blocks(model)
        warn_if_untested(model)

    def materialize(self, index: int, device, dtype: Optional[torch.dtype] = None) -> nn.Module:
        return cast_parameters(self.blocks[index].to(device), dtype)

    # sizes for the memory plan, from shapes only
    def block_bytes(self, index: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.blocks[index].state_dict().values())

    def non_block_bytes(self) -> int:
        seen, total = set(), 0
        for name, p in self.model.named_parameters():
            if not name.startswith(self.blocks_name + ".") and id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total

    def activation_dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def drops_non_block_after_capture(self) -> bool:
        return False

    def identity(self) -> str:
        """The weights' identity, for the resume fingerprint."""
        return workdir.tensors_identity(self.model.state_dict().items())

    def resident_bytes(self) -> int:
        """Bytes held for the whole run besides the current block: here, the in-memory model."""
        return sum(self.block_bytes(i) for i in range(len(self.blocks))) + self.non_block_bytes()

    def after_capture(self) -> None:
        """Called once block 0's inputs exist; in-memory models keep everything."""

    def release(self, index: int, compressed: nn.Module) -> None:
        self.blocks[index] = cast_parameters(compressed.to("cpu"), self.activation_dtype())


class LazyBlockSource(BlockSource):
    """Streams a safetensors checkpoint: the skeleton lives on `meta`, each block is read when needed.

    Memory is set by one block plus the non-block tensors (embeddings, norms, head), whatever
    the depth. A released block goes back to `meta` when its factors are on disk (`keep=False`).
    """

    def __init__(self, directory: str, trust_remote_code: bool = False, keep_compressed: bool = False):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        model = checkpoint.empty_model_from_config(config, trust_remote_code)
        super().__init__(model)
        self.directory, self.keep_compressed = directory, keep_compressed
        self.files = checkpoint.tensor_files(directory)
        self.stored, converted = checkpoint_names(model, self.files)  # model name → name in the files
        if converted:
            keys = [k for names in converted.values() for k in names]
            raise checkpoint.CheckpointError(
                f"{directory}: transformers fuses or splits {len(keys)} of its tensors when it loads them "
                f"({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''}; patterns {sorted(converted)[:3]}), "
                "which a block-by-block reader cannot do; this checkpoint layout is not supported")
        prefix = self.blocks_name + "."
        expected = set(model.state_dict())
        absent = sorted(expected - set(self.stored) - checkpoint.tied_output_names(model))
        if absent:  # found now, not when the block that needs them is reached
            raise checkpoint.CheckpointError(f"{directory} lacks {len(absent)} tensors the model needs: {absent[:5]}")
        rest = [n for n in expected if not n.startswith(prefix) and n in self.stored]
        model.load_state_dict(self._read(rest), strict=False, assign=True)
        checkpoint.tie_output_embeddings(model)
        missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
        if missing:
            raise checkpoint.CheckpointError(f"{directory} lacks tensors: {missing[:5]}")
        model.eval()

    def _read(self, names, device="cpu", dtype: Optional[torch.dtype] = None) -> dict:
        """The named tensors (model names), read under their stored names."""
        stored = {n: self.stored[n] for n in names}
        tensors = checkpoint.read_tensors(self.files, stored.values(), device=device, dtype=dtype)
        return {n: tensors[s] for n, s in stored.items()}

    def non_block_state(self) -> dict:
        prefix = self.blocks_name + "."
        state = {n: t for n, t in checkpoint.state_dict_for_saving(self.model).items() if not n.startswith(prefix)}
        dropped = [n for n, t in state.items() if t.is_meta]  # freed after capture: read them again
        for n in dropped:
            del state[n]
        state.update(self._read([n for n in dropped if n in self.stored]))
        return state

    @property
    def drops_non_block_after_capture(self) -> bool:
        return not self.keep_compressed

    def identity(self) -> str:
        config = os.path.join(self.directory, "config.json")
        return workdir.files_identity(self.files.values(), config if os.path.exists(config) else None)

    def resident_bytes(self) -> int:
        """Compressed blocks kept in memory (for evaluation) accumulate; streamed ones go to disk."""
        return sum(self.block_bytes(i) for i in range(len(self.blocks))) if self.keep_compressed else 0

    def after_capture(self) -> None:
        """A streaming run needs embeddings, final norm and head only to make block 0's input: free them
        (for a 70B model that is 4 GiB of embedding and head)."""
        if not self.drops_non_block_after_capture:
            return
        prefix = self.blocks_name + "."
        dropped: dict[int, nn.Parameter] = {}
        for name, module in self.model.named_modules():
            if name == self.blocks_name or name.startswith(prefix):
                continue
            for pname, param in list(module.named_parameters(recurse=False)):
                if id(param) not in dropped:  # tied weights stay tied
                    dropped[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
                module._parameters[pname] = dropped[id(param)]

    def block_bytes(self, index: int) -> int:
        prefix = f"{self.blocks_name}.{index}."
        return checkpoint.tensor_nbytes(self.files, [self.stored[prefix + n] for n in self.blocks[index].state_dict()])

    def materialize(self, index: int, device, dtype: Optional[torch.dtype] = None) -> nn.Module:
        prefix = f"{self.blocks_name}.{index}."
        block = self.blocks[index]
        state = self._read([prefix + n for n in block.state_dict()], device=device, dtype=dtype)
        block.load_state_dict({n[len(prefix):]: t for n, t in state.items()}, assign=True)
        return block

    def release(self, index: int, compressed: nn.Module) -> None:
        if self.keep_compressed:
            self.blocks[index] = cast_parameters(compressed.to("cpu"), self.activation_dtype())
        else:
            self.blocks[index] = compressed.to("meta")


def cast_parameters(module: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """Cast floating parameters only: buffers such as rotary frequencies keep their precision."""
    if dtype is not None:
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return module


def compute_dtype(cfg: CompressionConfig, storage: torch.dtype) -> torch.dtype:
    """The dtype blocks run in. CPU GEMMs in bf16/fp16 are two orders of magnitude slower than
    fp32 (0.8 vs 83 GFLOP/s measured on 2 cores), so half-precision checkpoints run in fp32 there;
    factors are rounded to the checkpoint's dtype as they are installed, and written in it."""
    if cfg.compute_dtype:
        return getattr(torch, cfg.compute_dtype)
    if torch.device(cfg.device).type == "cpu" and storage in (torch.bfloat16, torch.float16):
        return torch.float32
    return storage


def _solve_dtype(cfg: CompressionConfig) -> torch.dtype:
    if cfg.solve_dtype:
        return getattr(torch, cfg.solve_dtype)
    return torch.float64 if torch.device(cfg.device).type == "cpu" else torch.float32


class Compressor:
    """Runs the pipeline over a model. `work_dir` (optional) receives one file per finished block."""

    def __init__(self, source: BlockSource, cfg: CompressionConfig, work_dir: Optional[str] = None,
                 progress: bool = True):
        self.source, self.cfg, self.work_dir, self.progress = source, cfg, work_dir, progress
        cfg.validate()
        self.method = solvers.get_method(cfg.method)
        if cfg.rank_map:  # before any output exists
            validate_rank_map(cfg.rank_map, {f"{source.blocks_name}.{i}.{n}": m for i in range(len(source.blocks))
                                             for n, m in block_linears(source.blocks[i]).items()})
        self.device = torch.device(cfg.device)
        self.offload = streams.normalize_offload(cfg.offload)
        self.store: Optional[streams.StreamStore] = None
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.dtype = _solve_dtype(cfg)
        self.storage_dtype = source.activation_dtype()
        self.compute_dtype = compute_dtype(cfg, self.storage_dtype)
        self.stage_seconds: dict = defaultdict(float)
        self.ranks: dict = {}
        self.reports: list[BlockReport] = []
        self.spectra: Optional[dict] = None  # set to {} to keep every linear's σ(G) (rank allocation)
        self.fisher: Optional[dict] = None  # fwsvd: full module name → column Fisher (fisher.column_fisher)
        self._block_seconds: dict = {}
        self._bar = None

    # -- helpers -------------------------------------------------------------------------
    def _timed(self, stage: str):
        compressor = self

        class _Timer:
            def __enter__(self):
                self.t = time.perf_counter()
                if compressor._bar is not None:
                    compressor._bar.set_postfix_str(stage)

            def __exit__(self, *exc):
                compressor.stage_seconds[stage] += time.perf_counter() - self.t
                compressor._block_seconds[stage] = compressor._block_seconds.get(stage, 0.0) + time.perf_counter() - self.t

        return _Timer()

    def _full(self, index: int, name: str) -> str:
        return f"{self.source.blocks_name}.{index}.{name}"

    def _block_file(self, index: int) -> str:
        return os.path.join(self.work_dir, "blocks", f"block-{index:05d}.safetensors")

    # -- statistics ----------------------------------------------------------------------
    def _accumulate(self, group: list[str], dense_inputs: list, comp: nn.Module, xp_stream: list, kwargs: list,
                    index: int, needs: frozenset, settled: Optional[SettledOutputs],
                    dense_outputs: Optional[dict] = None) -> solvers.GroupStatistics:
        """The group's two-stream statistics: A, B, C from X and X', or B and the anchors W·C = YᵀX'
        from X' and the kept dense outputs Y (`dense_outputs`: linear → stream)."""
        n = comp.get_submodule(group[0]).in_features
        zeros = lambda m=n: torch.zeros(m, n, dtype=torch.float32, device=self.device)  # noqa: E731
        if dense_outputs is not None:
            stats = solvers.GroupStatistics(B=zeros(), anchors={name: zeros(comp.get_submodule(name).out_features)
                                                                for name in dense_outputs})
        else:
            stats = solvers.GroupStatistics(A=zeros() if "A" in needs else None,
                                            B=zeros() if needs & {"B", "C"} else None,
                                            C=zeros() if "C" in needs else None)
        where = f"block {index} {', '.join(group)}"
        for b, kw in enumerate(kwargs):
            x = dense_inputs[b].to(self.device) if dense_inputs is not None else None
            xp = group_inputs(comp, group[0], xp_stream[b], kw, self.device,
                              settled.replay(b) if settled else None) if stats.B is not None else None
            if settled and xp is not None:
                settled.keep_group_input(group, b, xp)
            for t in (x, xp):
                if t is not None:
                    _check_finite(t, where)
            if stats.B is not None and stats.C is not None:
                ops.covariance_accumulate(stats.A, x, stats.B, stats.C, xp)
            elif stats.B is not None:
                ops.covariance_accumulate(stats.B, xp)
            if stats.A is not None and stats.C is None:
                ops.covariance_accumulate(stats.A, x)
            for name, anchor in (stats.anchors or {}).items():
                ops.cross_covariance_accumulate(anchor, dense_outputs[name][b].to(self.device), xp)
        distributed.all_reduce_sum_(stats.A, stats.B, stats.C, *(stats.anchors or {}).values())
        return stats

    # -- one block -----------------------------------------------------------------------
    @torch.no_grad()
    def compress_block(self, index: int, dense: nn.Module, x_stream: list, xp_stream: list, kwargs: list):
        """Factorize one block; returns (compressed block, X_next, X'_next)."""
        cfg, method = self.cfg, self.method
        comp = copy.deepcopy(dense)
        groups = discover_groups(dense, x_stream[0].to(self.device), kwargs[0], self.device)
        needs = method.needs
        two_stream = bool(needs & {"B", "C"})
        report = BlockReport(index)

        linears = block_linears(dense)
        ranks = {name: module_rank(self._full(index, name), linears[name], cfg) for name in linears}
        # dense pass: X_next, plus the dense inputs each group needs. Single-stream methods fold X
        # into A on the fly (or each linear's output Y into YᵀY, where that is smaller); two-stream
        # methods keep X to pair it with X' (C = XᵀX').
        with self._timed("statistics"):
            fold = not two_stream and bool(needs & {"A", "D"})  # single-stream: reduce X as it passes
            compressed = {g[0]: [n for n in g if ranks[n] is not None] for g in groups}
            # two-stream groups whose linears are narrower than their input keep the dense outputs Y
            # (for W·C = YᵀX'), the others their dense input X (for A and C)
            anchored = {first: names for first, names in compressed.items() if two_stream and
                        solvers.anchored_statistics(method, [tuple(linears[n].weight.shape) for n in names])}
            dense_outputs = {first: {n: self.store.stream("out") for n in names} for first, names in anchored.items()}
            dense_inputs = {g[0]: self.store.stream("in") for g in groups if g[0] not in anchored} \
                if two_stream and needs & {"A", "C"} else {}
            single_stats = {g[0]: self._empty_single_stats(linears, [n for n in g if ranks[n] is not None])
                            for g in groups} if fold else {}

            def keep_input(mod, args, first):
                if fold and single_stats[first].accumulators():  # checked once, on the sums (below)
                    self._fold(single_stats[first], args[0])
                    return
                _check_finite(args[0], f"block {index} {first}")
                if first in dense_inputs:
                    dense_inputs[first].append(args[0])

            def without_bias(mod, out):
                return out if mod.bias is None else out - mod.bias

            handles = [dense.get_submodule(g[0]).register_forward_pre_hook(
                lambda mod, args, first=g[0]: keep_input(mod, args, first))
                for g in groups if fold or g[0] in dense_inputs or g[0] in dense_outputs]
            handles += [dense.get_submodule(name).register_forward_hook(
                lambda mod, args, out, stat=stat: ops.covariance_accumulate(stat, without_bias(mod, out)))
                for st in single_stats.values() for name, stat in (st.outputs or {}).items()]
            handles += [dense.get_submodule(name).register_forward_hook(
                lambda mod, args, out, kept=kept: kept.append(without_bias(mod, out)))
                for outputs in dense_outputs.values() for name, kept in outputs.items()]
            try:
                x_next = self._propagate(dense, x_stream, kwargs)
            finally:
                for h in handles:
                    h.remove()
            for first, st in single_stats.items():
                _check_statistics(st, f"block {index} {first}")
                distributed.all_reduce_sum_(st.A, *(st.outputs or {}).values())
                if st.D is not None:
                    st.tokens = int(distributed.all_reduce_sum_tensor(torch.tensor([st.tokens])))
                    if method.diagonal == "absmax":
                        distributed.all_reduce_max_(st.D)
                    else:
                        distributed.all_reduce_sum_(st.D)

        def solve(group, stats, whitening=None):
            weights = {name: linears[name].weight for name in group if ranks[name] is not None}
            if not weights:  # every linear of the group stays dense
                return {}
            if method.diagonal == "fisher":  # a metric per linear, not per group
                with self._timed("solve"):
                    return {name: solvers.solve_group(method, {name: W}, {name: ranks[name]}, solvers.GroupStatistics(
                        D=self.fisher[self._full(index, name)].to(self.device)), eps_rel=cfg.eps_rel,
                        dtype=self.dtype)[name] for name, W in weights.items()}
            with self._timed("solve"):
                return solvers.solve_group(method, weights, {n: ranks[n] for n in weights}, stats,
                                           eps_rel=cfg.eps_rel, beta_search=cfg.beta_search,
                                           beta_max=cfg.beta_max, dtype=self.dtype, whitening=whitening,
                                           residual_split=cfg.residual_split, residual_stage2=cfg.residual_stage2)

        def install(group, factors):
            if all(ranks[n] is None for n in group):  # the same on every rank: no exchange either
                return
            if self.world > 1:
                factors = self._share_factors(group, factors, linears, ranks, owner=groups.index(group) % self.world)
            for name, f in factors.items():
                old = linears[name]
                set_submodule(comp, name, LowRankLinear.from_factors(  # rounded as they will be stored
                    f.U, f.V, None if old.bias is None else old.bias, dtype=self.storage_dtype).to(old.weight.dtype))
                self.ranks[self._full(index, name)] = f.rank
                if self.spectra is not None:
                    self.spectra[self._full(index, name)] = f.sigma.detach().cpu()
                report.modules[name] = {"rank": f.rank, "truncation_loss": f.truncation_loss,
                                        "retained_energy": f.retained_energy, "beta": f.beta}

        settled = None
        if two_stream:
            if self.offload != "disk":  # replayed outputs are one more stream; a disk run keeps RAM flat
                settled = SettledOutputs(comp, x_stream[0].to(self.device), kwargs[0], self.device, groups,
                                         self.store.holding_device)
            for group in groups:  # in execution order: X' for later groups sees earlier factors
                if all(ranks[n] is None for n in group):
                    if group[0] in dense_inputs:
                        dense_inputs.pop(group[0]).release()
                    if settled:
                        settled.installed_group(group)
                    continue
                with self._timed("statistics"):
                    stats = self._accumulate(group, dense_inputs.get(group[0]), comp, xp_stream, kwargs, index, needs,
                                             settled, dense_outputs.get(group[0]))
                if group[0] in dense_inputs:
                    dense_inputs.pop(group[0]).release()
                for kept in dense_outputs.pop(group[0], {}).values():
                    kept.release()
                mine = groups.index(group) % self.world == self.rank
                install(group, solve(group, stats) if mine else None)
                if settled:
                    settled.installed_group(group)
                del stats
        else:
            # single-stream methods: every group is ready at once, so whiten them in batches;
            # with several processes each solves its own groups, then all exchange factors
            all_stats = single_stats or {g[0]: solvers.GroupStatistics() for g in groups}
            mine = [g for i, g in enumerate(groups)
                    if i % self.world == self.rank and any(ranks[n] is not None for n in g)]
            whitenings = {}
            if method.coefficients is not None:
                with self._timed("whitening"):
                    whitenings = self._batched_whitening({g[0]: all_stats[g[0]] for g in mine if not solvers.output_side(
                        method, [tuple(linears[n].weight.shape) for n in g if ranks[n] is not None])})
            solved = {g[0]: solve(g, all_stats.pop(g[0]), whitenings.pop(g[0], None)) for g in mine}
            all_stats.clear()
            for group in groups:
                install(group, solved.pop(group[0], None))

        if cfg.refine:
            settled = None  # refinement moves every factor: nothing stays final
            with self._timed("refine"):
                report.refine = refine.refine_block(comp, xp_stream, x_next, kwargs, self.device, cfg,
                                                    run_block)
        if not two_stream and not cfg.track_error and not cfg.refine:  # X' feeds only the error report
            return comp, x_next, self.store.stream("xp"), report
        # a single-stream method without refinement propagates X' only to report the error: both are timed apart
        with self._timed("propagate" if two_stream or cfg.refine else "error_tracking"):
            xp_next = self._propagate(comp, xp_stream, kwargs, check=f"the output of block {index}", settled=settled)
            report.output_rel_mse, report.output_cosine_distance = stream_error(x_next, xp_next)
        return comp, x_next, xp_next, report

    def _empty_single_stats(self, linears: dict, compressed: list[str]) -> solvers.GroupStatistics:
        """A group's single-stream accumulators: D, A, or the outputs' YᵀY of its compressed linears
        (none when every linear stays dense)."""
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=self.device)  # noqa: E731
        n = linears[compressed[0]].in_features if compressed else 0
        if not compressed:
            return solvers.GroupStatistics()
        if self.method.diagonal:
            return solvers.GroupStatistics(D=zeros(n))
        if solvers.output_statistics(self.method, [tuple(linears[name].weight.shape) for name in compressed]):
            return solvers.GroupStatistics(outputs={name: zeros(linears[name].out_features, linears[name].out_features)
                                                    for name in compressed})
        return solvers.GroupStatistics(A=zeros(n, n))

    def _fold(self, stats: solvers.GroupStatistics, x: torch.Tensor) -> None:
        if stats.outputs is not None or (stats.A is None and stats.D is None):  # folded by output hooks, or unused
            return
        if stats.A is not None:
            ops.covariance_accumulate(stats.A, x)
            return
        flat = x.reshape(-1, x.shape[-1]).float().abs()
        if self.method.diagonal == "absmax":
            torch.maximum(stats.D, flat.amax(0), out=stats.D)
        else:
            stats.D += flat.sum(0)
        stats.tokens += flat.shape[0]

    def _share_factors(self, group: list, factors: Optional[dict], linears: dict, ranks: dict, owner: int) -> dict:
        """Broadcast one group's factors from the rank that solved it."""
        meta = distributed.broadcast_object(
            {n: (f.rank, f.beta, f.sigma.numel(), f.sigma_rank) for n, f in factors.items()}
            if factors is not None else None, src=owner)
        out = {}
        for name in meta:  # the group's compressed linears (dense ones have no factors)
            k, beta, n_sigma, sigma_rank = meta[name]
            lin = linears[name]
            if factors is None:
                empty = lambda *shape: torch.empty(*shape, dtype=self.dtype, device=self.device)  # noqa: E731
                f = solvers.Factors(U=empty(lin.out_features, k), V=empty(lin.in_features, k), sigma=empty(n_sigma),
                                    rank=k, beta=beta, sigma_rank=sigma_rank)
            else:
                f = factors[name]
                f.U, f.V, f.sigma = (t.to(self.device, self.dtype).contiguous() for t in (f.U, f.V, f.sigma))
            for t in (f.U, f.V, f.sigma):
                distributed.broadcast_(t, src=owner)
            out[name] = f
        return out

    def _propagate(self, block: nn.Module, stream, kwargs: list, check: Optional[str] = None,
                   settled: Optional[SettledOutputs] = None):
        out_stream = self.store.stream("x")
        for b, (x, kw) in enumerate(zip(stream, kwargs)):
            with settled.replay(b, record=False) if settled else contextlib.nullcontext():
                out = run_block(block, x, kw, self.device)
            if check:
                _check_finite(out, check)
            out_stream.append(out)
        return out_stream

    def _batched_whitening(self, all_stats: dict) -> dict:
        coeffs = self.method.coefficients
        by_size: dict[int, list] = defaultdict(list)
        for first, stats in all_stats.items():
            H = solvers.combine_metric(coeffs, stats).to(self.dtype)
            by_size[H.shape[0]].append((first, H))
        out = {}
        for items in by_size.values():
            whites = solvers.whiten_many([H for _, H in items], self.cfg.eps_rel)
            out.update({first: w for (first, _), w in zip(items, whites)})
        return out

    # -- the whole model -----------------------------------------------------------------
    def memory_plan(self, input_ids: torch.Tensor) -> memory.MemoryPlan:
        """The planned peak per device; raises MemoryBudgetError when `max_memory` cannot hold a block."""
        cfg = self.cfg
        per_rank = -(-input_ids.shape[0] // self.world)  # the largest shard: every rank plans (and fails) alike
        plan = memory.plan(self.source, self.method, device=cfg.device, offload=self.offload,
                           n_samples=per_rank, seqlen=input_ids.shape[1], batch_size=cfg.batch_size,
                           solve_dtype=self.dtype, track_error=cfg.track_error, refine=cfg.refine,
                           compute_dtype=self.compute_dtype)
        if cfg.max_memory:
            plan.check(memory.parse_budget(cfg.max_memory, cfg.device))
        return plan

    def prepare(self, input_ids: torch.Tensor, dense_model: Callable[[], nn.Module]) -> None:
        """Statistics that need the whole dense model at once: FWSVD's Fisher (gradients). `dense_model`
        is called only for such methods, and its model is dropped once they are collected."""
        if self.method.diagonal == "fisher":
            from lowrank_engine import fisher

            self.fisher = fisher.column_fisher(dense_model(), input_ids, device=self.device, progress=self.progress)

    def _say(self, text: str) -> None:
        if self.progress and self.rank == 0:
            tqdm.write(text)

    def run(self, input_ids: torch.Tensor) -> CompressionResult:
        start = time.perf_counter()
        src, cfg = self.source, self.cfg
        if self.method.diagonal == "fisher" and self.fisher is None:
            raise ValueError("fwsvd needs Fisher statistics: set Compressor.fisher = fisher.column_fisher(model, ids)")
        plan = self.memory_plan(input_ids)  # before any work: a budget that cannot fit one block fails here
        done = self._resume_state(input_ids)  # fingerprints every window, before they are split over ranks
        input_ids = distributed.shard(input_ids)  # each rank streams its own windows
        self._say(plan.describe())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        spill = os.path.join(self.work_dir, "streams", f"rank{self.rank}") if self.work_dir else None
        self.store = streams.StreamStore(self.offload, self.device, spill)
        try:
            with reuse_freed_heap():
                result = self._run(input_ids, done, start)
        finally:
            self.store.close()
            for empty in (spill, os.path.dirname(spill)) if spill else ():
                try:
                    os.rmdir(empty)  # the parent only once no other rank still spills there
                except OSError:
                    pass
        measured = f"measured peak: cpu {result.peak_rss_mb / 1024:.2f} GiB (RSS)"
        if self.device.type == "cuda":
            measured += f", cuda {result.peak_gpu_mb / 1024:.2f} GiB"
        self._say(measured)
        return result

    def _run(self, input_ids: torch.Tensor, done: set, start: float) -> CompressionResult:
        src, cfg = self.source, self.cfg
        move_non_block_tensors(src.model, src.blocks_name, self.device)
        with self._timed_global("capture"):
            x_stream = self.store.stream("x")
            block_kwargs = capture_block_inputs(src.model, src.blocks, input_ids, cfg.batch_size, self.device,
                                                x_stream)
        src.after_capture()
        needs_xp = bool(self.method.needs & {"B", "C"}) or cfg.track_error or cfg.refine
        xp_stream = self.store.copy(x_stream, "xp") if needs_xp else self.store.stream("xp")
        show = self.progress and self.rank == 0
        bar = tqdm(range(len(src.blocks)), desc=f"{cfg.method} r={cfg.ratio}", unit="block", disable=not show)
        self._bar = bar if show else None
        for index in bar:
            self._block_seconds = {}
            with self._timed("load"):
                dense = src.materialize(index, self.device, self.compute_dtype)
            kwargs, block_kwargs[index] = block_kwargs[index], None  # this block's own, per batch
            if index in done:
                bar.set_postfix_str("resumed")
                comp, x_next, xp_next, report = self._replay_block(index, dense, x_stream, xp_stream, kwargs)
            else:
                comp, x_next, xp_next, report = self.compress_block(index, dense, x_stream, xp_stream, kwargs)
            x_stream.release()
            xp_stream.release()
            x_stream, xp_stream = x_next, xp_next
            if index not in done:
                if self.work_dir:
                    with self._timed("write"):
                        self._write_block(index, comp, report)
            report.seconds = dict(self._block_seconds)
            self.reports.append(report)
            del dense
            src.release(index, comp)
            del comp
            return_freed_memory()
            bar.set_postfix_str(f"rel_mse {report.output_rel_mse:.3g}")
        self._bar = None
        peak_gpu = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else 0.0
        # the largest process's peak: every rank holds one block and its share of the streams
        return CompressionResult(ranks=dict(self.ranks), blocks=self.reports, seconds=time.perf_counter() - start,
                                 peak_rss_mb=distributed.all_reduce_max(peak_rss_mb()),
                                 peak_gpu_mb=distributed.all_reduce_max(peak_gpu), stage_seconds=dict(self.stage_seconds))

    def _timed_global(self, stage: str):
        self._block_seconds = {}
        return self._timed(stage)

    # -- resume --------------------------------------------------------------------------
    def _resume_state(self, input_ids: torch.Tensor) -> set:
        if not self.work_dir:
            return set()
        # rank 0 alone reads the state, so every rank replays the same blocks (no shared-FS races)
        done = self._read_progress(input_ids) if self.rank == 0 else None
        return distributed.broadcast_object(done, src=0)

    def _read_progress(self, input_ids: torch.Tensor) -> set:
        fingerprint = workdir.run_fingerprint(self.cfg, input_ids, self.source.identity(), self.world)
        os.makedirs(os.path.join(self.work_dir, "blocks"), exist_ok=True)
        progress = os.path.join(self.work_dir, "progress.json")
        if os.path.exists(progress):
            with open(progress, encoding="utf-8") as f:
                state = json.load(f)
            if state.get("fingerprint") != fingerprint:
                raise ValueError(f"{self.work_dir} holds a run with different settings "
                                 f"({workdir.describe_mismatch(state.get('fingerprint'), fingerprint)}); "
                                 "rerun with the same ones, or remove it to start over")
            return {int(i) for i in state.get("done", []) if os.path.exists(self._block_file(int(i)))}
        checkpoint.atomic_write_json({"fingerprint": fingerprint, "done": []}, progress)
        return set()

    def _write_block(self, index: int, comp: nn.Module, report: BlockReport) -> None:
        if self.rank != 0:  # every rank holds the same factors; one writes them
            return
        prefix = f"{self.source.blocks_name}.{index}."
        tensors = {prefix + k: v.to(self.storage_dtype) if v.dtype == self.compute_dtype else v
                   for k, v in comp.state_dict().items()}
        ranks = {prefix + n: m.rank for n, m in comp.named_modules() if isinstance(m, LowRankLinear)}
        checkpoint.atomic_save_tensors(tensors, self._block_file(index),
                                       metadata={"ranks": json.dumps(ranks), "report": json.dumps(asdict(report))})
        progress = os.path.join(self.work_dir, "progress.json")
        with open(progress, encoding="utf-8") as f:
            state = json.load(f)
        state["done"] = sorted(set(state["done"]) | {index})
        checkpoint.atomic_write_json(state, progress)

    @torch.no_grad()
    def _replay_block(self, index: int, dense: nn.Module, x_stream, xp_stream, kwargs):
        """A block finished by an earlier run: load its factors, then only propagate the streams."""
        from safetensors import safe_open

        path = self._block_file(index)
        with safe_open(path, framework="pt", device=str(self.device)) as f:
            meta = f.metadata()
            ranks = json.loads(meta["ranks"])
            prefix = f"{self.source.blocks_name}.{index}."
            state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys()}
        comp = copy.deepcopy(dense)
        checkpoint.install_lowrank_modules(comp, {k[len(prefix):]: r for k, r in ranks.items()}, device=self.device)
        comp.load_state_dict(state, strict=True, assign=True)
        cast_parameters(comp, self.compute_dtype)
        self.ranks.update(ranks)
        report = BlockReport(**{k: v for k, v in json.loads(meta["report"]).items()})
        return comp, self._propagate(dense, x_stream, kwargs), self._propagate(comp, xp_stream, kwargs), report


def stream_error(x: list, xp: list) -> tuple[float, float]:
    """Relative MSE ‖X'−X‖²/‖X‖² and mean per-token cosine distance between the streams (over all ranks)."""
    sums = torch.zeros(4, dtype=torch.float64)  # ‖X'−X‖², ‖X‖², Σ(1 − cos), tokens
    for a, b in zip(x, xp):
        a, b = a.double(), b.to(a.device).double()
        cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)
        sums += torch.tensor([float(((b - a) ** 2).sum()), float((a ** 2).sum()), float((1 - cos).sum()), cos.numel()],
                             dtype=torch.float64)
    sums = distributed.all_reduce_sum_tensor(sums)
    num, den, cos_sum, count = sums.tolist()
    return num / max(den, 1e-300), cos_sum / max(count, 1)


def compress_model(model: nn.Module, input_ids: torch.Tensor, cfg: CompressionConfig,
                   work_dir: Optional[str] = None, progress: bool = True) -> CompressionResult:
    """Compress an in-memory HF causal LM in place."""
    model.eval()
    compressor = Compressor(BlockSource(model), cfg, work_dir=work_dir, progress=progress)
    compressor.prepare(input_ids, lambda: model)
    return compressor.run(input_ids)
