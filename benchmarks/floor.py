"""Floor benchmark: the seconds a compression run cannot go below on this machine.

Any implementation of a method runs at least the matrix products its math needs, on every
calibration token. This times those products alone, at the model's real shapes on random data,
adds them up per method, and sets the sum beside the engine's measured runs (quality.py's
records) and the peer's published seconds.

Products, per batch of `batch_size` windows, for every block:
  dense forward      the block's linears (x Wᵀ) and causal SDPA
  factorized fwd     the same with every linear a rank-k pair, (x V) Uᵀ, k at the uniform rank
  A                  XᵀX per distinct linear input, at half a GEMM (an ideal symmetric update); svd-llm
                     takes each linear's output YᵀY instead where that is smaller (down_proj)
  B, C               X'ᵀX' at half a GEMM and XᵀX' at a full one (for down_proj, W·C = YᵀX': m×n, not n×n)
  refine step        the factorized block forward and backward: six products per linear, SDPA forward
                     and backward

Floors:
  svd-llm            dense forward + A
  aa-svd             dense forward + factorized forward + B + C
  aa-svd+refine N    aa-svd + N × (refine step per batch) + factorized forward (X' through the refined block)

Each product is timed into a preallocated output, best of --reps. Norms, activations, rotary tables,
allocation, the solves and all I/O are left out, so a real run is always slower: the floor says how much
of a run is overhead, and whether a published time is reachable on this machine at all.

    python benchmarks/floor.py                    # SmolLM2-135M on the smollm2-cpu-v1 protocol (fp32 on the CPU)
    python benchmarks/floor.py --model DIR --device cuda --nsamples 256 --seqlen 2048   # bf16 on a GPU
    python benchmarks/floor.py --quick            # a tiny random LLaMA: a smoke test of the script

Engine seconds come from quality.py records of the same protocol and device, less the per-block error
report (a single-stream method's X' pass, which those records count in compress_seconds). The peer's come from
peer_runs.json (its code timed by us, on the same protocol and device) and, on the CPU protocol, from
the seconds the issue quotes for another machine.

Writes floor.md and floor.json to --out-dir (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


@dataclass
class Product:
    name: str
    flop: float  # per batch, per block
    seconds: float  # measured, per batch, per block


def best_seconds(fn, reps: int, device: str = "cpu") -> float:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()  # warm-up: allocator, BLAS thread pool, kernel selection
    best = float("inf")
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_config(spec: str):
    from transformers import AutoConfig

    from lowrank_engine import models

    if models.is_default_model(spec) or os.path.isdir(spec):
        return AutoConfig.from_pretrained(models.resolve_model_path(spec))
    return AutoConfig.from_pretrained(spec)  # a hub id: its config.json only, never the weights


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, vocab_size=256, max_position_embeddings=256)


def block_shapes(config) -> tuple[int, dict, list]:
    """(number of blocks, {linear: (out, in)}, groups of linears sharing one input), found by running a
    one-block copy of the model with a small vocabulary; its weights are allocated but never initialized."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from lowrank_engine import models, pipeline

    depth = config.num_hidden_layers
    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    one.vocab_size = min(one.vocab_size, 256)
    if isinstance(getattr(one, "layer_types", None), list):
        one.layer_types = one.layer_types[:1]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    _, blocks = models.find_decoder_blocks(model)
    hidden = []
    kwargs = pipeline.capture_block_inputs(model, blocks, torch.zeros(1, 8, dtype=torch.long), 1, "cpu", hidden)[0]
    groups = pipeline.discover_groups(blocks[0], hidden[0], kwargs[0], "cpu")
    linears = {name: (mod.out_features, mod.in_features) for name, mod in models.block_linears(blocks[0]).items()}
    return depth, linears, groups


