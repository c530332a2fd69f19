"""Safetensors checkpoints with per-module ranks. Never unpickles.

Layout of a compressed checkpoint directory:
    config.json, tokenizer files          the base HF config (unchanged architecture)
    model.safetensors                     or shards + model.safetensors.index.json
    lowrank_config.json                   ranks, method, ratio, calibration, engine version

`lowrank_config.json` is written last and the directory is renamed into place, so a
directory that has it is complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lowrank_engine import __version__
from lowrank_engine.models import find_decoder_blocks, set_submodule
from lowrank_engine.modules import LowRankLinear

LOWRANK_CONFIG = "lowrank_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated or inconsistent."""


# --------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------
def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: Optional[dict] = None) -> None:
    """Write a safetensors file via a temporary name in the same directory, then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(obj, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_directory(path: str):
    """Yield a temporary sibling directory; rename it to `path` only if the block succeeds."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise CheckpointError(f"output directory {path} already exists; remove it or choose another")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
def tensor_files(directory: str) -> dict[str, str]:
    """Map tensor name → safetensors file for a single-file or indexed checkpoint."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is corrupt: {exc}") from exc
        return {name: os.path.join(directory, file) for name, file in weight_map.items()}
    single = os.path.join(directory, SINGLE_FILE)
    if not os.path.exists(single):
        raise CheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{single} is corrupt or truncated: {exc}") from exc


def read_tensors(files: dict[str, str], names: Iterable[str], device="cpu",
                 dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Read the named tensors, opening each file once; floating ones cast to `dtype` one at a time."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        if name not in files:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, file_names in by_file.items():
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in file_names:
                    tensor = f.get_tensor(name)
                    out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{file} is corrupt or truncated: {exc}") from exc
    return out


_SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                      "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def tensor_nbytes(files: dict[str, str], names: Iterable[str]) -> int:
    """Bytes the named tensors take once loaded, read from the file headers only."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    total = 0
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in file_names:
                piece = f.get_slice(name)
                numel = 1
                for s in piece.get_shape():
                    numel *= s
                total += numel * _SAFETENSORS_BYTES.get(piece.get_dtype(), 4)
    return total


# --------------------------------------------------------------------------------------
# save / load of a whole (in-memory) compressed model
# --------------------------------------------------------------------------------------
def lowrank_ranks(model: nn.Module) -> dict[str, int]:
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied weights stored once (safetensors forbids shared storage)."""
    seen: dict[tuple, str] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen and tensor.data_ptr() != 0:
            continue
        seen[key] = name
        out[name] = tensor
    return out


def build_lowrank_config(ranks: dict[str, int], method: str, ratio: Optional[float], calibration: dict,
                         extra: Optional[dict] = None) -> dict:
    return {
        "format": "lowrank-engine",
        "format_version": FORMAT_VERSION,
        "engine_version": __version__,
        "method": method,
        "ratio": ratio,
        "ratio_convention": "fraction of compressible-linear parameters removed",
        "ranks": dict(sorted(ranks.items())),
        "calibration": calibration,
        **(extra or {}),
    }


def save(model: nn.Module, directory: str, method: str = "unknown", ratio: Optional[float] = None,
         calibration: Optional[dict] = None, tokenizer=None, extra: Optional[dict] = None) -> str:
    """Write safetensors + config.json + lowrank_config.json atomically."""
    with atomic_directory(directory) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_save_tensors(state_dict_for_saving(model), os.path.join(tmp, SINGLE_FILE), metadata={"format": "pt"})
        atomic_write_json(build_lowrank_config(lowrank_ranks(model), method, ratio, calibration or {}, extra),
                          os.path.join(tmp, LOWRANK_CONFIG))
    return directory


def read_lowrank_config(directory: str) -> dict:
    path = os.path.join(directory, LOWRANK_CONFIG)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} is not a complete lowrank-engine checkpoint (no {LOWRANK_CONFIG})")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    if cfg.get("format") != "lowrank-engine" or not isinstance(cfg.get("ranks"), dict):
        raise CheckpointError(f"{path} is not a lowrank-engine config")
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {cfg['format_version']}; this engine reads ≤ {FORMAT_VERSION}")
    return cfg


def empty_model_from_config(config, trust_remote_code: bool = False) -> nn.Module:
    """Model skeleton with parameters on `meta` (buffers such as rotary tables stay real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return model


def install_lowrank_modules(model: nn.Module, ranks: dict[str, int], device="meta") -> None:
    """Swap the named linears for LowRankLinear shells of the recorded rank."""
    for name, rank in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"checkpoint names module {name}, which the model does not have") from exc
        if not isinstance(old, (nn.Linear, LowRankLinear)):
            raise CheckpointError(f"checkpoint names {name}, which is a {type(old).__name__}, not a linear")
        dtype = old.weight.dtype if isinstance(old, nn.Linear) else old.U.dtype
        set_submodule(model, name, LowRankLinear(old.in_features, old.out_features, int(rank),
                                                 bias=old.bias is not None, device=device, dtype=dtype))


