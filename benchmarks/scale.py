"""Scale benchmark: memory stays one block deep, whatever the model's depth or width.

Configurations (each in its own process, so each peak RSS is its own):
  smollm2      SmolLM2-135M (30 blocks, width 576)
  deep         a random model of SmolLM2's width, 4x deeper (120 blocks)
  70b-l2/l4    the synthetic LLaMA-70B-shaped checkpoint (benchmarks/synthetic_checkpoint.py), 2 and 4 blocks
  70b-l1       one such block (benchmarks/device_suite.py times it on a GPU: --device cuda)

Every run streams blocks from safetensors, writes each block's factors as it finishes, and
records the planned and measured peak and the seconds per stage (load, statistics, whitening,
solve, propagate, write). The table ends with the L=2 → L=4 peak growth and an extrapolation
of the measured per-block stage times to an 80-block LLaMA-70B: from the GPU records where there are
any (their own measured rates), else from the CPU record through assumed GPU rates (H100 below).
--method takes a comma-separated list; a row is one (model, method, device).

    python benchmarks/scale.py                          # all four (the 70B-shaped ones need ~16 GiB disk)
    python benchmarks/scale.py --configs smollm2,deep   # the quick part
    python benchmarks/scale.py --plan-only              # planned peaks only, no compression
    python benchmarks/scale.py --configs 70b-l1 --device cuda --method svd-llm,aa-svd --big-seqlen 2048 \
        --big-nsamples 64 --big-offload none --big-overrides '{"vocab_size": 4096}'   # one block on a GPU

Writes scale.md and scale.json to --out-dir (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
STAGES = ("load", "statistics", "whitening", "solve", "propagate", "write")
TARGET = {"blocks": 80, "tokens": 256 * 2048}
# One H100, assumed, not measured: sustained bf16 GEMM for the forward passes and the Triton covariance
# kernel (~40% of the 989 TFLOP/s dense peak), and cuSOLVER syevd on a 4096² fp32 matrix. Per-stage times
# of a CPU record convert by these ratios; a GPU record (device_suite.py) needs none.
H100 = {"gemm_tflops": 400.0, "eigh4096_s": 0.4}
ORDER = ["smollm2", "deep", "70b-l1", "70b-l2", "70b-l4"]
EXTRAPOLATED_FROM_CPU = ("70b-l2", "70b-l4")  # CPU records that extrapolate() converts by the rates above


# --------------------------------------------------------------------------------------
# one configuration (child process)
# --------------------------------------------------------------------------------------
def run_one(args) -> dict:
    spec = json.loads(args.one)
    # factors and spilled streams go to disk, as `compress --offload disk`
    with tempfile.TemporaryDirectory(dir=spec["work_dir"]) as work_dir:
        return measure(args, spec, work_dir)


def measure(args, spec: dict, work_dir: str) -> dict:
    from lowrank_engine import memory, models, ops, pipeline, report  # first: sets the OpenMP wait before torch

    import torch

    source = pipeline.LazyBlockSource(spec["path"], keep_compressed=False)
    if spec["calibration"] == "c4":
        from transformers import AutoTokenizer

        from lowrank_engine import data

        tokenizer = AutoTokenizer.from_pretrained(models.resolve_model_path("smollm2-135m"))
        ids = data.load_calibration("c4", tokenizer, spec["nsamples"], spec["seqlen"], 0).input_ids
    else:  # random token ids: the 70B-shaped model has no tokenizer and random weights anyway
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, source.model.config.vocab_size, (spec["nsamples"], spec["seqlen"]), generator=g)
    cfg = pipeline.CompressionConfig(method=spec["method"], ratio=spec["ratio"], device=spec["device"],
                                     offload=spec["offload"], batch_size=spec["batch_size"],
                                     solve_dtype=spec["solve_dtype"], track_error=False)
    compressor = pipeline.Compressor(source, cfg, work_dir=work_dir, progress=not args.quiet)
    plan = compressor.memory_plan(ids)
    record = {k: spec[k] for k in ("model", "method", "ratio", "offload", "solve_dtype")}
    record["compute_dtype"] = str(compressor.compute_dtype).replace("torch.", "")
    record.update(blocks=len(source.blocks), hidden=source.model.config.hidden_size,
                  intermediate=source.model.config.intermediate_size,
                  calibration=f"{spec['calibration']} {spec['nsamples']}x{spec['seqlen']}",
                  device=report.device_name(spec["device"]), threads=torch.get_num_threads(),
                  block_mb=round(source.block_bytes(0) / 2**20, 1),
                  planned_cpu_mb=round(plan.peak("cpu") / 2**20, 1),
                  planned_gpu_mb=round(plan.peak("cuda") / 2**20, 1) if spec["device"].startswith("cuda") else None)
    paths = ops.active_paths()["cuda" if spec["device"].startswith("cuda") else "cpu"]
    record["ops_backend"] = f"{ops.get_backend()} (kernels: {paths['kernels']}; whitening: {paths['whitening']})"
    if spec["calibration"] == "random":  # the 70B-shaped target: one H100, 256×2048 tokens, streams in pinned memory
        h100 = memory.plan(source, compressor.method, device="cuda", offload="cpu", n_samples=TARGET["tokens"] // 2048,
                           seqlen=2048, batch_size=spec["batch_size"], solve_dtype=torch.float32, track_error=False,
                           compute_dtype=torch.bfloat16)  # from shapes, before the blocks are released
        record["planned_h100_gpu_mb"] = round(h100.peak("cuda") / 2**20, 1)
    if spec.get("plan_only"):
        return record
    if spec["device"].startswith("cuda") or spec["model"] in EXTRAPOLATED_FROM_CPU:  # seconds of a CPU's time
        record.update(device_rates(spec["device"]))
    pipeline.reset_peak_rss()
    result = compressor.run(ids)
    per_block = {s: sum(b.seconds.get(s, 0.0) for b in result.blocks) / len(result.blocks) for s in STAGES}
    record.update(peak_rss_mb=round(result.peak_rss_mb, 1),
                  peak_gpu_mb=round(result.peak_gpu_mb, 1) if spec["device"].startswith("cuda") else None,
                  compress_seconds=round(result.seconds, 1),
                  **{f"{s}_s_per_block": round(v, 2) for s, v in per_block.items()})
    return record


def device_rates(device: str) -> dict:
    """The two rates the extrapolation converts by, measured on the run's device: fp32 GEMM and a 4096² eigh."""
    import torch

    def seconds(fn, repeat=2):
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeat

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(4096, 4096, device=device, generator=g)
    gemm = seconds(lambda: a @ a)
    sym = a @ a.mT
    eigh = seconds(lambda: torch.linalg.eigh(sym), repeat=1)
    return {"gemm_fp32_gflops": round(2 * 4096**3 / gemm / 1e9, 1), "eigh4096_fp32_s": round(eigh, 2)}