def attention_shape(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, head_dim


def measure_products(config, linears: dict, groups: list, ratio: float, batch: int, seqlen: int,
                     reps: int, device: str = "cpu", dtype: str = "float32") -> dict[str, Product]:
    import torch
    import torch.nn.functional as F

    from lowrank_engine import solvers

    tokens = batch * seqlen
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen).to(device, getattr(torch, dtype)).requires_grad_(grad)

    ranks = {name: solvers.rank_for_ratio(m, n, ratio) for name, (m, n) in linears.items()}
    inputs = {}  # one activation per distinct input width
    for m, n in linears.values():
        inputs.setdefault(n, rand(tokens, n))
        inputs.setdefault(m, rand(tokens, m))
    weights = {name: rand(m, n) for name, (m, n) in linears.items()}
    factors = {name: (rand(m, ranks[name]), rand(n, ranks[name])) for name, (m, n) in linears.items()}

    heads, head_dim = attention_shape(config)
    q, k, v = (rand(batch, heads, seqlen, head_dim, grad=True) for _ in range(3))  # kv heads repeated, as HF does
    sdpa_flop = 2 * 2 * batch * heads * head_dim * seqlen * (seqlen + 1) / 2  # causal: QKᵀ and PV, lower half

    def sdpa_forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_train():
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True).sum(), (q, k, v))

    group_widths = [linears[g[0]][1] for g in groups]
    svd_llm = solvers.get_method("svd-llm")
    # svd-llm's statistic per group: XᵀX, or each linear's output YᵀY where those are smaller (down_proj)
    single_widths = [w for g in groups for w in
                     ([linears[name][0] for name in g] if solvers.output_statistics(svd_llm, [linears[name] for name in g])
                      else [linears[g[0]][1]])]
    aa_svd = solvers.get_method("aa-svd")
    # aa-svd's cross statistic per group: C = XᵀX', or each linear's W·C = YᵀX' where Σm < n (down_proj)
    cross = [(m, linears[g[0]][1]) for g in groups for m in
             ([linears[name][0] for name in g] if solvers.anchored_statistics(aa_svd, [linears[name] for name in g])
              else [linears[g[0]][1]])]
    dense, factorized, train, covariance, single, anchors = [], [], [], [], [], []  # (a, b) pairs: a @ b
    for name, (m, n) in linears.items():
        U, V = factors[name]
        x, dy, h = inputs[n], inputs[m], rand(tokens, ranks[name])  # h = x V, dh in the backward
        dense.append((x, weights[name].T))
        factorized += [(x, V), (h, U.T)]
        train += [(x, V), (h, U.T), (dy.T, h), (dy, U), (x.T, h), (h, V.T)]  # forward; dU, dh, dV, dx
    for n in group_widths:
        covariance.append((inputs[n].T, inputs[n]))
    for n in single_widths:
        single.append((inputs[n].T, inputs[n]))
    for m, n in cross:
        anchors.append((inputs[m].T, inputs[n]))

    def gemms(pairs):
        """Time the products into preallocated outputs: allocation is an overhead, not part of the floor."""
        outs = [torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device) for a, b in pairs]

        def run():
            for (a, b), out in zip(pairs, outs):
                torch.mm(a, b, out=out)
        return best_seconds(run, reps, device)

    dense_flop = sum(2 * tokens * m * n for m, n in linears.values())
    factorized_flop = sum(2 * tokens * ranks[name] * (m + n) for name, (m, n) in linears.items())
    covariance_flop = sum(2 * tokens * n * n for n in group_widths)
    covariance_s = gemms(covariance)
    attention_s = best_seconds(sdpa_forward, reps, device)
    products = [
        Product("dense linears", dense_flop, gemms(dense)),
        Product("factorized linears", factorized_flop, gemms(factorized)),
        Product("attention (SDPA, causal)", sdpa_flop, attention_s),
        Product("A or B: XᵀX at half a GEMM", covariance_flop / 2, covariance_s / 2),
        Product("svd-llm: XᵀX or outputs' YᵀY, half a GEMM", sum(tokens * n * n for n in single_widths),
                gemms(single) / 2),
        Product("C: XᵀX', or W·C = YᵀX' (down_proj)", sum(2 * tokens * m * n for m, n in cross), gemms(anchors)),
        Product("refine: factorized linears fwd+bwd", 3 * factorized_flop, gemms(train)),
        Product("refine: attention fwd+bwd", 3 * sdpa_flop, best_seconds(sdpa_train, reps, device)),
    ]
    return {p.name: p for p in products}


def floors(products: dict[str, Product], depth: int, batches: int, refine_passes: int) -> dict[str, float]:
    s = {name: p.seconds * depth * batches for name, p in products.items()}
    dense = s["dense linears"] + s["attention (SDPA, causal)"]
    factorized = s["factorized linears"] + s["attention (SDPA, causal)"]
    refine_pass = s["refine: factorized linears fwd+bwd"] + s["refine: attention fwd+bwd"]
    aa_svd = dense + factorized + s["A or B: XᵀX at half a GEMM"] + s["C: XᵀX', or W·C = YᵀX' (down_proj)"]
    return {
        "svd-llm": dense + s["svd-llm: XᵀX or outputs' YᵀY, half a GEMM"],
        "aa-svd": aa_svd,
        "aa-svd+refine": aa_svd + refine_passes * refine_pass + factorized,
    }


