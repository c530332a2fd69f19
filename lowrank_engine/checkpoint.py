"""Safetensors checkpoints with per-module ranks. Never unpickles.

Layout of a compressed checkpoint directory (DESIGN §5, format version 2):
    config.json, tokenizer files          the base HF config plus a `quantization_config` block:
                                          quant_method "lowrank", format_version, ranks,
                                          modules_to_not_convert, and how the factors were made
    model.safetensors                     or shards + model.safetensors.index.json;
                                          `<module>.U` (m×k), `<module>.V` (n×k), `<module>.bias`
    SHA256SUMS                            one SHA-256 per shard, in `sha256sum -c` format

The directory is written under a temporary name and renamed into place, so it is complete once it
exists; SHA256SUMS is written last. With lowrank_engine imported, transformers' `from_pretrained` reads
the same directory (lowrank_engine.hf_quantizer); `load` below is the thin path without transformers'
loader, and both give bit-identical models.
"""
from __future__ import annotations

import hashlib
import json
import logging
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
from lowrank_engine.quant_format import FORMAT_VERSION, QUANT_METHOD, check_quantization_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CHECKSUMS_FILE = "SHA256SUMS"
LEGACY_CONFIG = "lowrank_config.json"  # format 1's file; only named in the error that refuses it

logger = logging.getLogger(__name__)


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
# checksums: one SHA-256 per shard, beside the index
# --------------------------------------------------------------------------------------
def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(directory: str) -> None:
    """SHA256SUMS for every safetensors file in `directory`, readable by `sha256sum -c`."""
    shards = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors") and not f.startswith("."))
    lines = "".join(f"{sha256_file(os.path.join(directory, f))}  {f}\n" for f in shards)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(lines)
        os.replace(tmp, os.path.join(directory, CHECKSUMS_FILE))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_checksums(directory: str) -> Optional[dict[str, str]]:
    """{shard file name: SHA-256} from SHA256SUMS, or None when the directory has none."""
    path = os.path.join(directory, CHECKSUMS_FILE)
    if not os.path.exists(path):
        return None
    sums = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            digest, sep, name = line.rstrip("\n").partition("  ")
            if not sep or len(digest) != 64:
                raise CheckpointError(f"{path} line {number} is not '<sha256>  <file>'")
            sums[name.lstrip("*")] = digest
    return sums


def verify_checksums(directory: str, shard_paths: Iterable[str]) -> bool:
    """Check each shard against SHA256SUMS; False (and a warning) when the directory records none.

    A mismatch raises a CheckpointError naming the file, and the tensors in it that are no longer finite
    when the header still parses (flipped bytes that stay finite cannot be placed without reading a copy).
    """
    sums = read_checksums(directory)
    if sums is None:
        logger.warning("%s has no %s (written by save_pretrained?): its shards are not verified",
                       directory, CHECKSUMS_FILE)
        return False
    for path in sorted(set(shard_paths)):
        name = os.path.basename(path)
        if name not in sums:
            raise CheckpointError(f"{path} is not listed in {CHECKSUMS_FILE}")
        if sha256_file(path) != sums[name]:
            bad = _non_finite_tensors(path)
            where = f"; non-finite values in {', '.join(bad[:5])}" if bad else ""
            raise CheckpointError(f"{path} is corrupt: its SHA-256 differs from the one in {CHECKSUMS_FILE}{where}")
    return True


def _non_finite_tensors(path: str) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return [n for n in f.keys() if not _all_finite(f.get_tensor(n))]
    except (SafetensorError, OSError, RuntimeError):
        return []  # the header itself is damaged: the file is all we can name


def _all_finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def check_finite(state: dict[str, torch.Tensor], files: dict[str, str]) -> None:
    for name, tensor in state.items():
        if not _all_finite(tensor):
            raise CheckpointError(f"{files.get(name, '?')} is corrupt: tensor {name} holds NaN or Inf values")


