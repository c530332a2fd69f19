"""Kernel benchmarks: covariance accumulation and the low-rank linear layer.

GPU (full mode):
  * covariance: the Triton kernel (bf16 X and X', fp32 accumulators A, B, C) against three
    ``torch.addmm`` calls in fp32 on the same data already upcast to fp32, at
    n in {4096, 8192, 14336, 28672} and N = 8192 tokens. FLOPs count 2·N·n² per statistic.
  * low-rank linear y = (x V) Uᵀ: the Triton shrink+expand against dense ``F.linear`` and against
    two back-to-back ``torch.matmul`` calls, on the linear shapes (m×n = out×in) of LLaMA-2-7B,
    LLaMA-3-8B and LLaMA-70B, ratios 0.2/0.4/0.6 (k = floor((1-ratio)·m·n/(m+n))),
    M in {1, 4, 16, 128, 2048} tokens, bf16. Decode shapes (M <= 16) are timed as CUDA-graph
    replays (all three implementations), with the L2 cache flushed between replays.
    The bandwidth share is (2·k·(m+n) + 2·M·(n+m)) bytes / peak bandwidth over the measured time.

CPU (or --quick): tiny shapes through the Triton interpreter (TRITON_INTERPRET=1), checked against
the PyTorch reference; the timings are a smoke check of the script only.

The roofline's peak bandwidth comes from the device's name (PEAK_GBPS; --peak-gbps overrides it).
--budget-s bounds the run: the work goes in order of priority (covariance, the low-rank shapes at
ratio 0.4, the end-to-end decode, then the other ratios), what the budget leaves out is listed as
skipped, and the md/json files are rewritten after every part, so a run stopped from outside keeps
what it measured.

    python benchmarks/kernel_bench.py [--quick] [--out-dir benchmarks/results] [--peak-gbps GB/s] [--budget-s S]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

import torch

# The interpreter must be chosen before Triton (or the kernel modules) are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from lowrank_engine import report, solvers  # noqa: E402
from lowrank_engine import triton_kernels as kernels  # noqa: E402

MODELS = {
    "LLaMA-2-7B": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "LLaMA-3-8B": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "LLaMA-70B": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],
}
RATIOS = (0.2, 0.4, 0.6)
TOKENS = (1, 4, 16, 128, 2048)
COV_SIZES = (4096, 8192, 14336, 28672)
COV_TOKENS = 8192
DECODE_MAX_M = 16
E2E_RATIO = 0.4
# Datasheet peak memory bandwidth (GB/s) by a word of torch.cuda.get_device_name(), most specific first.
PEAK_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
             ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("A10G", 600.0), ("L4", 300.0))


def peak_gbps_for(name: str):
    """The datasheet bandwidth of a GPU named `name`, or None when the table does not know it."""
    for key, gbps in PEAK_GBPS:
        if re.search(rf"\b{re.escape(key)}\b", name):  # whole words: "GH200" is not an H200
            return gbps
    return None


class Budget:
    """Seconds left for a run; None means unbounded."""

    def __init__(self, seconds):
        self.deadline = None if seconds is None else time.perf_counter() + seconds

    def exhausted(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline


def device_name() -> str:
    return report.device_name("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def time_gpu(fn, graph: bool) -> float:
    """Mean milliseconds of fn(); with graph=True, fn is captured in a CUDA graph and replayed."""
    import triton.testing

    fn()  # autotuning happens here, outside any capture
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # warm-up on a side stream before capturing
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return triton.testing.do_bench(g.replay, warmup=25, rep=100)
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def time_cpu(fn, reps: int = 3) -> float:
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


# --------------------------------------------------------------------------------------
# covariance
# --------------------------------------------------------------------------------------
def bench_covariance(sizes, N, on_gpu, dev, budget=Budget(None)):
    records = []
    dtype = torch.bfloat16
    for n in sizes:
        if budget.exhausted():
            records.append({"device": device_name(), "bench": "covariance", "n": n, "N": N, "skipped": "time budget"})
            continue
        try:
            X = torch.randn(N, n, device=dev, dtype=dtype)
            Xp = torch.randn(N, n, device=dev, dtype=dtype)
            A, B, C = (torch.zeros(n, n, device=dev) for _ in range(3))
            x32, xp32 = X.float(), Xp.float()
            # correctness on one call from zero
            kernels.covariance_accumulate(A, B, C, X, Xp, None)
            refs = {"A": x32.T @ x32, "B": xp32.T @ xp32, "C": x32.T @ xp32}
            err = max(((got - ref).abs().max() / ref.abs().max()).item()
                      for got, ref in zip((A, B, C), refs.values()))

            def ours():
                kernels.covariance_accumulate(A, B, C, X, Xp, None)

            def addmm3():
                A.addmm_(x32.T, x32)
                B.addmm_(xp32.T, xp32)
                C.addmm_(x32.T, xp32)

            if on_gpu:
                t_ours, t_ref = time_gpu(ours, graph=False), time_gpu(addmm3, graph=False)
            else:
                t_ours, t_ref = time_cpu(ours), time_cpu(addmm3)
        except torch.cuda.OutOfMemoryError:
            print(f"covariance n={n}: out of memory, skipped", file=sys.stderr)
            records.append({"device": device_name(), "bench": "covariance", "n": n, "N": N, "skipped": "out of memory"})
            X = Xp = A = B = C = x32 = xp32 = refs = None
            torch.cuda.empty_cache()
            continue
        flops = 3 * 2.0 * N * n * n
        bytes_ours = 2 * N * n * X.element_size() + 3 * 2 * n * n * 4
        bytes_ref = 2 * N * n * 4 * 2 + 3 * 2 * n * n * 4  # each addmm reads its two fp32 operands
        records.append({
            "device": device_name(), "bench": "covariance", "n": n, "N": N, "input_dtype": "bfloat16",
            "t_kernel_ms": t_ours, "t_addmm3_fp32_ms": t_ref,
            "kernel_tflops": flops / (t_ours * 1e-3) / 1e12, "addmm3_tflops": flops / (t_ref * 1e-3) / 1e12,
            "kernel_gbps": bytes_ours / (t_ours * 1e-3) / 1e9, "addmm3_gbps": bytes_ref / (t_ref * 1e-3) / 1e9,
            "speedup_vs_addmm3": t_ref / t_ours, "max_rel_err": err,
            "addmm_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        })
        X = Xp = A = B = C = x32 = xp32 = refA = None
        if on_gpu:
            torch.cuda.empty_cache()
    return records


# --------------------------------------------------------------------------------------
# low-rank linear
# --------------------------------------------------------------------------------------
def bench_lowrank(models, ratios, tokens, on_gpu, dev, peak_gbps, budget=Budget(None)):
    records = []
    dtype = torch.bfloat16
    for model, shapes in models.items():
        for (m, n) in shapes:
            for ratio in ratios:
                k = solvers.rank_for_ratio(m, n, ratio)
                if budget.exhausted():
                    records.append({"device": device_name(), "bench": "lowrank_linear", "model": model, "m": m, "n": n,
                                    "k": k, "ratio": ratio, "skipped": "time budget"})
                    continue
                W = torch.randn(m, n, device=dev, dtype=dtype) / math.sqrt(n)
                V = torch.randn(n, k, device=dev, dtype=dtype) / math.sqrt(n)
                U = torch.randn(m, k, device=dev, dtype=dtype) / math.sqrt(k)
                for M in tokens:
                    x = torch.randn(M, n, device=dev, dtype=dtype)
                    y = kernels.lowrank_forward(x, V, U, None)
                    ref = torch.matmul(torch.matmul(x.float(), V.float()), U.float().T)
                    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                    decode = M <= DECODE_MAX_M
                    fns = {
                        "lowrank": lambda x=x, V=V, U=U: kernels.lowrank_forward(x, V, U, None),
                        "dense": lambda x=x, W=W: F.linear(x, W),
                        "two_gemm": lambda x=x, V=V, U=U: torch.matmul(torch.matmul(x, V), U.T),
                    }
                    if on_gpu:
                        t = {name: time_gpu(fn, graph=decode) for name, fn in fns.items()}
                    else:
                        t = {name: time_cpu(fn) for name, fn in fns.items()}
                    bytes_lr = 2 * k * (m + n) + 2 * M * (n + m)
                    rec = {
                        "device": device_name(), "bench": "lowrank_linear", "model": model, "m": m, "n": n, "k": k,
                        "ratio": ratio, "M": M, "dtype": "bfloat16", "regime": "decode" if decode else "prefill",
                        "cuda_graph": bool(on_gpu and decode),
                        "t_lowrank_ms": t["lowrank"], "t_dense_ms": t["dense"], "t_two_gemm_ms": t["two_gemm"],
                        "speedup_vs_dense": t["dense"] / t["lowrank"], "ideal_speedup": m * n / (k * (m + n)),
                        "speedup_vs_two_gemm": t["two_gemm"] / t["lowrank"],
                        "lowrank_gbps": bytes_lr / (t["lowrank"] * 1e-3) / 1e9,
                        "bw_roofline_share": ((bytes_lr / (peak_gbps * 1e9)) / (t["lowrank"] * 1e-3)
                                              if (decode and on_gpu and peak_gbps) else None),
                        "lowrank_tflops": 2.0 * M * k * (m + n) / (t["lowrank"] * 1e-3) / 1e12,
                        "max_rel_err": err,
                    }
                    records.append(rec)
                    print(f"{model:11s} {m:>5}x{n:<5} k={k:<5} M={M:<5} lowrank {t['lowrank'] * 1e3:9.1f} us  "
                          f"dense {t['dense'] * 1e3:9.1f} us  2xGEMM {t['two_gemm'] * 1e3:9.1f} us", flush=True)
                del W, V, U
                if on_gpu:
                    torch.cuda.empty_cache()
    return records


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------
def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def to_markdown(cov, lr, args, on_gpu):
    dev = device_name()
    lines = [f"# Kernel benchmarks ({dev})", ""]
    if not on_gpu:
        lines += ["**CPU run: the kernels ran in the Triton interpreter on tiny shapes. These timings are a smoke "
                  "check of the benchmark script only and say nothing about kernel performance.**", ""]
    lines += [f"torch {torch.__version__}; mode: {'quick' if args.quick else 'full'}; "
              f"peak bandwidth for the roofline: {args.peak_gbps or 'unknown for this device'} GB/s"
              + (f"; time budget {args.budget_s:g} s" if args.budget_s else ""), ""]
    if cov:
        lines += ["## Covariance: A, B, C += XᵀX, X'ᵀX', XᵀX' (bf16 inputs, fp32 accumulators) vs 3× torch.addmm fp32",
                  "", "FLOPs: 3 · 2·N·n². The addmm baseline runs on inputs already upcast to fp32 (upcast not timed), "
                  f"TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}.",
                  "", "| n | N | kernel ms | addmm×3 ms | speed-up | kernel TFLOP/s | addmm TFLOP/s | kernel GB/s | max rel err |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in cov:
            if r.get("skipped"):
                lines.append(f"| {r['n']} | {r['N']} | skipped: {r['skipped']} | | | | | | |")
                continue
            lines.append(f"| {r['n']} | {r['N']} | {r['t_kernel_ms']:.3f} | {r['t_addmm3_fp32_ms']:.3f} | "
                         f"{r['speedup_vs_addmm3']:.2f} | {r['kernel_tflops']:.1f} | {r['addmm3_tflops']:.1f} | "
                         f"{r['kernel_gbps']:.0f} | {r['max_rel_err']:.1e} |")
        lines.append("")
    if lr:
        lines += ["## Low-rank linear y = (x V) Uᵀ, bf16 (m×n = out×in, k = ⌊(1−ratio)·m·n/(m+n)⌋)", "",
                  "Decode (M ≤ 16): CUDA-graph replays; roofline share = (2·k·(m+n) + 2·M·(m+n)) bytes at the peak "
                  "bandwidth over the measured time.", "",
                  "| model | m×n | ratio | k | M | low-rank µs | dense µs | 2×GEMM µs | vs dense | ideal | vs 2×GEMM "
                  "| BW share | rel err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in lr:
            if r.get("skipped"):
                lines.append(f"| {r['model']} | {r['m']}×{r['n']} | {r['ratio']} | {r['k']} | | skipped: {r['skipped']} "
                             "| | | | | | | |")
                continue
            lines.append(
                f"| {r['model']} | {r['m']}×{r['n']} | {r['ratio']} | {r['k']} | {r['M']} | "
                f"{r['t_lowrank_ms'] * 1e3:.1f} | {r['t_dense_ms'] * 1e3:.1f} | {r['t_two_gemm_ms'] * 1e3:.1f} | "
                f"{r['speedup_vs_dense']:.2f} | {r['ideal_speedup']:.2f} | {r['speedup_vs_two_gemm']:.2f} | "
                f"{_fmt(r['bw_roofline_share'], '.0%')} | {r['max_rel_err']:.1e} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# end to end: token-by-token decode of a model whose block linears are LowRankLinear at ratio r
# --------------------------------------------------------------------------------------
def bench_e2e_decode(on_gpu, dev, ratio=E2E_RATIO, steps=32):
    """Greedy decode latency per token, dense vs factorized (random factors: speed only). The factorized
    model runs the Triton kernels (backend "accelerated" on a GPU, "triton", interpreted, on the CPU)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank_engine import ops
    from lowrank_engine.models import block_linears, decode_step, find_decoder_blocks, set_submodule
    from lowrank_engine.modules import LowRankLinear

    if on_gpu:  # LLaMA-3-8B block shapes, 8 blocks (the per-token cost is per block)
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
        dtype, label = torch.bfloat16, "LLaMA-3-8B shapes, 8 blocks"
    else:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
        dtype, label, steps = torch.float32, "tiny", 2
    with torch.device(dev):  # initialised on the device: 2 B parameters take a while on the CPU
        dense = LlamaForCausalLM(cfg).to(dtype=dtype).eval()
    compressed = copy.deepcopy(dense)
    _, blocks = find_decoder_blocks(compressed)
    for block in blocks:
        for name, lin in block_linears(block).items():
            m, n = lin.out_features, lin.in_features
            k = solvers.rank_for_ratio(m, n, ratio)
            U = torch.randn(m, k, device=dev, dtype=dtype) / math.sqrt(k)
            V = torch.randn(n, k, device=dev, dtype=dtype) / math.sqrt(n)
            set_submodule(block, name, LowRankLinear.from_factors(U, V, lin.bias))

    @torch.no_grad()
    def per_token_ms(model):
        prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=dev)
        out, past = decode_step(model, prompt)
        nxt = out.logits[:, -1:].argmax(-1)
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            out, past = decode_step(model, nxt, past)
            nxt = out.logits[:, -1:].argmax(-1)
        if on_gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3 / steps

    kernels_backend = "accelerated" if on_gpu else "triton"
    reps = 3 if on_gpu else 1  # the CPU run is a smoke check of the script
    with ops.backend(kernels_backend):
        per_token_ms(dense), per_token_ms(compressed)  # warm-up (autotuning)
        t_dense = statistics.median(per_token_ms(dense) for _ in range(reps))
        t_lowrank = statistics.median(per_token_ms(compressed) for _ in range(reps))
    return [{"device": device_name(), "bench": "e2e_decode", "model": label, "ratio": ratio, "steps": steps,
             "backend": kernels_backend, "dtype": str(dtype).replace("torch.", ""), "ms_per_token_dense": t_dense,
             "ms_per_token_lowrank": t_lowrank, "speedup_vs_dense": t_dense / t_lowrank}]