def engine_seconds(runs_dir: str, protocol: str, device: str, method: str, ratio: float, refine_passes: int):
    """The compression seconds of quality.py's record for this row on this device, or None."""
    import quality

    def records():
        for path in sorted(glob.glob(os.path.join(runs_dir, "*.json"))):
            with open(path) as f:
                yield json.load(f)

    rec = quality.find_record(records(), protocol, device, method, ratio, refine_passes)
    if rec is None or rec.get("compress_seconds") is None:
        return None
    # the floor has no per-block error report: records that ran it count its seconds in compress_seconds
    # (what a CLI user waits for); older records timed it apart already
    tracking = (rec.get("stage_seconds") or {}).get("error_tracking", 0.0) if rec.get("track_error") else 0.0
    return rec["compress_seconds"] - tracking


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a checkpoint directory, a hub id, or the default")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--refine-passes", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", default=None, help="the products' dtype (default float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--runs-dir", default=os.path.join(HERE, "results", "runs"),
                        help="quality.py's per-row records, for the engine's measured seconds")
    parser.add_argument("--peer-runs-file", default=None,
                        help="the peer's code timed on named machines (default benchmarks/results/peer_runs.json)")
    parser.add_argument("--out-dir", default=None, help="default benchmarks/results (results/quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="a tiny random LLaMA and 4×32 tokens")
    args = parser.parse_args(argv)
    if args.nsamples % args.batch_size or min(args.nsamples, args.batch_size, args.seqlen, args.reps) < 1:
        parser.error("--nsamples must be a positive multiple of --batch-size; --seqlen and --reps positive")
    if not 0 < args.ratio < 1 or args.refine_passes < 0:
        parser.error("--ratio must be in (0, 1) and --refine-passes >= 0")

    import quality  # the protocol name and the peer's seconds live with the quality table
    import torch

    from lowrank_engine import models, report

    if args.quick:
        config, protocol = tiny_config(), "tiny-random-llama"
        args.nsamples, args.seqlen, args.batch_size, args.reps = 4, 32, 2, 2
    else:
        config = load_config(args.model)
        protocol = quality.PROTOCOL if models.is_default_model(args.model) and (args.nsamples, args.seqlen) == (64, 512) \
            else f"{args.model}-{args.nsamples}x{args.seqlen}"
    out_dir = args.out_dir or os.path.join(HERE, "results", "quick" if args.quick else "")
    depth, linears, groups = block_shapes(config)
    batches = args.nsamples // args.batch_size
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    products = measure_products(config, linears, groups, args.ratio, args.batch_size, args.seqlen, args.reps,
                                args.device, dtype)
    floor = floors(products, depth, batches, args.refine_passes)

    product_rows = [(p.name, p.flop, p.seconds * 1e3, p.flop / p.seconds / 1e9) for p in products.values()]
    device = report.device_name(args.device)
    peer_runs = quality.load_peer_runs(args.peer_runs_file or quality.PEER_RUNS_FILE)
    method_rows = []
    for method, seconds in floor.items():
        engine = engine_seconds(args.runs_dir, protocol, device, method, args.ratio, args.refine_passes)
        peer_ran_here = protocol == quality.PROTOCOL and args.device == "cpu"  # the peer ran the CPU protocol
        peer = quality.PEER_SECONDS.get(method, {}).get(args.ratio) if peer_ran_here else None
        here = quality.find_record(peer_runs, protocol, device, method, args.ratio, args.refine_passes)
        label = f"{method} ({args.refine_passes} passes)" if method == "aa-svd+refine" else method
        method_rows.append((label, seconds, engine, here and here["compress_seconds"], peer))

    lines = [f"# Compute floor: {protocol}, ratio {args.ratio}, {device}, {torch.get_num_threads()} threads, {dtype}", "",
             f"{depth} blocks, {args.nsamples}×{args.seqlen} calibration tokens in batches of {args.batch_size}; "
             f"best of {args.reps} timings of each product on random data.", "",
             "Products per block and batch:", "",
             "| product | GFLOP | ms | GFLOP/s |", "|---|---|---|---|"]
    lines += [f"| {name} | {flop / 1e9:.3g} | {ms:.3g} | {rate:.0f} |" for name, flop, ms, rate in product_rows]
    lines += ["", "Floors (the products alone, every block and batch) against measured runs:", "",
              "| method | floor s | engine s | engine / floor | peer s, this machine | peer / floor | "
              "peer s, issue's machine |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for label, seconds, engine, here, peer in method_rows:
        lines.append(f"| {label} | {seconds:.1f} | {fmt(engine, '.1f')} | "
                     f"{fmt(None if engine is None else engine / seconds, '.2f')} | {fmt(here, '.1f')} | "
                     f"{fmt(None if here is None else here / seconds, '.2f')} | {fmt(peer, '')} |")
    lines += ["", "A ratio below 1 is faster than this machine ran the method's matrix products alone. "
              "\"peer s, this machine\": the published AA-SVD code timed on this machine (peer_runs.json); "
              "\"issue's machine\": the seconds the issue quotes for it, from another 2-core machine."]
    text = "\n".join(lines) + "\n"
    print(text)

    os.makedirs(out_dir, exist_ok=True)
    record = {"protocol": protocol, "ratio": args.ratio, "device": device, "threads": torch.get_num_threads(), "dtype": dtype,
              "blocks": depth, "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size,
              "refine_passes": args.refine_passes,
              "products": [dict(zip(("name", "flop", "ms", "gflop_per_s"), row)) for row in product_rows],
              "floors": [dict(zip(("method", "floor_seconds", "engine_seconds", "peer_seconds_this_machine",
                                   "peer_seconds"), row))
                         for row in method_rows]}
    with open(os.path.join(out_dir, "floor.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "floor.json"), "w") as f:
        json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