# --------------------------------------------------------------------------------------
# the table (parent)
# --------------------------------------------------------------------------------------
def prepare(name: str, args) -> dict:
    """Materialize the checkpoint a configuration reads; returns its spec."""
    base = dict(model=name, method=args.method, ratio=args.ratio, device=args.device, batch_size=args.batch_size,
                solve_dtype=args.solve_dtype, work_dir=args.work_dir, plan_only=args.plan_only)
    if name in ("smollm2", "deep"):
        from lowrank_engine import models

        path = models.resolve_model_path("smollm2-135m")
        if name == "deep":
            path = deep_model(path, args.work_dir)
        return dict(base, path=path, calibration="c4", nsamples=args.nsamples, seqlen=args.seqlen,
                    offload=args.offload)
    layers = int(name.split("-l")[1])
    from synthetic_checkpoint import write_checkpoint

    rng_device = "cuda" if args.device.startswith("cuda") else "cpu"
    path = write_checkpoint(os.path.join(args.work_dir, f"llama70b-shaped-l{layers}"), layers, device=rng_device,
                            **args.big_overrides)
    return dict(base, path=path, calibration="random", nsamples=args.big_nsamples, seqlen=args.big_seqlen,
                offload=args.big_offload, batch_size=args.big_batch_size, solve_dtype=args.big_solve_dtype)