def tie_output_embeddings(model: nn.Module) -> None:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and getattr(model.config, "tie_word_embeddings", False):
        out.weight = inp.weight


def load(directory: str, device="cpu", trust_remote_code: bool = False):
    """Rebuild the HF model with its factorized layers; returns (model, lowrank_config)."""
    from transformers import AutoConfig

    cfg = read_lowrank_config(directory)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}/config.json cannot be read: {exc}") from exc
    model = empty_model_from_config(config, trust_remote_code)
    install_lowrank_modules(model, cfg["ranks"])
    files = tensor_files(directory)
    expected = set(model.state_dict().keys())
    tied = getattr(config, "tie_word_embeddings", False)
    out_emb = model.get_output_embeddings()
    tied_names = {n + ".weight" for n, m in model.named_modules() if m is out_emb} if tied else set()
    unexpected = set(files) - expected
    if unexpected:
        raise CheckpointError(f"checkpoint has tensors the model lacks: {sorted(unexpected)[:5]}")
    missing = expected - set(files) - tied_names
    if missing:
        raise CheckpointError(f"checkpoint is missing tensors: {sorted(missing)[:5]}")
    state = read_tensors(files, [n for n in expected if n in files], device=device)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        tie_output_embeddings(model)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"checkpoint left parameters unset: {leftover[:5]}")
    find_decoder_blocks(model)  # the architecture must still be one we can stream
    model.to(device).eval()
    return model, cfg


def assemble_checkpoint(work_dir: str, output: str, non_block: dict, config, tokenizer, lowrank_config: dict) -> str:
    """Turn a finished run's per-block files into a sharded checkpoint (hard links, then one rename)."""
    blocks_dir = os.path.join(work_dir, "blocks")
    block_files = sorted(f for f in os.listdir(blocks_dir) if f.endswith(".safetensors") and not f.startswith("."))
    with atomic_directory(output) as tmp:
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        weight_map = {}
        rest_name = "model-rest.safetensors"
        atomic_save_tensors(non_block, os.path.join(tmp, rest_name), metadata={"format": "pt"})
        weight_map.update({name: rest_name for name in non_block})
        for file in block_files:
            target = "model-" + file
            src = os.path.join(blocks_dir, file)
            try:
                os.link(src, os.path.join(tmp, target))
            except OSError:
                shutil.copyfile(src, os.path.join(tmp, target))
            with safe_open(os.path.join(tmp, target), framework="pt") as f:
                weight_map.update({name: target for name in f.keys()})
        atomic_write_json({"metadata": {"format": "lowrank-engine"}, "weight_map": weight_map},
                          os.path.join(tmp, INDEX_FILE))
        atomic_write_json(lowrank_config, os.path.join(tmp, LOWRANK_CONFIG))
    return output
