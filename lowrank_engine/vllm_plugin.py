"""vLLM serves lowrank-engine checkpoints: `vllm.LLM(model=OUT)` and `vllm serve OUT`.

vLLM loads this module through the `vllm.general_plugins` entry point (pyproject.toml) in every
process it starts; `register` adds the quantization method "lowrank", which config.json's
`quantization_config` names (DESIGN §5). Each factorized linear then holds its factors and runs
y = (x V) Uᵀ + b through `lowrank_engine.ops`, which torch.compile traces as opaque custom ops.

Layout of a vLLM layer's factors
- V: (input rows on this rank, Σk), the V factors of the layer's projections side by side.
- U: one flat buffer holding each projection's U block (rows on this rank × k_i) after the other:
  the ranks differ per projection, so the blocks do not stack into one matrix.
- A fused layer (qkv_proj, gate_up_proj) is one shared shrink x·V followed by one expand per
  projection: `ops.lowrank_linear_grouped`.
- A fused layer may keep some projections dense (a rank map that stores a projection whole where its
  factors would cost as much, e.g. v_proj): their rows sit in `weight` (dense rows on this rank, input)
  and run as one plain GEMM beside the factorized ones.

Tensor parallelism (DESIGN §5)
- Column-parallel (qkv_proj, gate_up_proj, ...): each rank keeps V whole and its slice of each
  U block's rows, the same rows vLLM gives it of the dense weight (k/v rows follow vLLM's kv-head
  replication when ranks outnumber kv heads). The layer's outputs are those rows: nothing to reduce.
- Row-parallel (o_proj, down_proj): each rank keeps its slice of V's rows (its slice of the input)
  and U whole; its partial (x_r V_r) Uᵀ is summed by vLLM's all-reduce, and vLLM passes the bias
  to rank 0 only, so it is added once.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.nn import Parameter

from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from lowrank_engine import ops
from lowrank_engine.quant_format import READABLE_VERSIONS as FORMAT_VERSIONS
from lowrank_engine.quant_format import QUANT_METHOD, check_quantization_config

_QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


class LowRankCheckpointError(ValueError):
    """config.json's quantization_config or a factor's shape is not what a lowrank checkpoint holds."""


def register() -> None:
    """Entry point of `vllm.general_plugins`: make quant_method "lowrank" known to vLLM."""
    register_quantization_config(QUANT_METHOD)(LowRankConfig)


def factorized_layers(model: torch.nn.Module) -> list[str]:
    """The vLLM layers the lowrank method serves; `LLM(...).apply_model(factorized_layers)` lists them."""
    return sorted(name for name, module in model.named_modules()
                  if isinstance(getattr(module, "quant_method", None), LowRankLinearMethod))


class LowRankConfig(QuantizationConfig):
    """quant_method "lowrank": per-module ranks of the factorized linears (DESIGN §5)."""

    def __init__(self, ranks: dict[str, int], modules_to_not_convert: Optional[list[str]] = None,
                 format_version: int = FORMAT_VERSIONS[-1]):
        super().__init__()
        self.ranks = dict(ranks)
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.format_version = format_version

    def __repr__(self) -> str:
        return f"LowRankConfig({len(self.ranks)} factorized linears, format {self.format_version})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # plain GEMMs (or the engine's Triton kernels): any GPU vLLM runs on

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LowRankConfig":
        config = check_quantization_config(config)
        return cls(config["ranks"], config.get("modules_to_not_convert"), config["format_version"])

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # the ranks name HF modules; a model whose vLLM modules are named otherwise renames them
        self.ranks = hf_to_vllm_mapper.apply_dict(self.ranks)
        self.modules_to_not_convert = hf_to_vllm_mapper.apply_list(self.modules_to_not_convert)

    def projection_names(self, prefix: str) -> list[str]:
        """The checkpoint modules a vLLM layer holds: q/k/v for qkv_proj, itself for an unfused one."""
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf)
        if not parts:
            return [prefix]
        return [f"{parent}.{part}" if parent else part for part in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Optional[QuantizeMethodBase]:
        if not isinstance(layer, LinearBase):
            return None  # embeddings and the LM head stay dense
        names = self.projection_names(prefix)
        if not any(name in self.ranks for name in names):
            return UnquantizedLinearMethod()
        return LowRankLinearMethod([self.ranks.get(name) for name in names], names)


class LowRankLinearMethod(LinearMethodBase):
    """A (possibly fused) factorized linear: V side by side, one U block per factorized projection, and the
    rows of the projections kept dense (rank None) in one weight."""

    def __init__(self, ranks: list[Optional[int]], names: list[str]):
        self.ranks = ranks
        self.names = names
        self.factorized = [i for i, k in enumerate(ranks) if k is not None]
        self.dense = [i for i, k in enumerate(ranks) if k is None]

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        if len(output_partition_sizes) != len(self.ranks):
            raise LowRankCheckpointError(
                f"{layer.prefix}: vLLM splits this layer into {len(output_partition_sizes)} outputs, "
                f"the checkpoint names {len(self.ranks)} projections {self.names}")
        row_parallel = isinstance(layer, RowParallelLinear)
        ranks = [k or 0 for k in self.ranks]  # a dense projection takes no columns of V and no U block
        rank_offsets = [sum(ranks[:i]) for i in range(len(ranks))]
        u_sizes = [rows * k for rows, k in zip(output_partition_sizes, ranks)]
        dense_rows = [rows if k is None else 0 for rows, k in zip(output_partition_sizes, self.ranks)]
        layer.lowrank_rows = tuple(output_partition_sizes)  # each projection's output rows on this rank
        layer.lowrank_ranks = tuple(self.ranks)
        layer.lowrank_u_offsets = tuple(sum(u_sizes[:i]) for i in range(len(u_sizes)))
        layer.lowrank_dense_offsets = tuple(sum(dense_rows[:i]) for i in range(len(dense_rows)))
        layer.lowrank_names = tuple(self.names)
        layer.lowrank_loaded = set()

        V = Parameter(torch.empty(input_size_per_partition, sum(ranks), dtype=params_dtype), requires_grad=False)
        U = Parameter(torch.empty(sum(u_sizes), dtype=params_dtype), requires_grad=False)

        def load_V(param, loaded, shard_id=None):
            i = self._projection(layer, shard_id, "V")
            k = self.ranks[i]
            self._check_shape(layer, i, "V", loaded, (input_size, k))
            if input_size_per_partition != input_size:  # row-parallel: each rank multiplies its input slice
                rows = input_size_per_partition
                loaded = loaded.narrow(0, layer.tp_rank * rows, rows)
            param.data[:, rank_offsets[i]:rank_offsets[i] + k].copy_(loaded)
            layer.lowrank_loaded.add((i, "V"))

        def load_U(param, loaded, shard_id=None):
            i = self._projection(layer, shard_id, "U")
            k, rows = self.ranks[i], output_partition_sizes[i]
            full_rows = output_size if row_parallel else self._full_rows(layer, i)
            self._check_shape(layer, i, "U", loaded, (full_rows, k))
            if rows != full_rows:  # column-parallel: each rank computes its slice of the outputs
                loaded = loaded.narrow(0, self._shard_index(layer, i) * rows, rows)
            start = layer.lowrank_u_offsets[i]
            param.data[start:start + rows * k].view(rows, k).copy_(loaded)
            layer.lowrank_loaded.add((i, "U"))

        V.weight_loader = load_V
        U.weight_loader = load_U
        layer.register_parameter("V", V)
        layer.register_parameter("U", U)
        if not self.dense:
            return

        # only a fused (column-parallel) layer gets here: an unfused dense linear runs vLLM's own method
        weight = Parameter(torch.empty(sum(dense_rows), input_size, dtype=params_dtype), requires_grad=False)

        def load_weight(param, loaded, shard_id=None):
            i = self._projection(layer, shard_id, "weight")
            rows = output_partition_sizes[i]
            full_rows = self._full_rows(layer, i)
            self._check_shape(layer, i, "weight", loaded, (full_rows, input_size))
            if rows != full_rows:
                loaded = loaded.narrow(0, self._shard_index(layer, i) * rows, rows)
            start = layer.lowrank_dense_offsets[i]
            param.data[start:start + rows].copy_(loaded)
            layer.lowrank_loaded.add((i, "weight"))

        weight.weight_loader = load_weight
        layer.register_parameter("weight", weight)

    # -- weight loading --------------------------------------------------------------------
    def _projection(self, layer, shard_id, tensor: str) -> int:
        """The projection a checkpoint tensor (V, U or a dense weight) belongs to, checked against its rank."""
        if shard_id is None:
            if len(self.ranks) != 1:
                raise LowRankCheckpointError(
                    f"{layer.prefix}: the checkpoint holds this fused layer's {tensor} under one name; a "
                    f"lowrank checkpoint stores each projection's tensors under its own name {self.names}")
            i = 0
        elif isinstance(layer, QKVParallelLinear):
            i = _QKV_SHARDS[shard_id]
        elif isinstance(shard_id, int):
            i = shard_id
        else:
            raise LowRankCheckpointError(f"{layer.prefix}: unsupported shard id {shard_id!r} for a factorized layer")
        if (tensor == "weight") != (self.ranks[i] is None):
            state = "dense" if self.ranks[i] is None else f"factorized (rank {self.ranks[i]})"
            raise LowRankCheckpointError(
                f"{self.names[i]}.{tensor}: config.json's quantization_config has {self.names[i]} {state}; "
                "the config and the shards do not belong together")
        return i

    @staticmethod
    def _full_rows(layer, i: int) -> int:
        """Projection i's output rows over all ranks (before vLLM shards them)."""
        if isinstance(layer, QKVParallelLinear):
            return (layer.total_num_heads * layer.head_size, layer.total_num_kv_heads * layer.head_size,
                    layer.total_num_kv_heads * layer.v_head_size)[i]
        sizes = getattr(layer, "output_sizes", None)
        return sizes[i] if sizes is not None else layer.output_size

    @staticmethod
    def _shard_index(layer, i: int) -> int:
        """Which row slice of projection i this rank holds: k/v heads repeat when ranks outnumber them."""
        if isinstance(layer, QKVParallelLinear) and i > 0:
            return layer.tp_rank // layer.num_kv_head_replicas
        return layer.tp_rank

    def _check_shape(self, layer, i: int, tensor: str, loaded: torch.Tensor, expected: tuple) -> None:
        if tuple(loaded.shape) != expected:
            given = "keeps it dense" if self.ranks[i] is None else f"gives it rank {self.ranks[i]}"
            raise LowRankCheckpointError(
                f"{self.names[i]}.{tensor}: the checkpoint's tensor is {tuple(loaded.shape)}, but config.json's "
                f"quantization_config {given}, so {tensor} must be {expected}; the config and the shards do not "
                "belong together")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        expected = [(i, f) for i in self.factorized for f in ("V", "U")] + [(i, "weight") for i in self.dense]
        missing = [f"{layer.lowrank_names[i]}.{f}" for i, f in expected if (i, f) not in layer.lowrank_loaded]
        if missing:
            raise LowRankCheckpointError(f"the checkpoint lacks {missing}, which config.json's quantization_config names")

    # -- forward -------------------------------------------------------------------------------
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows, ranks = layer.lowrank_rows, layer.lowrank_ranks
        Us = [layer.U.narrow(0, layer.lowrank_u_offsets[i], rows[i] * ranks[i]).view(rows[i], ranks[i])
              for i in self.factorized]
        if len(rows) == 1:
            return ops.lowrank_linear(x, layer.V, Us[0], bias)
        biases = list(bias.split(list(rows))) if bias is not None else [None] * len(rows)
        if not self.dense:
            return torch.cat(ops.lowrank_linear_grouped(x, layer.V, Us, biases if bias is not None else None), dim=-1)
        outputs = [None] * len(rows)
        if len(Us) == 1:
            i = self.factorized[0]
            outputs[i] = ops.lowrank_linear(x, layer.V, Us[0], biases[i])
        else:
            factorized_biases = [biases[i] for i in self.factorized] if bias is not None else None
            for i, y in zip(self.factorized, ops.lowrank_linear_grouped(x, layer.V, Us, factorized_biases)):
                outputs[i] = y
        dense_bias = torch.cat([biases[i] for i in self.dense]) if bias is not None else None
        for i, y in zip(self.dense, torch.nn.functional.linear(x, layer.weight, dense_bias).split(
                [rows[i] for i in self.dense], dim=-1)):
            outputs[i] = y
        return torch.cat(outputs, dim=-1)