def deep_model(base: str, work_dir: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = os.path.join(work_dir, "smollm2-width-4x-deep")
    if not os.path.exists(os.path.join(out, "config.json")):
        config = AutoConfig.from_pretrained(base)
        config.num_hidden_layers *= 4
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def _tokens(record: dict) -> int:
    windows, seqlen = record["calibration"].split()[1].split("x")
    return int(windows) * int(seqlen)


def extrapolate(record: dict) -> list[str]:
    """Per-block stage times → an 80-block model at 256×2048 tokens: on the measured device, and on one
    H100 by the ratio of the measured rates to the assumed H100 ones (H100)."""
    scale = TARGET["tokens"] / _tokens(record)
    gemm = H100["gemm_tflops"] * 1e12 / (record["gemm_fp32_gflops"] * 1e9)
    lapack = record["eigh4096_fp32_s"] / H100["eigh4096_s"]
    kinds = {"load": ("weights (disk)", 1.0, 1.0), "statistics": ("tokens, GEMM", scale, gemm),
             "whitening": ("weights, eigh", 1.0, lapack), "solve": ("weights, eigh + GEMM", 1.0, lapack),
             "propagate": ("tokens, GEMM", scale, gemm), "write": ("weights (disk)", 1.0, 1.0)}
    lines = [f"Extrapolation from `{record['model']}` ({record['device']}, {record['calibration']} tokens) to "
             f"LLaMA-70B: {TARGET['blocks']} blocks, {TARGET['tokens']:,} calibration tokens (×{scale:.0f}). "
             f"Measured here: fp32 GEMM {record['gemm_fp32_gflops']:.0f} GFLOP/s, eigh 4096² "
             f"{record['eigh4096_fp32_s']:.2f} s. Assumed for one H100 (nothing has run on a GPU: guessed rates, "
             "not measurements): "
             f"GEMM {H100['gemm_tflops']:.0f} TFLOP/s (speed-up ×{gemm:,.0f}), eigh 4096² "
             f"{H100['eigh4096_s']} s (×{lapack:.0f}). Disk stages are kept as measured.", "",
             "| stage | scales with | measured s/block | at target here (s/block) | speed-up | H100 s/block | "
             "H100, 80 blocks (min) |", "|---|---|---|---|---|---|---|"]
    here = h100 = 0.0
    for stage in STAGES:
        kind, token_scale, speedup = kinds[stage]
        measured = record.get(f"{stage}_s_per_block") or 0.0
        at_target = measured * token_scale
        gpu = at_target / speedup
        here, h100 = here + at_target, h100 + gpu
        lines.append(f"| {stage} | {kind} | {measured:.1f} | {measured:.1f} × {token_scale:.0f} = {at_target:,.0f} | "
                     f"×{speedup:,.0f} | {gpu:.1f} | {gpu * TARGET['blocks'] / 60:.1f} |")
    lines += ["", f"This device: {here:,.0f} s/block × {TARGET['blocks']} = {here * TARGET['blocks'] / 3600:,.1f} h. "
              f"One H100 at the assumed rates: {h100:.1f} s/block × {TARGET['blocks']} = {h100 * TARGET['blocks'] / 60:.0f} min "
              f"(goal: under 60 min)."]
    if record.get("planned_h100_gpu_mb"):
        lines.append(f"Planned H100 peak (the engine's memory plan, bf16 blocks, fp32 statistics and solve, "
                     f"streams in pinned CPU memory): {record['planned_h100_gpu_mb'] / 1024:.1f} GiB (goal: under 60 GB).")
    return lines


def on_gpu(record: dict) -> bool:
    return not str(record.get("device", "cpu")).startswith("cpu")


def extrapolate_measured(record: dict) -> list[str]:
    """A GPU record's own per-block stage times → 80 blocks at 256×2048 tokens: the token-proportional
    stages scale by the token ratio, the others stay as measured; no assumed rate enters."""
    scale = TARGET["tokens"] / _tokens(record)
    token_stages = {"statistics", "propagate"}
    lines = [f"Measured on {record['device']}: one `{record['model']}` run, {record['method']} at ratio {record['ratio']}, "
             f"{record['calibration']} calibration tokens ({_tokens(record):,}"
             + (f", fewer than the target's {TARGET['tokens']:,} to fit a time cap: the token-proportional stages "
                f"are scaled ×{scale:g}" if scale != 1 else ", the target") + "), "
             f"streams offload {record['offload']}, statistics on the ops backend `{record.get('ops_backend', '?')}`. "
             f"Peak GPU memory {record['peak_gpu_mb'] / 1024:.1f} GiB (at the measured token count).", "",
             f"| stage | scales with | measured s/block | at {TARGET['tokens']:,} tokens (s/block) | "
             f"{TARGET['blocks']} blocks (min) |", "|---|---|---|---|---|"]
    total = 0.0
    for stage in STAGES:
        measured = record.get(f"{stage}_s_per_block") or 0.0
        factor = scale if stage in token_stages else 1.0
        total += measured * factor
        lines.append(f"| {stage} | {'tokens' if stage in token_stages else 'weights'} | {measured:.2f} | "
                     f"{measured * factor:.1f} | {measured * factor * TARGET['blocks'] / 60:.1f} |")
    lines += ["", f"{record['method']} on {record['device']}: {total:.1f} s/block × {TARGET['blocks']} = "
              f"{total * TARGET['blocks'] / 60:.0f} min (goal: under 60 min)."]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="smollm2,deep,70b-l2,70b-l4")
    p.add_argument("--method", default="svd-llm", help="one method, or several separated by commas")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--offload", default="disk", choices=["none", "cpu", "disk"], help="for smollm2 and deep")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows (smollm2, deep)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--big-nsamples", type=int, default=16, help="calibration windows (70B-shaped)")
    p.add_argument("--big-seqlen", type=int, default=256)
    p.add_argument("--big-batch-size", type=int, default=4, help="windows per batch (70B-shaped)")
    p.add_argument("--big-offload", default="disk", choices=["none", "cpu", "disk"], help="70B-shaped streams")
    p.add_argument("--big-overrides", type=json.loads, default={},
                   help='config overrides for the 70B-shaped checkpoint, as JSON: {"vocab_size": 4096} (the embedding '
                        "and head take no part in the block stages), or toy sizes for a dry run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--solve-dtype", default=None, help="default float64 on CPU, float32 on GPU")
    p.add_argument("--big-solve-dtype", default="float32", help="70B-shaped: float64 metrics of 28672² do not fit 24 GiB")
    p.add_argument("--work-dir", default=None, help="checkpoints and spilled streams (default: a temporary directory)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--plan-only", action="store_true", help="planned peaks only")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        with open(args.record, "w") as f:
            json.dump(run_one(args), f)
        return 0

    import lowrank_engine  # noqa: F401  (the OpenMP wait before torch)

    owned = None
    if args.work_dir is None:
        args.work_dir = owned = tempfile.mkdtemp(prefix="lowrank-scale-")
    records = []
    previous = os.path.join(args.out_dir, "scale.json")
    kept = []
    if os.path.exists(previous):
        with open(previous) as f:
            kept = json.load(f)

    def row_key(r):
        return r["model"], r["method"], r["device"]

    def write(records):
        # configurations not run this time keep their earlier measured rows
        ran = {row_key(r) for r in records}
        rows = sorted([r for r in kept if row_key(r) not in ran] + records,
                      key=lambda r: (ORDER.index(r["model"]) if r["model"] in ORDER else 99, on_gpu(r)))
        render(rows, args)
        return rows

    try:
        for name in filter(None, args.configs.split(",")):  # --configs "": re-render the table from scale.json
            for method in args.method.split(","):
                spec = prepare(name, argparse.Namespace(**{**vars(args), "method": method}))
                print(f"[scale] {name} {method} ...", flush=True)
                start = time.time()
                with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
                    cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec), "--record", out.name]
                    subprocess.run(cmd + (["--quiet"] if args.quiet else []), check=True)
                    record = json.load(open(out.name))
                record["wall_seconds"] = round(time.time() - start, 1)
                records.append(record)
                write(records)  # after every run: a run stopped from outside keeps what it measured
    finally:
        if owned:
            import shutil

            shutil.rmtree(owned, ignore_errors=True)
    write(records)
    return 0


