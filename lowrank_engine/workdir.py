"""The resume work directory `<output>.partial/`: one process at a time, a fingerprint of everything
that decides the result, so that `--resume` continues only the very same run, and one file per
finished block.

The fingerprint has four parts: the settings (every CompressionConfig field that changes a factor),
the calibration token ids, the model's identity and the number of processes. The model's identity
is read from its safetensors files (each header, which names every tensor with its dtype, shape and
offsets, plus evenly spaced samples of the data) or, for an in-memory model, from the same kind of
sample of each tensor: cheap for a 70B checkpoint, yet any retrained or re-quantized model differs.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
from dataclasses import asdict
from typing import Iterable, Optional

import torch

LOCK_FILE = ".lock"
SAMPLES_PER_FILE = 64
SAMPLE_BYTES = 64 * 1024
SAMPLES_PER_TENSOR = 4096
# settings that never change a block file: where data lives, what is reported, and distillation (it runs
# after the last block file is written, and again on a resume)
NOT_IN_FINGERPRINT = ("offload", "max_memory", "track_error", "distill_passes", "distill_lr")


class WorkDirBusy(ValueError):
    """Another process holds the work directory."""


class WorkDirLock:
    """An exclusive advisory lock on `<work_dir>/.lock` for the lifetime of a run. The kernel drops it
    when its process dies, so a run killed with kill -9 never blocks its own --resume."""

    def __init__(self, work_dir: str):
        self.work_dir = work_dir
        self.path = os.path.join(work_dir, LOCK_FILE)
        self._fd = None

    def acquire(self, record_pid: bool = True) -> "WorkDirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise WorkDirBusy(f"{self.work_dir} is in use by another lowrank-engine process"
                              f"{f' (pid {holder})' if holder else ''}; wait for it to finish or stop it") from None
        if record_pid:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_not_busy(work_dir: str) -> None:
    """Fail early, before any work, when another process is running in `work_dir`."""
    if os.path.exists(os.path.join(work_dir, LOCK_FILE)):
        WorkDirLock(work_dir).acquire(record_pid=False).release()


# --------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------
def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _file_parts(path: str):
    size = os.path.getsize(path)
    yield f"{os.path.basename(path)}:{size}".encode()
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0] if size >= 8 else 0
        start = 8 + header_len
        yield f.read(min(header_len, size - 8))  # every tensor's name, dtype, shape and offsets
        body = max(size - start, 0)
        stride = max(body // SAMPLES_PER_FILE, 1)
        for offset in range(start, size, stride):
            f.seek(offset)
            yield f.read(SAMPLE_BYTES)


def files_identity(paths: Iterable[str], config: Optional[str] = None) -> str:
    """Identity of a safetensors checkpoint, and of its config.json (hashed whole) when given."""
    def parts():
        for path in sorted(set(paths)):
            yield from _file_parts(path)
        if config is not None:
            with open(config, "rb") as f:
                yield f.read()
    return _digest(parts())


def tensors_identity(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Identity of in-memory weights: names, dtypes, shapes and evenly spaced samples of each."""
    def parts():
        for name, t in named_tensors:
            yield f"{name}:{t.dtype}:{tuple(t.shape)}".encode()
            if t.device.type == "meta" or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            sample = flat[:: max(flat.numel() // SAMPLES_PER_TENSOR, 1)].cpu().contiguous()
            yield sample.view(torch.uint8).numpy().tobytes()
    return _digest(parts())


def run_fingerprint(cfg, input_ids: torch.Tensor, model_identity: str, processes: int) -> dict:
    """Everything that decides the factors of a run, as JSON-ready parts."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_FINGERPRINT}
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    return {"settings": json.loads(json.dumps(settings, sort_keys=True, default=str)),
            "calibration": _digest([str(tuple(ids.shape)).encode(), ids.numpy().tobytes()]),
            "model": model_identity, "processes": processes}


def describe_mismatch(stored, current: dict) -> str:
    """Which parts of two fingerprints differ, in words."""
    if not isinstance(stored, dict) or set(stored) != set(current):
        return "a run of an older lowrank-engine version"
    changed = []
    old, new = stored.get("settings") or {}, current["settings"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changed.append(f"{key} {old.get(key)!r} → {new.get(key)!r}")
    names = {"calibration": "other calibration windows (--calibration, --nsamples, --seqlen or --seed)",
             "model": "another model", "processes": f"{stored.get('processes')} processes, not {current['processes']}"}
    changed += [text for part, text in names.items() if stored.get(part) != current[part]]
    return "; ".join(changed)


# --------------------------------------------------------------------------------------
# finished blocks
# --------------------------------------------------------------------------------------
class ResumeDir:
    """`<work_dir>/progress.json` (the fingerprint and the finished blocks) and `blocks/block-N.safetensors`
    (a finished block's tensors, with its ranks and report as metadata)."""

    def __init__(self, work_dir: str):
        self.work_dir = work_dir
        self.progress = os.path.join(work_dir, "progress.json")

    def block_file(self, index: int) -> str:
        return os.path.join(self.work_dir, "blocks", f"block-{index:05d}.safetensors")

    def finished_blocks(self, fingerprint: dict) -> set:
        """The blocks an earlier run with this fingerprint finished; starts the record on a fresh directory,
        and refuses one that holds another run."""
        from lowrank_engine import checkpoint

        os.makedirs(os.path.join(self.work_dir, "blocks"), exist_ok=True)
        if not os.path.exists(self.progress):
            checkpoint.atomic_write_json({"fingerprint": fingerprint, "done": []}, self.progress)
            return set()
        with open(self.progress, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("fingerprint") != fingerprint:
            raise ValueError(f"{self.work_dir} holds a run with different settings "
                             f"({describe_mismatch(state.get('fingerprint'), fingerprint)}); "
                             "rerun with the same ones, or remove it to start over")
        return {int(i) for i in state.get("done", []) if os.path.exists(self.block_file(int(i)))}

    def write_block(self, index: int, tensors: dict, ranks: dict, report: dict) -> None:
        """Save a finished block, then mark it done (a crash between the two redoes the block)."""
        from lowrank_engine import checkpoint

        checkpoint.atomic_save_tensors(tensors, self.block_file(index),
                                       metadata={"ranks": json.dumps(ranks), "report": json.dumps(report)})
        with open(self.progress, encoding="utf-8") as f:
            state = json.load(f)
        state["done"] = sorted(set(state["done"]) | {index})
        checkpoint.atomic_write_json(state, self.progress)

    def read_block(self, index: int, device) -> tuple[dict, dict, dict]:
        """(tensors, ranks, report) of a finished block."""
        from safetensors import safe_open

        with safe_open(self.block_file(index), framework="pt", device=str(device)) as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, json.loads(meta["ranks"]), json.loads(meta["report"])