# --------------------------------------------------------------------------------------
# the quantization_config block of config.json
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
    """The quantization_config block, less modules_to_not_convert (which needs the model: see `complete`)."""
    return {
        **(extra or {}),  # provenance first: it can never override a format key
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "engine_version": __version__,
        "method": method,
        "ratio": ratio,
        "ratio_convention": "fraction of compressible-linear parameters removed",
        "ranks": dict(sorted(ranks.items())),
        "calibration": calibration,
    }


def complete_quantization_config(lowrank_config: dict, model: nn.Module) -> dict:
    """Add modules_to_not_convert: the model's linears that stay dense (lm_head, rank-map exclusions)."""
    ranks = lowrank_config["ranks"]
    dense = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in ranks)
    return {**lowrank_config, "modules_to_not_convert": dense}


def save_config(config, quantization_config: dict, directory: str) -> None:
    """config.json: the base config plus the quantization_config block (the caller's config is untouched)."""
    import copy

    config = copy.deepcopy(config)
    config.quantization_config = quantization_config
    config.save_pretrained(directory)


def read_quantization_config(directory: str) -> dict:
    """The quantization_config of a lowrank checkpoint's config.json, checked; a clear error otherwise."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} is not a complete checkpoint (no config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            qcfg = json.load(f).get("quantization_config")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    if qcfg is None:
        if os.path.exists(os.path.join(directory, LEGACY_CONFIG)):
            raise CheckpointError(f"{directory} is a format-1 lowrank-engine checkpoint ({LEGACY_CONFIG}); "
                                  f"this engine reads format {FORMAT_VERSION}: compress the model again")
        raise CheckpointError(f"{directory} is not a lowrank-engine checkpoint (config.json has no quantization_config)")
    try:
        return check_quantization_config(qcfg, f"{path}: quantization_config")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def is_lowrank_checkpoint(directory: str) -> bool:
    """Whether config.json names quant_method "lowrank" (the block itself is checked when loading)."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            qcfg = json.load(f).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return os.path.exists(os.path.join(directory, LEGACY_CONFIG))
    return (isinstance(qcfg, dict) and qcfg.get("quant_method") == QUANT_METHOD) \
        or os.path.exists(os.path.join(directory, LEGACY_CONFIG))


# --------------------------------------------------------------------------------------
# save / load of a whole (in-memory) compressed model
# --------------------------------------------------------------------------------------
def save(model: nn.Module, directory: str, method: str = "unknown", ratio: Optional[float] = None,
         calibration: Optional[dict] = None, tokenizer=None, extra: Optional[dict] = None) -> str:
    """Write config.json (with quantization_config) + safetensors + SHA256SUMS atomically."""
    qcfg = complete_quantization_config(
        build_lowrank_config(lowrank_ranks(model), method, ratio, calibration or {}, extra), model)
    with atomic_directory(directory) as tmp:
        save_config(model.config, qcfg, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_save_tensors(state_dict_for_saving(model), os.path.join(tmp, SINGLE_FILE), metadata={"format": "pt"})
        write_checksums(tmp)
    return directory


def empty_model_from_config(config, trust_remote_code: bool = False) -> nn.Module:
    """Model skeleton with parameters on `meta` (buffers such as rotary tables stay real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return model


def install_lowrank_modules(model: nn.Module, ranks: dict[str, int], device="meta") -> None:
    """Swap the named linears for LowRankLinear shells of the recorded rank (device None: the linear's own)."""
    for name, rank in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"checkpoint names module {name}, which the model does not have") from exc
        if not isinstance(old, (nn.Linear, LowRankLinear)):
            raise CheckpointError(f"checkpoint names {name}, which is a {type(old).__name__}, not a linear")
        like = old.weight if isinstance(old, nn.Linear) else old.U
        set_submodule(model, name, LowRankLinear(old.in_features, old.out_features, int(rank),
                                                 bias=old.bias is not None, device=device or like.device,
                                                 dtype=like.dtype))


def tie_output_embeddings(model: nn.Module) -> None:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and getattr(model.config, "tie_word_embeddings", False):
        out.weight = inp.weight


def tied_output_names(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out_emb = model.get_output_embeddings()
    return {n + ".weight" for n, m in model.named_modules() if m is out_emb}


def load(directory: str, device="cpu", trust_remote_code: bool = False, verify: bool = True):
    """Rebuild the HF model with its factorized layers; returns (model, quantization_config).

    `verify` checks each shard's SHA-256 against SHA256SUMS; every floating tensor is checked finite.
    """
    from transformers import AutoConfig

    qcfg = read_quantization_config(directory)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}/config.json cannot be read: {exc}") from exc
    files = tensor_files(directory)
    if verify:
        verify_checksums(directory, files.values())
    model = empty_model_from_config(config, trust_remote_code)
    install_lowrank_modules(model, qcfg["ranks"])
    expected = set(model.state_dict().keys())
    tied_names = tied_output_names(model)
    unexpected = set(files) - expected
    if unexpected:
        raise CheckpointError(f"checkpoint has tensors the model lacks: {sorted(unexpected)[:5]}")
    missing = expected - set(files) - tied_names
    if missing:
        raise CheckpointError(f"checkpoint is missing tensors: {sorted(missing)[:5]}")
    state = read_tensors(files, [n for n in expected if n in files], device=device)
    check_finite(state, files)
    model.load_state_dict(state, strict=False, assign=True)
    if tied_names:
        tie_output_embeddings(model)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"checkpoint left parameters unset: {leftover[:5]}")
    find_decoder_blocks(model)  # the architecture must still be one we can stream
    model.config.quantization_config = qcfg  # so model.save_pretrained writes a checkpoint that loads again
    model.to(device).eval()
    return model, qcfg