def render(records: list, args) -> None:
    """scale.md and scale.json in --out-dir from these rows."""
    from lowrank_engine.report import format_table, write_json

    columns = ("model", "blocks", "hidden", "method", "calibration", "offload", "compute_dtype", "block_mb", "planned_cpu_mb",
               "peak_rss_mb", "planned_gpu_mb", "peak_gpu_mb", "compress_seconds", *(f"{s}_s_per_block" for s in STAGES))
    print("\n" + format_table(records, columns))
    md = ["# Scale: peak memory vs depth and width", "",
          "Blocks streamed from safetensors, factors written per block. "
          "planned_*: the engine's memory plan (printed before a run); peak_*: measured (VmHWM, "
          "torch.cuda.max_memory_allocated).", "", format_table(records, columns, markdown=True), ""]
    by_model = {r["model"]: r for r in records}
    if "70b-l2" in by_model and "70b-l4" in by_model and by_model["70b-l2"].get("peak_rss_mb"):
        a, b = by_model["70b-l2"]["peak_rss_mb"], by_model["70b-l4"]["peak_rss_mb"]
        md.append(f"Peak RSS L=2 → L=4: {a:,.0f} → {b:,.0f} MB ({(b / a - 1):+.1%}).")
        md.append("")
    measured_on_gpu = [r for r in records if on_gpu(r) and r["model"].startswith("70b") and r.get("compress_seconds")]
    if measured_on_gpu:
        md += ["## LLaMA-70B on one GPU, from measured rates", ""]
        for record in measured_on_gpu:
            md += extrapolate_measured(record) + [""]
    else:
        md += ["## LLaMA-70B on one GPU: not measured", "",
               "Nothing has run on a GPU yet (benchmarks/device_suite.py's block step will measure it). The "
               "extrapolation below converts a CPU run by assumed GPU rates.", ""]
        for name in EXTRAPOLATED_FROM_CPU:
            if by_model.get(name, {}).get("compress_seconds") and not on_gpu(by_model[name]):
                md += extrapolate(by_model[name]) + [""]
                break
    text = "\n".join(md)
    print("\n" + text)
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(records, os.path.join(args.out_dir, "scale.json"))
    with open(os.path.join(args.out_dir, "scale.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
