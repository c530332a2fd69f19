"""Where the activation streams live: on the compute device, in (pinned) CPU memory, or on disk.

A stream is the list of per-batch hidden states entering a block. The pipeline appends to a
stream and reads it back batch by batch, so with `disk` only the batch being processed is
resident: every batch is a file, memory-mapped when read and unmapped when dropped.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from typing import Iterator, Optional

import torch

OFFLOAD_MODES = ("none", "cpu", "disk")


def normalize_offload(offload) -> str:
    """Accept the historical bool (True = cpu) as well as the mode names."""
    if offload is True:
        return "cpu"
    if offload in (False, None):
        return "none"
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload mode {offload!r}; choose from {', '.join(OFFLOAD_MODES)}")
    return offload


class ActivationStream:
    """An append-only list of batch tensors held according to its store's mode."""

    def __init__(self, store: "StreamStore", name: str):
        self.store, self.name = store, name
        self._items: list = []  # tensors, or (path, shape, dtype) for disk

    def append(self, tensor: torch.Tensor) -> None:
        self._items.append(self.store.put(tensor, f"{self.name}-{len(self._items)}"))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.store.get(self._items[index])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for item in self._items:
            yield self.store.get(item)

    def release(self) -> None:
        for item in self._items:
            if isinstance(item, tuple):
                try:
                    os.remove(item[0])
                except FileNotFoundError:
                    pass
        self._items = []


class StreamStore:
    """Creates streams for one run and owns their spill directory (disk mode)."""

    def __init__(self, mode, device, directory: Optional[str] = None):
        self.mode = normalize_offload(mode)
        self.device = torch.device(device)
        self.pin = self.mode == "cpu" and self.device.type == "cuda"
        self.directory = None
        if self.mode == "disk":
            # `directory` is a parent (e.g. <output>.partial/streams/rank0): stale spills of a killed
            # run are cleared, and this store keeps to a private subdirectory it alone removes
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
                os.makedirs(directory, exist_ok=True)
            self.directory = tempfile.mkdtemp(prefix="lowrank-streams-", dir=directory)
        self._ids = itertools.count()

    @property
    def holding_device(self) -> torch.device:
        return self.device if self.mode == "none" else torch.device("cpu")

    def stream(self, label: str = "s") -> ActivationStream:
        return ActivationStream(self, f"{label}{next(self._ids)}")

    def copy(self, source: ActivationStream, label: str = "s") -> ActivationStream:
        out = self.stream(label)
        for t in source:
            out.append(t.clone() if self.mode == "none" else t)
        return out

    def put(self, tensor: torch.Tensor, key: str):
        tensor = tensor.detach()
        if self.mode == "none":
            return tensor.to(self.device)
        if self.mode == "cpu":
            if self.pin:
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor)
                return host
            return tensor.to("cpu")
        path = os.path.join(self.directory, f"{key}.bin")
        host = tensor.to("cpu").contiguous()
        with open(path + ".tmp", "wb") as f:
            f.write(memoryview(host.view(torch.uint8).reshape(-1).numpy()))
        os.replace(path + ".tmp", path)
        return path, tuple(host.shape), host.dtype

    def get(self, item) -> torch.Tensor:
        if not isinstance(item, tuple):
            return item
        path, shape, dtype = item
        numel = 1
        for s in shape:
            numel *= s
        # a private mapping: pages are read on touch and dropped with the tensor
        return torch.from_file(path, shared=False, size=numel, dtype=dtype).view(shape)

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
