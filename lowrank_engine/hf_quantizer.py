"""transformers reads lowrank checkpoints: `AutoModelForCausalLM.from_pretrained(out)`.

config.json's `quantization_config` (quant_method "lowrank", DESIGN §5) selects LowRankHfQuantizer, which
swaps the recorded linears for LowRankLinear shells on the meta skeleton before transformers loads the
weights, so U, V and bias load like any parameter (with `dtype`, `device_map`, sharding, offload). The
shards are checked against SHA256SUMS first and the factors for NaN/Inf after. `save_pretrained` of the
loaded model writes the same format (without SHA256SUMS, which only our writers add).

`import lowrank_engine` registers this module lazily (see lowrank_engine/__init__.py): transformers costs
seconds to import, so registration waits until transformers loads its quantizer registry.
"""
from __future__ import annotations

import os

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowrank_engine import checkpoint
from lowrank_engine.quant_format import check_quantization_config
from lowrank_engine.modules import LowRankLinear


class LowRankConfig(QuantizationConfigMixin):
    """The quantization_config block; every key of config.json's block round-trips through to_dict."""

    def __init__(self, ranks: dict, format_version: int = checkpoint.FORMAT_VERSION,
                 modules_to_not_convert: list | None = None, quant_method: str = checkpoint.QUANT_METHOD,
                 **provenance):
        check_quantization_config({"quant_method": quant_method, "format_version": format_version, "ranks": ranks,
                                   "modules_to_not_convert": modules_to_not_convert})
        self.quant_method = checkpoint.QUANT_METHOD
        self.format_version = format_version
        self.ranks = {name: int(rank) for name, rank in ranks.items()}
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.__dict__.update(provenance)  # method, ratio, calibration, engine_version, ...


class LowRankHfQuantizer(HfQuantizer):
    """Loads pre-factorized weights; it cannot factorize a dense checkpoint on the fly (use `compress`)."""

    requires_calibration = True
    quantization_config: LowRankConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        shards = [f for f in checkpoint_files or [] if f.endswith(".safetensors")]
        if shards:
            checkpoint.verify_checksums(os.path.dirname(shards[0]), shards)
        checkpoint.install_lowrank_modules(model, self.quantization_config.ranks, device=None)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, LowRankLinear):
                    for pname, param in module.named_parameters():
                        if not param.is_meta and not bool(torch.isfinite(param).all()):
                            raise checkpoint.CheckpointError(
                                f"tensor {name}.{pname} holds NaN or Inf values: the checkpoint is corrupt")
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make transformers dispatch quant_method "lowrank" here (idempotent)."""
    if checkpoint.QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(checkpoint.QUANT_METHOD)(LowRankConfig)
    if checkpoint.QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(checkpoint.QUANT_METHOD)(LowRankHfQuantizer)
