"""The `quantization_config` block of a lowrank checkpoint's config.json (DESIGN §5), checked in one place.

Light on purpose (no transformers model code): the transformers quantizer, the vLLM plugin and the
engine's own loader all read the block through `check_quantization_config`.
"""
from __future__ import annotations

from typing import Any

QUANT_METHOD = "lowrank"  # quantization_config.quant_method, the transformers and vLLM registry key
FORMAT_VERSION = 2  # 1: ranks in lowrank_config.json beside an unchanged config.json, no checksums
READABLE_VERSIONS = (2,)


class QuantizationConfigError(ValueError):
    """config.json's quantization_config is not a block this engine reads."""


def check_quantization_config(config: Any, where: str = "config.json's quantization_config") -> dict:
    """The block itself when it is a readable lowrank block; otherwise one line saying what is wrong."""
    if not isinstance(config, dict) or config.get("quant_method") != QUANT_METHOD:
        raise QuantizationConfigError(f"{where} is not a {QUANT_METHOD!r} block: {config!r:.200}")
    version = config.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise QuantizationConfigError(
            f"{where} has format version {version!r}; this lowrank-engine reads {list(READABLE_VERSIONS)}: "
            "compress the model again with this version")
    ranks = config.get("ranks")
    if not isinstance(ranks, dict):  # empty: every linear was kept dense
        raise QuantizationConfigError(f"{where} has no 'ranks' map {{module name: rank}}")
    bad = {name: rank for name, rank in ranks.items()
           if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0}
    if bad:
        raise QuantizationConfigError(f"{where}: ranks must be positive integers, got {dict(list(bad.items())[:5])}")
    dense = config.get("modules_to_not_convert") or []
    if not isinstance(dense, list) or not all(isinstance(name, str) for name in dense):
        raise QuantizationConfigError(f"{where}: modules_to_not_convert must be a list of module names")
    return config
