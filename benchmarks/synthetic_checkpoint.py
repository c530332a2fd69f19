"""Write a LLaMA-70B-shaped checkpoint with random weights, so CPU machines exercise the real shapes.

hidden 8192, intermediate 28672, 64 heads, 8 KV heads (GQA), vocab 128256, L layers (default 2).
Weights are N(0, 0.02) (LLaMA's initializer range; trained 70B linears have a similar spread),
norms are ones, stored in bf16 as one safetensors shard per block plus shards for the embedding
and the head, with a `model.safetensors.index.json`, as a hub checkpoint is laid out. One shard
is in memory at a time (a block: 1.7 GiB in bf16), generated in row chunks without fp32 copies.

    python benchmarks/synthetic_checkpoint.py --layers 4 --out /scratch/llama70b-l4
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                 tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def block_shapes(cfg: dict) -> dict:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
            "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)}


def _tensor(shape, generator, dtype, std=0.02, chunk_rows=2048) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm scales
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    for start in range(0, shape[0], chunk_rows):  # fp32 only one chunk at a time
        rows = out[start:start + chunk_rows]
        rows.copy_(torch.randn(rows.shape, generator=generator, device=generator.device).mul_(std))
    return out


def write_checkpoint(out: str, layers: int, dtype=torch.bfloat16, seed: int = 0, device: str = "cpu", **overrides) -> str:
    """Returns `out`. Existing complete output with the same config is reused. device: where the random
    numbers are drawn (a GPU draws a 70B block in well under a second; other numbers than the CPU's)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = dict(LLAMA_70B, num_hidden_layers=layers, **overrides)
    index_path = os.path.join(out, "model.safetensors.index.json")
    config = LlamaConfig(**cfg, dtype=str(dtype).removeprefix("torch."))
    identity = {"generator": "lowrank-engine synthetic", "seed": str(seed), "dtype": str(dtype),
                "config": json.dumps(cfg, sort_keys=True)}
    if device != "cpu":
        identity["rng_device"] = torch.device(device).type
    if os.path.exists(index_path):
        with open(index_path) as f:
            if json.load(f).get("metadata") == identity:
                return out
    os.makedirs(out, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map = {}

    def write_shard(name: str, tensors: dict) -> None:
        save_file(tensors, os.path.join(out, name + ".tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
        weight_map.update({t: name for t in tensors})

    total = layers + 2
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    write_shard(f"model-00001-of-{total:05d}.safetensors", {
        "model.embed_tokens.weight": _tensor((v, h), generator, dtype)})
    for layer in range(layers):
        tensors = {f"model.layers.{layer}.{n}": _tensor(s, generator, dtype) for n, s in block_shapes(cfg).items()}
        write_shard(f"model-{layer + 2:05d}-of-{total:05d}.safetensors", tensors)
        print(f"[synthetic] block {layer + 1}/{layers} written", file=sys.stderr, flush=True)
    write_shard(f"model-{total:05d}-of-{total:05d}.safetensors", {
        "lm_head.weight": _tensor((v, h), generator, dtype), "model.norm.weight": _tensor((h,), generator, dtype)})
    config.save_pretrained(out)
    with open(index_path + ".tmp", "w") as f:  # the index last: its presence marks a complete checkpoint
        json.dump({"metadata": identity, "weight_map": weight_map}, f, indent=1)
    os.replace(index_path + ".tmp", index_path)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", type=int, default=2, help="decoder blocks (LLaMA-70B has 80)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_checkpoint(args.out, args.layers, getattr(torch, args.dtype), args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