def e2e_markdown(e2e) -> str:
    return ("\n## End-to-end decode (greedy, KV cache, eager; batch 1)\n\n"
            "| model | dtype | ratio | backend | dense ms/token | low-rank ms/token | speed-up |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(f"| {r['model']} | {r['dtype']} | {r['ratio']} | {r['backend']} | {r['ms_per_token_dense']:.3f} | "
                        f"{r['ms_per_token_lowrank']:.3f} | {r['speedup_vs_dense']:.2f} |" for r in e2e) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small subset (automatic on CPU)")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="peak memory bandwidth for the roofline share (default: PEAK_GBPS by the device's name)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new measurements after this many seconds")
    p.add_argument("--only", choices=("covariance", "lowrank"), default=None,
                   help="run one kernel family (skips the end-to-end decode)")
    p.add_argument("--models", nargs="*", default=None, help=f"subset of {list(MODELS)}")
    args = p.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    if not kernels.triton_available():
        raise SystemExit("Triton kernels unavailable (no triton, or no GPU and TRITON_INTERPRET unset)")
    dev = "cuda" if on_gpu else "cpu"
    if args.peak_gbps is None and on_gpu:
        args.peak_gbps = peak_gbps_for(device_name())
    torch.manual_seed(0)
    if on_gpu:
        cov_sizes, cov_N = ((4096,) if args.quick else COV_SIZES), COV_TOKENS
        models = {k: v for k, v in MODELS.items() if args.models is None or k in args.models}
        ratios = (0.4,) if args.quick else RATIOS
        tokens = (1, 16, 2048) if args.quick else TOKENS
        if args.quick:
            models = {k: v[:2] for k, v in list(models.items())[:1]}
    else:
        args.quick = True
        cov_sizes, cov_N = (80,), 96
        models = {"tiny": [(80, 48), (48, 112)]}
        ratios = (0.4,)
        tokens = (1, 40)
    budget = Budget(args.budget_s)
    first_ratios = [r for r in ratios if r == E2E_RATIO] or list(ratios[:1])
    cov, lr, e2e = [], [], []
    e2e_skipped = False

    def write():  # after every part: a run stopped from outside keeps what it measured
        md = to_markdown(cov, lr, args, on_gpu) + (e2e_markdown(e2e) if e2e else "")
        if e2e_skipped:
            md += "\n## End-to-end decode: skipped (time budget)\n"
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "kernels.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(args.out_dir, "kernels.json"), "w") as f:
            json.dump(cov + lr + e2e, f, indent=1)
        return md

    if args.only != "lowrank":
        cov += bench_covariance(cov_sizes, cov_N, on_gpu, dev, budget)
        write()
    if args.only != "covariance":
        lr += bench_lowrank(models, first_ratios, tokens, on_gpu, dev, args.peak_gbps, budget)
        write()
    if not args.only:
        if budget.exhausted():
            e2e_skipped = True
        else:
            e2e += bench_e2e_decode(on_gpu, dev)
            write()
    if args.only != "covariance":
        rest = [r for r in ratios if r not in first_ratios]
        if rest:
            lr += bench_lowrank(models, rest, tokens, on_gpu, dev, args.peak_gbps, budget)
    print(write())
    # `not err <= tol`: a NaN error fails too
    bad = [r for r in cov + lr if not r.get("skipped") and not r.get("max_rel_err", math.nan) <= 5e-2]
    if bad:
        raise SystemExit(f"{len(bad)} configurations disagree with the reference (rel err > 5e-2)")


if __name__ == "__main__":
    main()