def uninitialised_parameters(directory: str, trust_remote_code: bool = False) -> list[str]:
    """Parameters a plain from_pretrained of `directory` would initialise instead of load.

    Read from the safetensors headers and a meta skeleton, before any weight is loaded; empty when the
    directory has no safetensors (other formats are left to transformers).
    """
    from transformers import AutoConfig

    try:
        files = tensor_files(directory)
    except CheckpointError:
        return []
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        return []  # another method's quantizer renames and builds its own layers
    model = empty_model_from_config(config, trust_remote_code)
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)} - tied_output_names(model)
    return sorted(expected - set(files))


def assemble_checkpoint(work_dir: str, output: str, non_block: dict, config, tokenizer, lowrank_config: dict,
                        trust_remote_code: bool = False, blocks_dir: Optional[str] = None) -> str:
    """Turn a finished run's per-block files (`blocks_dir`, default <work_dir>/blocks) into a sharded
    checkpoint (hard links, then one rename)."""
    blocks_dir = blocks_dir or os.path.join(work_dir, "blocks")
    block_files = sorted(f for f in os.listdir(blocks_dir) if f.endswith(".safetensors") and not f.startswith("."))
    skeleton = empty_model_from_config(config, trust_remote_code)
    install_lowrank_modules(skeleton, lowrank_config["ranks"])
    qcfg = complete_quantization_config(lowrank_config, skeleton)
    del skeleton
    with atomic_directory(output) as tmp:
        save_config(config, qcfg, tmp)
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
        write_checksums(tmp)
    return output


def export_dense(directory: str, output: str, dtype: Optional[str] = None, verify: bool = True,
                 trust_remote_code: bool = False) -> dict:
    """A plain HF checkpoint with W = U·Vᵀ (bias kept), loadable without lowrank-engine; returns its size and
    the compressed one's, in bytes of tensors."""
    model, _ = load(directory, verify=verify, trust_remote_code=trust_remote_code)
    compressed_bytes = tensor_nbytes(tensor_files(directory), tensor_files(directory))
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LowRankLinear):
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  dtype=module.U.dtype)
                # the product in float64, rounded once to the stored dtype
                dense.weight.copy_(module.U.double() @ module.V.double().T)
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
                set_submodule(model, name, dense)
    del model.config.quantization_config
    if dtype is not None:
        model.to(getattr(torch, dtype))
    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp)
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        except (OSError, ValueError):
            logger.warning("%s has no tokenizer; the dense copy has none either", directory)
    dense_bytes = sum(t.numel() * t.element_size() for t in state_dict_for_saving(model).values())
    return {"dense_bytes": dense_bytes, "compressed_bytes": compressed_bytes}
