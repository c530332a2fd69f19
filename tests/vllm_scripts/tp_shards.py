"""Tensor-parallel rules of the vLLM plugin, 2 ranks simulated in one CPU process (run by tests/test_vllm.py
in the serve environment).

Each vLLM layer is built once per simulated rank (tensor-parallel rank and world size patched where vLLM's
linear layers read them), loaded through vLLM's own weight-loading calls from full, unsharded checkpoint
factors, and run through the plugin's `apply`. Checked on each rank against vLLM's dense layer, built and
loaded the same way from W = U Vᵀ: the factorized layer gives exactly the outputs (column-parallel) or
partial sums (row-parallel) that vLLM expects of that rank, so attention and the all-reduce see the
dense layout. Also checked: the ranks' column outputs gather to, and their row partials plus one bias
sum to, the unsharded layer. Fused layers are checked all factorized and with a projection kept dense
(its rows in the layer's `weight`).

Prints one line per case and exits non-zero on the first failure.
"""
import sys
from contextlib import contextmanager
from unittest import mock

import torch

import vllm.model_executor.layers.linear as vllm_linear
import vllm.model_executor.parameter as vllm_parameter
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

from lowrank_engine.vllm_plugin import LowRankConfig, LowRankLinearMethod

torch.manual_seed(0)
HIDDEN, HEAD, INTERMEDIATE, WORLD = 64, 8, 96, 2
ATOL = 1e-4


@contextmanager
def tensor_parallel(rank: int, world: int):
    """vLLM's layers and (dense) parameters read the rank and world size from these module globals."""
    with mock.patch.object(vllm_linear, "get_tensor_model_parallel_rank", return_value=rank), \
         mock.patch.object(vllm_linear, "get_tensor_model_parallel_world_size", return_value=world), \
         mock.patch.object(vllm_parameter, "get_tensor_model_parallel_rank", return_value=rank), \
         mock.patch.object(vllm_parameter, "get_tensor_model_parallel_world_size", return_value=world):
        yield


def factors(m: int, n: int, k: int, bias: bool):
    return {"U": torch.randn(m, k) / k ** 0.5, "V": torch.randn(n, k) / n ** 0.5,
            "bias": torch.randn(m) if bias else None}


def build(make, rank: int, world: int, quant_config, weights: dict, shard_ids: dict):
    """One rank's layer, loaded the way vLLM's AutoWeightsLoader loads a checkpoint."""
    with tensor_parallel(rank, world):
        layer = make(quant_config)
    for projection, tensors in weights.items():
        shard_id = shard_ids.get(projection)
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            param = getattr(layer, name)
            if shard_id is None:
                param.weight_loader(param, tensor.clone())
            else:
                param.weight_loader(param, tensor.clone(), shard_id)
    if quant_config is not None:  # (the dense method would repack its weight for the CPU GEMM)
        layer.quant_method.process_weights_after_loading(layer)
    return layer


def dense_weight(t: dict) -> torch.Tensor:
    return t["weight"] if "weight" in t else t["U"] @ t["V"].T


def dense_of(weights: dict) -> dict:
    return {p: {"weight": dense_weight(t), "bias": t["bias"]} for p, t in weights.items()}


def keep_dense(weights: dict, projections: tuple) -> dict:
    """The same layer with `projections` stored whole (a fresh random W) instead of as factors."""
    return {p: {"weight": torch.randn(t["U"].shape[0], t["V"].shape[0]) / t["V"].shape[0] ** 0.5, "bias": t["bias"]}
            if p in projections else t for p, t in weights.items()}


def check(label: str, got: torch.Tensor, want: torch.Tensor) -> None:
    error = (got - want).abs().max().item()
    print(f"{label}: max |diff| {error:.2e}")
    if got.shape != want.shape or error > ATOL:
        print(f"FAIL {label}: shape {tuple(got.shape)} vs {tuple(want.shape)}, max |diff| {error:.3e}")
        sys.exit(1)


def forward(layer, x, bias_on_this_rank=True):
    bias = layer.bias if bias_on_this_rank else None
    return layer.quant_method.apply(layer, x, bias)


