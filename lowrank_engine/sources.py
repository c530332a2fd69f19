"""Where the blocks come from: an in-memory model, or a safetensors checkpoint read block by block."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from lowrank_engine import checkpoint, workdir
from lowrank_engine.models import checkpoint_names, find_decoder_blocks, warn_if_untested


def replace_non_block_parameters(model: nn.Module, blocks_name: str, make) -> None:
    """Swap every parameter outside the blocks for `make(param)`, or keep it when `make` returns None.
    A parameter shared by several modules (tied embedding and head) is made once, so it stays shared."""
    made: dict[int, Optional[nn.Parameter]] = {}
    for name, module in model.named_modules():
        if name == blocks_name or name.startswith(blocks_name + "."):
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if id(param) not in made:
                made[id(param)] = make(param)
            if made[id(param)] is not None:
                module._parameters[pname] = made[id(param)]


def move_non_block_tensors(model: nn.Module, blocks_name: str, device) -> None:
    """Put embeddings, final norm and head on `device`; blocks stay where they are."""
    device = torch.device(device)
    replace_non_block_parameters(model, blocks_name, lambda p: None if p.device == device else
                                 nn.Parameter(p.data.to(device), requires_grad=p.requires_grad))
    for name, module in model.named_modules():
        if name == blocks_name or name.startswith(blocks_name + "."):
            continue
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf is not None:
                module._buffers[bname] = buf.to(device)


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
        replace_non_block_parameters(self.model, self.blocks_name, lambda p: nn.Parameter(
            torch.empty_like(p, device="meta"), requires_grad=False))

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
