"""Whitening op vs a Python loop of torch.linalg.eigh with the same clamp and products.

    python benchmarks/whitening.py            # CPU grid, plus the GPU grid when CUDA is available
    python benchmarks/whitening.py --quick    # a fast subset
    python benchmarks/whitening.py --device cpu

Inputs are covariances H = XᵀX (X: 2n tokens × n features, three outlier channels ×300), fp32 by
default. Both sides produce the same outputs (L, L⁻¹ contiguous, eigenvalues); the times are
the best of --reps interleaved runs (the machine may be shared), measured side by side in one run.
Results go to benchmarks/results/whitening.{md,json}; records of devices not run this time are
kept from the previous file. --budget-s bounds the run: a configuration whose time, predicted from the
largest one measured so far (eigh is O(n³) per matrix), would overrun what is left is skipped and listed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

from lowrank_engine import ops, report  # first: it sets the OpenMP wait (GOMP_SPINCOUNT) before torch loads OpenMP

import torch

EPS = 1e-6
# the CPU grid, plus batches of small matrices (where per-call overhead dominates a loop)
CPU_GRID = [(32, 256), (128, 256)] + [(n, b) for n in (256, 576, 1024, 1536) for b in (1, 4, 16)]
CPU_QUICK = [(256, 1), (256, 16), (576, 4), (1024, 1)]
GPU_GRID = ([(n, 256) for n in (32, 128, 512)]
            + [(n, b) for n in (4096, 8192) for b in (1, 2, 4)]
            + [(n, b) for n in (14336, 28672) for b in (1, 2)])
GPU_QUICK = [(32, 256), (128, 256), (512, 256), (4096, 1), (4096, 4)]


def loop_whiten(H: torch.Tensor, eps: float = EPS):
    """The baseline: one torch.linalg.eigh per matrix, then the same clamp and products."""
    b, n, _ = H.shape
    L, L_inv = torch.empty_like(H), torch.empty_like(H)
    evals = H.new_empty(b, n)
    for i in range(b):
        h = 0.5 * (H[i] + H[i].mT)
        w, Q = torch.linalg.eigh(h)
        root = w.clamp_min(eps * w.max().clamp_min(0)).sqrt()
        L[i] = Q * root
        L_inv[i] = (Q / root).mT
        evals[i] = w
    return L, L_inv, evals


def op_whiten(H: torch.Tensor, eps: float = EPS):
    L, L_inv, evals, _ = torch.ops.lowrank_engine.whiten(H, eps)
    return L, L_inv, evals


def make_input(n: int, b: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    mats = []
    for _ in range(b):
        X = torch.randn(2 * n, n, device=device, dtype=torch.float32, generator=g)
        X[:, [1, n // 2, n - 2]] *= 300.0
        mats.append(X.mT @ X)
    return torch.stack(mats).to(dtype)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, H, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn(H)
    _sync(device)
    return time.perf_counter() - t0, out


def _finite(out) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in out)


def _recon_diff(a, b) -> float:
    """max |L_a L_aᵀ − L_b L_bᵀ| / λ_max over the batch (eigenvector signs cancel)."""
    La, Lb = a[0].double(), b[0].double()
    diff = (La @ La.mT - Lb @ Lb.mT).abs().amax(dim=(-2, -1))
    lmax = b[2].double().abs().amax(dim=-1).clamp_min(1e-300)
    return float((diff / lmax).max())


class _threads:
    """torch.set_num_threads for a block (the loop baseline on one thread)."""

    def __init__(self, n):
        self.n, self.prev = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)


def bench_one(n: int, b: int, device: str, dtype: torch.dtype, reps: int) -> dict:
    H = make_input(n, b, dtype, device)
    single = device == "cpu" and torch.get_num_threads() > 1  # also time the loop on one thread
    # warm-up (library loading, workspace queries, CUDA handles); skipped for the slowest CPU cases
    if device == "cuda" or n * n * n * b < 1536 ** 3 * 4:
        op_whiten(H), loop_whiten(H)
    op_times, loop_times, loop1_times = [], [], []
    op_out = loop_out = None
    for _ in range(reps):  # interleaved, so load from other processes hits all sides alike
        t, op_out = _timed(op_whiten, H, device)
        op_times.append(t)
        t, loop_out = _timed(loop_whiten, H, device)
        loop_times.append(t)
        if single:
            with _threads(1):
                loop1_times.append(_timed(loop_whiten, H, device)[0])
    op_t, loop_t = min(op_times), min(loop_times)
    loop1_t = min(loop1_times) if loop1_times else None
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else report.cpu_model() or platform.machine(),
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
        "batch": b,
        "op_s": op_t,
        "loop_s": loop_t,
        "speedup": loop_t / op_t,
        "loop_1thread_s": loop1_t,
        "speedup_vs_1thread_loop": loop1_t / op_t if loop1_t else None,
        "reps": reps,
        "op_finite": _finite(op_out),
        "loop_finite": _finite(loop_out),
        "max_recon_diff_rel": _recon_diff(op_out, loop_out),
        # on CUDA tensors the op is the extension's only when it was built with its CUDA kernels
        "backend": "extension" if ops.extension_info()["cuda" if device == "cuda" else "loaded"] else "pytorch-fallback",
        "torch": torch.__version__,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _reps_for(n: int, b: int, device: str, requested: int | None) -> int:
    if requested:
        return requested
    if device == "cuda":
        return 5 if n <= 8192 else 2
    work = n ** 3 * b
    return 5 if work <= 576 ** 3 * 4 else 3 if work <= 1024 ** 3 * 4 else 2 if work <= 1536 ** 3 * 4 else 1


def predicted_seconds(n: int, b: int, measured: list) -> float:
    """The wall time of bench_one at (n, b), scaled by n³·b from the largest configuration measured so
    far on the same device; 0 before the first."""
    if not measured:
        return 0.0
    size, seconds = max(measured)
    return seconds * n ** 3 * b / size


def to_markdown(records: list[dict]) -> str:
    lines = [
        "# Whitening: `lowrank_engine::whiten` vs a Python loop of `torch.linalg.eigh`",
        "",
        "Both sides: symmetrize, eigh, clamp λ ≥ 1e-6·λ_max, L = QΛc^½, L⁻¹ = Λc^-½Qᵀ (contiguous outputs).",
        "Inputs: H = XᵀX, X 2n×n with three outlier channels ×300. Times are the best of `reps`",
        "interleaved runs; the speed-up is measured side by side in the same run. `finite`: no NaN/Inf",
        "in any output of either side. `recon diff`: max |L Lᵀ (op) − L Lᵀ (loop)| / λ_max.",
        "`loop, 1 thread`: the same loop under torch.set_num_threads(1) (CPU only): the solver's",
        "own cost, free of LAPACK's multithreading, which suffers badly when cores are shared.",
        "",
        "| device | threads | dtype | n | batch | op (s) | loop (s) | speed-up | loop, 1 thread (s) | speed-up vs 1-thread loop | finite (op/loop) | recon diff | backend |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    skipped = [r for r in records if r.get("skipped")]
    records = [r for r in records if not r.get("skipped")]
    for r in records:
        l1 = r.get("loop_1thread_s")
        l1_time = "" if l1 is None else f"{l1:.4f}"
        l1_speedup = "" if l1 is None else f"{l1 / r['op_s']:.2f}×"
        lines.append(
            f"| {r['device']} | {r['threads'] if r['threads'] is not None else ''} | {r['dtype']} | {r['n']} | "
            f"{r['batch']} | {r['op_s']:.4f} | {r['loop_s']:.4f} | {r['speedup']:.2f}× | "
            f"{l1_time} | {l1_speedup} | "
            f"{'yes' if r['op_finite'] else 'NO'}/{'yes' if r['loop_finite'] else 'NO'} | "
            f"{r['max_recon_diff_rel']:.1e} | {r['backend']} |")
    devices = sorted({f"{r['device']}: {r['device_name']}" for r in records})
    lines += ["", "Machines: " + "; ".join(devices) + "."]
    if skipped:
        lines += ["", "Not run: " + "; ".join(f"{r['device']} n={r['n']} batch={r['batch']} ({r['skipped']})"
                                         for r in skipped) + "."]
    loads = [r["load_avg_1m"] for r in records if r["device"] == "cpu" and r.get("load_avg_1m") is not None]
    if loads:
        cores = os.cpu_count()
        lines += [f"CPU load average during the CPU runs: {min(loads):.1f}–{max(loads):.1f} on {cores} cores "
                  "(other processes share the machine, which slows multi-threaded LAPACK most)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fast subset of the grid")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: by size)")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip configurations predicted to end after this many seconds")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append("cpu")
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append("cuda")
    elif args.device == "cuda":
        parser.error("CUDA is not available")
    info = ops.extension_info()
    print(f"extension: {info}")
    if not info["loaded"]:
        print("WARNING: the C++ extension is not loaded; the op runs on the PyTorch fallback")

    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "whitening.json")
    md_path = os.path.join(args.out_dir, "whitening.md")
    kept = []
    if os.path.exists(json_path):  # keep the records of devices not benchmarked this time
        with open(json_path) as f:
            kept = [r for r in json.load(f) if r.get("device") not in devices]

    def write(records):  # after every configuration, so an interrupted run keeps what it measured
        with open(json_path, "w") as f:
            json.dump(kept + records, f, indent=1)
        with open(md_path, "w") as f:
            f.write(to_markdown(kept + records))

    records = []
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    for device in devices:
        grid = (CPU_QUICK if args.quick else CPU_GRID) if device == "cpu" else (GPU_QUICK if args.quick else GPU_GRID)
        measured = []  # (n³·b, seconds) of this device's configurations
        for n, b in grid:
            if device == "cuda":
                need = 6 * n * n * b * torch.finfo(dtype).bits // 8
                if need > 0.8 * torch.cuda.mem_get_info()[0]:
                    print(f"skip cuda n={n} batch={b}: needs ~{need / 2**30:.0f} GiB")
                    continue
            if deadline is not None:
                guess = predicted_seconds(n, b, measured)
                if time.perf_counter() + guess > deadline:
                    why = f"time budget: predicted {guess:.0f} s, {max(0.0, deadline - time.perf_counter()):.0f} s left"
                    print(f"skip {device} n={n} batch={b}: {why}")
                    records.append({"device": device, "n": n, "batch": b, "skipped": why})
                    continue
            start = time.perf_counter()
            rec = bench_one(n, b, device, dtype, _reps_for(n, b, device, args.reps))
            measured.append((n ** 3 * b, time.perf_counter() - start))
            records.append(rec)
            write(records)
            print(f"{device:4s} n={n:5d} batch={b:3d}  op {rec['op_s']:.4f}s  loop {rec['loop_s']:.4f}s  "
                  f"x{rec['speedup']:.2f}  finite={rec['op_finite']}/{rec['loop_finite']}  "
                  f"recon={rec['max_recon_diff_rel']:.1e}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()

    write(records)
    print()
    print(to_markdown(kept + records))
    bad = [r for r in records if not r.get("skipped") and not r["op_finite"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