def column_case(label, make, weights, shard_ids, quant_config, world):
    x = torch.randn(5, HIDDEN)
    full = {p: x @ dense_weight(t).T + (t["bias"] if t["bias"] is not None else 0) for p, t in weights.items()}
    per_rank = []
    for rank in range(world):
        low = build(make, rank, world, quant_config, weights, shard_ids)
        assert isinstance(low.quant_method, LowRankLinearMethod), type(low.quant_method)
        # V whole on every rank, U rows sharded
        assert low.V.shape[0] == HIDDEN, low.V.shape
        dense = build(make, rank, world, None, dense_of(weights), shard_ids)
        want = torch.nn.functional.linear(x, dense.weight, dense.bias)
        got = forward(low, x)
        check(f"{label} rank {rank}/{world} vs vLLM dense", got, want)
        per_rank.append(got.split(list(low.lowrank_rows), dim=-1))
    return full, per_rank


def main():
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    for kv_heads in (4, 1):  # 4 kv heads: split across ranks; 1 kv head: replicated on both ranks
        heads = 8
        shapes = {"q_proj": heads * HEAD, "k_proj": kv_heads * HEAD, "v_proj": kv_heads * HEAD}
        ranks = {"q_proj": 12, "k_proj": 5, "v_proj": 7}  # different ranks per projection
        factorized = {p: factors(m, HIDDEN, ranks[p], bias=True) for p, m in shapes.items()}
        make = lambda qc, kv=kv_heads: QKVParallelLinear(HIDDEN, HEAD, heads, kv, bias=True, quant_config=qc,
                                                         prefix=f"{attn}.qkv_proj")
        ids = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
        for dense in ((), ("v_proj",), ("q_proj", "k_proj")):
            weights = keep_dense(factorized, dense)
            config = LowRankConfig({f"{attn}.{p}": k for p, k in ranks.items() if p not in dense})
            config.packed_modules_mapping = packed
            label = f"qkv_proj ({kv_heads} kv heads{', dense ' + '/'.join(dense) if dense else ''})"
            for world in (1, WORLD):
                full, per_rank = column_case(label, make, weights, ids, config, world)
                q = torch.cat([r[0] for r in per_rank], dim=-1)
                check(f"{label} q gathered over {world} ranks", q, full["q_proj"])
                replicas = max(1, world // kv_heads)
                for j, p in ((1, "k_proj"), (2, "v_proj")):
                    kv = torch.cat([per_rank[r][j] for r in range(0, world, replicas)], dim=-1)
                    check(f"{label} {p[0]} gathered over {world} ranks", kv, full[p])

    ranks = {"gate_proj": 20, "up_proj": 9}
    factorized = {p: factors(INTERMEDIATE, HIDDEN, k, bias=False) for p, k in ranks.items()}
    make = lambda qc: MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE, INTERMEDIATE], bias=False, quant_config=qc,
                                                 prefix=f"{mlp}.gate_up_proj")
    for dense in ((), ("up_proj",)):
        weights = keep_dense(factorized, dense)
        config = LowRankConfig({f"{mlp}.{p}": k for p, k in ranks.items() if p not in dense})
        config.packed_modules_mapping = packed
        label = f"gate_up_proj{' (dense up_proj)' if dense else ''}"
        for world in (1, WORLD):
            full, per_rank = column_case(label, make, weights, {"gate_proj": 0, "up_proj": 1}, config, world)
            for j, p in enumerate(ranks):
                check(f"{label} {p} gathered over {world} ranks", torch.cat([r[j] for r in per_rank], -1), full[p])

    weights = {"down_proj": factors(HIDDEN, INTERMEDIATE, 17, bias=True)}
    config = LowRankConfig({f"{mlp}.down_proj": 17})
    make = lambda qc: RowParallelLinear(INTERMEDIATE, HIDDEN, bias=True, quant_config=qc, prefix=f"{mlp}.down_proj")
    x = torch.randn(5, INTERMEDIATE)
    t = weights["down_proj"]
    full = x @ t["V"] @ t["U"].T + t["bias"]
    for world in (1, WORLD):
        total = torch.zeros_like(full)
        for rank in range(world):
            low = build(make, rank, world, config, weights, {})
            dense = build(make, rank, world, None, dense_of(weights), {})
            width = INTERMEDIATE // world
            assert low.V.shape == (width, 17) and low.U.numel() == HIDDEN * 17  # V rows sharded, U whole
            x_r = x[:, rank * width:(rank + 1) * width]
            # RowParallelLinear.forward hands the bias to rank 0 only
            got = forward(low, x_r, bias_on_this_rank=rank == 0)
            want = torch.nn.functional.linear(x_r, dense.weight, dense.bias if rank == 0 else None)
            check(f"down_proj rank {rank}/{world} partial vs vLLM dense", got, want)
            total += got
        check(f"down_proj partials summed over {world} ranks (bias once)", total, full)
    print("OK")


if __name__ == "__main__":
    with set_current_vllm_config(VllmConfig()):
        main()
