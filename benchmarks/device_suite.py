"""Every check that needs a GPU, in one command that fits a short loan of one.

    python3 benchmarks/device_suite.py                    # on the GPU machine: results under $OUT
    python3 benchmarks/device_suite.py --steps tests,block  # rerun a subset on the still-warm machine
    python benchmarks/device_suite.py --dry-run           # the same steps at toy sizes on the CPU (CI runs it)

It runs from a fresh copy of the working tree (no install: the children import the tree through
PYTHONPATH, and the build step compiles the extension in place) with TRITON_INTERPRET=0, since
tests/conftest.py defaults it to 1. Steps, each a child process with its own time cap, a failing one
not stopping the others and its error kept:

  build       the C++/CUDA extension (setup.py build_ext --inplace), then which whitening path loaded.
              It runs beside `kernels`, which needs no extension: compiling is CPU work.
  kernels     kernel_bench.py in full mode (the roofline at the device's peak bandwidth), within its cap.
  tests       pytest -m gpu: kernels, ops and whitening on CUDA tensors against float64 references,
              every autotune config, the pipeline on a tiny model on CUDA (LOWRANK_ENGINE_REQUIRE_EXT=1);
              in 8 processes when pytest-xdist imports (--test-workers), since Triton compiles hundreds of
              kernel variants on the CPU, and with Triton's cache in build/ for a rerun on the same machine.
  whitening   whitening.py's CUDA grid, as far as its cap goes.
  block       one LLaMA-70B-shaped bf16 block (scale.py 70b-l1) compressed with svd-llm and aa-svd at 0.4,
              --block-windows × 2048 calibration tokens: seconds per stage, peak GPU memory, and the
              80-block extrapolation from these measured rates.
  serving     the serving benchmark, when vLLM is importable.

Results (at most 8 files, the device named in each): device_suite.{md,json} (every step's status,
seconds, cap and error tail, the test outcomes, the versions), kernels.{md,json}, whitening.{md,json}
and scale.{md,json}; whitening and scale start from the committed benchmarks/results/ files, so all
six can be committed there as they come back. The GPU paths count as verified when every GPU test
passed and every kernel configuration matched its reference: then flip ops.GPU_PATHS_VERIFIED in
the same change that commits these files.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
STEPS = ("build", "kernels", "tests", "whitening", "block", "serving")
# Seconds per step on the GPU: build and kernels run side by side, the others one after another, so the
# suite ends within SUITE_BUDGET_S (6 minutes) even when every step runs to its cap.
CAPS = {"build": 120, "kernels": 120, "tests": 90, "whitening": 30, "block": 110, "serving": 10}
SUITE_BUDGET_S = 360
DRY_RUN_CAP_S = 120  # any one step of the dry run
BENCH_MARGIN_S = 20  # a benchmark's own budget ends this long before its cap: the part in flight finishes
TEST_FILES = ("tests/test_kernels.py", "tests/test_ops.py", "tests/test_whitening.py", "tests/test_pipeline.py")
# On the CPU the `gpu` tests run under the interpreter; the dry run keeps the CUDA ones (skipped there)
# and the every-config check, to prove the selection collects and runs.
DRY_RUN_TEST_FILTER = "cuda or every_autotune_config"
TARGET_SEQLEN = 2048  # the calibration window of the 70B target (scale.TARGET: 256 × 2048 tokens)
BLOCK_METHODS = "svd-llm,aa-svd"
BLOCK_RATIO = 0.4
# The block step's checkpoint: LLaMA-70B's block shapes with a small vocabulary (the embedding and the
# head take no part in the block stages); the dry run shrinks the block itself too.
BLOCK_OVERRIDES = {"vocab_size": 4096}
DRY_RUN_BLOCK_OVERRIDES = {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "vocab_size": 128}
SERVING_SCRIPT = os.path.join(HERE, "serving.py")  # its md/json would take the results past 8 files: merge them
ERROR_TAIL_CHARS = 4000
LOG_TAIL_CHARS = 12000
# pytest -v lines: "NODEID OUTCOME ...", or with pytest-xdist "[gw3] [ 40%] OUTCOME NODEID"
OUTCOME = re.compile(r"^(\S+::\S+?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
OUTCOME_XDIST = re.compile(r"^\[gw\d+\]\s+\[\s*\d+%\]\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+::\S+)")
# Test processes on a GPU machine when pytest-xdist is there: Triton compiles each kernel variant on the
# CPU, one at a time per process, and the GPU tests need a few hundred of them.
TEST_WORKERS = 8


# --------------------------------------------------------------------------------------
# child processes
# --------------------------------------------------------------------------------------
class Child:
    """One command of a step, in its own process group (a cap kills its children too), output to a log."""

    def __init__(self, argv, env, log_path, deadline):
        self.argv, self.deadline, self.log_path = argv, deadline, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.timed_out = False

    def poll(self):
        """The return code once ended (stopped at the deadline if need be), else None."""
        rc = self.proc.poll()
        if rc is None and time.perf_counter() > self.deadline:
            self.timed_out = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # ended just now
                pass
            rc = self.proc.wait()
        if rc is not None and not self.log.closed:
            self.log.close()
        return rc

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def run_children(commands, env, log_path, cap_s):
    """Run the commands one after another within cap_s; returns (rc, timed_out, output)."""
    deadline = time.perf_counter() + cap_s
    outputs, rc, timed_out = [], 0, False
    for i, argv in enumerate(commands):
        child = Child(argv, env, f"{log_path}.{i}", deadline)
        while (rc := child.poll()) is None:
            time.sleep(0.2)
        outputs.append(f"$ {' '.join(argv)}\n{child.output()}")
        timed_out = child.timed_out
        if rc != 0:
            break
    return rc, timed_out, "\n".join(outputs)


# --------------------------------------------------------------------------------------
# the steps: each returns its commands and environment, and reads its details from the output
# --------------------------------------------------------------------------------------
def python():
    return sys.executable


EXTENSION_CHECK = [python(), "-c", "import json; from lowrank_engine import ops; "
                                  "print('EXTENSION ' + json.dumps(ops.extension_info()))"]


def build_commands(ctx):
    if ctx.dry_run:  # setup.py runs and says what it would build; compiling is left to `make test`
        return [[python(), "setup.py", "--version"], EXTENSION_CHECK]
    return [[python(), "setup.py", "build_ext", "--inplace"], EXTENSION_CHECK]


def extension_found(output):
    found = re.findall(r"^EXTENSION (\{.*\})$", output, flags=re.M)
    return json.loads(found[-1]) if found else None


def build_details(output):
    plan = re.findall(r"^lowrank-engine: (building \S+ \(.*)$", output, flags=re.M)
    details = {"extension": extension_found(output), "plan": plan[-1] if plan else None}
    failure = re.findall(r"^lowrank-engine: (building \S+ failed .*|extension build failed .*)$", output, flags=re.M)
    if failure:  # setup.py logs the failure and goes on; the compiler's own error lines come much earlier
        compiler = [line for line in output.splitlines()
                    if re.search(r"\berror\b", line, flags=re.I) and not line.startswith("lowrank-engine:")]
        details["build_error"] = "\n".join([failure[-1]] + compiler[:40])[-ERROR_TAIL_CHARS:]
    return details


def kernels_commands(ctx):
    argv = [python(), "benchmarks/kernel_bench.py", "--out-dir", ctx.out]
    if not ctx.dry_run:
        argv += ["--budget-s", str(max(1, ctx.cap("kernels") - BENCH_MARGIN_S))]
    if ctx.peak_gbps:
        argv += ["--peak-gbps", str(ctx.peak_gbps)]
    return [argv]


def kernels_details(ctx):
    rows = read_json(ctx.out, "kernels.json")
    done = [r for r in rows if not r.get("skipped")]
    errors = [r.get("max_rel_err", math.nan) for r in done if r["bench"] != "e2e_decode"]
    worst = math.nan if any(e != e for e in errors) else max(errors, default=None)  # a NaN error is the worst
    return {"measured": len(done), "skipped": len(rows) - len(done), "worst_rel_err": worst}


def tests_commands(ctx):
    argv = [python(), "-m", "pytest", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider", *TEST_FILES]
    if ctx.dry_run:
        argv += ["-k", DRY_RUN_TEST_FILTER]
    if ctx.test_workers > 1:
        argv += ["-n", str(ctx.test_workers)]
    return [argv]


def tests_details(output):
    outcomes = {}
    for line in output.splitlines():
        if m := OUTCOME.match(line.strip()):
            outcomes[m.group(1)] = m.group(2)
        elif m := OUTCOME_XDIST.match(line.strip()):
            outcomes[m.group(2)] = m.group(1)
    counts = {}
    for outcome in outcomes.values():
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    bad = sorted(name for name, outcome in outcomes.items() if outcome in ("FAILED", "ERROR"))
    return {"counts": counts, "failed": bad, "skipped": sorted(n for n, o in outcomes.items() if o == "SKIPPED")}


def whitening_commands(ctx):
    seed_from_results(ctx, "whitening.json")
    if ctx.dry_run:
        return [[python(), "benchmarks/whitening.py", "--device", "cpu", "--quick", "--budget-s", "5",
                 "--out-dir", ctx.out]]
    return [[python(), "benchmarks/whitening.py", "--device", "cuda", "--budget-s",
             str(max(1, ctx.cap("whitening") - 10)), "--out-dir", ctx.out]]


def whitening_details(ctx):
    device = "cpu" if ctx.dry_run else "cuda"
    rows = [r for r in read_json(ctx.out, "whitening.json") if r.get("device") == device]
    done = [r for r in rows if not r.get("skipped")]
    return {"measured": len(done), "skipped": len(rows) - len(done),
            "largest_n": max((r["n"] for r in done), default=None),
            "all_finite": all(r["op_finite"] for r in done)}


def block_commands(ctx):
    seed_from_results(ctx, "scale.json")
    windows, seqlen = (4, 32) if ctx.dry_run else (ctx.block_windows, TARGET_SEQLEN)
    return [[python(), "benchmarks/scale.py", "--configs", "70b-l1", "--device", "cpu" if ctx.dry_run else "cuda",
             "--method", BLOCK_METHODS, "--ratio", str(BLOCK_RATIO), "--big-nsamples", str(windows),
             "--big-seqlen", str(seqlen), "--big-batch-size", "8", "--big-offload", "none",
             "--big-overrides", json.dumps(DRY_RUN_BLOCK_OVERRIDES if ctx.dry_run else BLOCK_OVERRIDES),
             "--quiet", "--out-dir", ctx.out]]


def block_details(ctx):
    rows = [r for r in read_json(ctx.out, "scale.json") if r.get("model") == "70b-l1" and r.get("device") == ctx.device_name]
    keep = ("method", "calibration", "ops_backend", "peak_gpu_mb", "compress_seconds",
            "load_s_per_block", "statistics_s_per_block", "whitening_s_per_block", "solve_s_per_block",
            "propagate_s_per_block", "write_s_per_block")
    return {"records": [{k: r.get(k) for k in keep} for r in rows]}


def read_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def serving_commands(ctx):
    if importlib.util.find_spec("vllm") is None:
        return "skipped: vllm not importable"
    if not os.path.exists(SERVING_SCRIPT):
        return f"skipped: vllm is importable but there is no {os.path.relpath(SERVING_SCRIPT, ROOT)}"
    return [[python(), SERVING_SCRIPT, "--out-dir", ctx.out]]


def seed_from_results(ctx, name):
    """Start from the committed file, so the benchmark keeps its other devices' rows beside the new ones."""
    if not os.path.exists(os.path.join(ctx.out, name)) and os.path.exists(os.path.join(RESULTS, name)):
        shutil.copy(os.path.join(RESULTS, name), os.path.join(ctx.out, name))


DETAILS = {"kernels": kernels_details, "whitening": whitening_details, "block": block_details}
COMMANDS = {"build": build_commands, "kernels": kernels_commands, "tests": tests_commands,
            "whitening": whitening_commands, "block": block_commands, "serving": serving_commands}


# --------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------
class Context:
    def __init__(self, args, device_name, gpu):
        self.dry_run, self.out, self.device_name, self.gpu = args.dry_run, args.out, device_name, gpu
        self.peak_gbps, self.block_windows = args.peak_gbps, args.block_windows
        xdist = importlib.util.find_spec("xdist") is not None
        self.test_workers = args.test_workers if args.test_workers is not None else (
            TEST_WORKERS if xdist and not args.dry_run else 0)
        self.caps = dict(CAPS, **args.cap) if not args.dry_run else {s: args.cap.get(s, DRY_RUN_CAP_S) for s in STEPS}
        self.extension = None  # what the build step found

    def cap(self, step):
        return self.caps[step]

    def env(self, step):
        env = dict(os.environ)
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OUT=self.out,
                   TRITON_INTERPRET="1" if self.dry_run else "0")
        if self.gpu:  # compiled kernels kept in the tree's ignored build/ folder, for a rerun on the same machine
            env.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, "build", "triton-cache"))
        if step == "build" and self.gpu and "TORCH_CUDA_ARCH_LIST" not in env:
            import torch

            env["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())  # this GPU only
        if step == "kernels":  # needs no extension, and must not map a _C.so that the build beside it rewrites
            env["LOWRANK_ENGINE_NO_EXT"] = "1"
        if step == "tests" and not self.dry_run:
            # a missing extension fails its tests rather than skipping them; the kernels compile for real
            # here, so the ahead-of-time compile check has nothing to add
            env.update(LOWRANK_ENGINE_REQUIRE_EXT="1", LOWRANK_ENGINE_SKIP_AOT="1")
        if step == "block":
            # the opt-in GPU paths when the extension has its CUDA kernels, else the default ones
            env.setdefault("LOWRANK_ENGINE_BACKEND", "accelerated" if self.gpu and self.extension_has_cuda(env) else "auto")
        return env

    def extension_has_cuda(self, env) -> bool:
        if self.extension is None:  # no build step this time: ask the tree as it is
            done = subprocess.run(EXTENSION_CHECK, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            self.extension = extension_found(done.stdout) or {}
        return bool(self.extension.get("cuda"))


def run_step(ctx, step, logs_dir, suite_deadline):
    left = suite_deadline - time.perf_counter()
    ctx.caps[step] = cap = min(ctx.cap(step), left)  # the benchmarks size their own budgets from it
    record = {"step": step, "cap_s": round(cap)}
    commands = COMMANDS[step](ctx)
    if isinstance(commands, str):
        record.update(status=commands, seconds=0.0)
        return record
    if cap < 5:
        record.update(status="not started: the suite's time budget is spent", seconds=0.0)
        return record
    start = time.perf_counter()
    rc, timed_out, output = run_children(commands, ctx.env(step), os.path.join(logs_dir, step), cap)
    record.update(seconds=round(time.perf_counter() - start, 1), returncode=rc,
                  commands=[" ".join(c) for c in commands], log_tail=output[-LOG_TAIL_CHARS:])
    if timed_out:
        record["status"] = f"timed out after {cap:.0f} s"
    else:
        record["status"] = "passed" if rc == 0 else "failed"
    if timed_out or rc != 0:
        record["error_tail"] = output[-ERROR_TAIL_CHARS:]
    if step == "build":
        record.update(build_details(output))
        ctx.extension = record.get("extension")
        if record["status"] == "passed" and ctx.gpu and not (ctx.extension or {}).get("cuda"):
            record["status"] = "failed"  # no CUDA kernels in the extension: the GPU whitening is missing
            record.setdefault("error_tail", record.get("build_error") or output[-ERROR_TAIL_CHARS:])
    if step == "tests":
        record.update(tests_details(output))
        if record["status"] == "passed" and not record["counts"].get("passed"):
            record["status"] = "failed"  # nothing ran
    if step in DETAILS:
        record.update(DETAILS[step](ctx))
    return record


def run_phase(ctx, steps, logs_dir, suite_deadline):
    """Steps side by side (threads only wait on child processes)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(steps)) as pool:
        futures = [pool.submit(run_step, ctx, s, logs_dir, suite_deadline) for s in steps]
        return [f.result() for f in futures]


def versions():
    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "triton", "transformers", "accelerate", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    for name, argv in (("nvcc", ["nvcc", "--version"]),
                       ("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])):
        try:
            text = subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
            out[name] = text.splitlines()[-1] if text else None
        except (OSError, subprocess.TimeoutExpired):
            out[name] = None
    return out


def verdict(records):
    """Whether the GPU paths count as verified, and why not."""
    by = {r["step"]: r for r in records}
    why = []
    tests, kernels = by.get("tests"), by.get("kernels")
    if tests is None or tests["status"] != "passed":
        why.append("the GPU tests did not all pass" if tests else "the GPU tests did not run")
    if kernels is None or kernels["status"] != "passed":
        why.append("the kernel benchmark did not finish with every configuration within tolerance"
                   if kernels else "the kernel benchmark did not run")
    elif kernels.get("skipped"):
        why.append(f"the kernel benchmark left {kernels['skipped']} configurations unmeasured")
    return not why, why


def to_markdown(summary) -> str:
    lines = [f"# Device suite: {summary['device']}", "",
             f"{summary['date']}; {'dry run on the CPU at toy sizes' if summary['dry_run'] else 'GPU run'}; "
             + ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v) + ".",
             f"Wall time {summary['wall_s']:.0f} s (budget {summary['budget_s']} s); steps: {', '.join(summary['steps'])}.", ""]
    if summary["dry_run"]:
        lines += ["A dry run proves the script and its steps work; it says nothing about a GPU.", ""]
    elif summary["gpu_paths_verified"]:
        lines += ["**GPU paths verified**: every GPU test passed and every kernel configuration matched its reference. "
                  "Flip `ops.GPU_PATHS_VERIFIED` in the change that commits these files.", ""]
    else:
        lines += ["**GPU paths not verified**: " + "; ".join(summary["not_verified_because"]) + ". "
                  "`ops.GPU_PATHS_VERIFIED` stays False.", ""]
    lines += status_table(summary)
    for r in summary["records"]:
        if r.get("failed"):
            lines += ["", f"Failed tests ({len(r['failed'])}):", ""] + [f"- `{name}`" for name in r["failed"][:60]]
    for r in summary["records"]:
        if r.get("error_tail"):
            lines += ["", f"## {r['step']}: {r['status']}", "", "```", r["error_tail"].strip()[-ERROR_TAIL_CHARS:], "```"]
    return "\n".join(lines) + "\n"


def status_table(summary) -> list:
    lines = ["| step | status | seconds | cap | detail |", "|---|---|---|---|---|"]
    for r in summary["records"]:
        detail = ""
        if r["step"] == "build" and r.get("extension") is not None:
            ext = r["extension"]
            detail = f"extension {'loaded' if ext['loaded'] else 'not loaded'}, CUDA kernels: {'yes' if ext['cuda'] else 'no'}"
        elif r["step"] == "tests" and "counts" in r:
            detail = ", ".join(f"{v} {k}" for k, v in sorted(r["counts"].items()))
        elif r["step"] == "kernels" and "measured" in r:
            worst = r["worst_rel_err"]
            detail = (f"{r['measured']} measured, {r['skipped']} skipped by the budget"
                      + (f", worst rel err {worst:.1e}" if worst is not None else ""))
        elif r["step"] == "whitening" and "measured" in r:
            detail = (f"{r['measured']} measured (largest n {r['largest_n']}), {r['skipped']} skipped by the budget, "
                      f"outputs finite: {'yes' if r['all_finite'] else 'NO'}")
        elif r["step"] == "block" and r.get("records"):
            detail = "; ".join(f"{b['method']} ({b['calibration']}): {b['compress_seconds']} s"
                               + (f", peak GPU {b['peak_gpu_mb'] / 1024:.1f} GiB" if b["peak_gpu_mb"] else "")
                               for b in r["records"])
        lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', 0):.1f} | {r['cap_s']:.0f} | {detail} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--dry-run", action="store_true", help="the same steps at toy sizes on the CPU")
    p.add_argument("--out", default=None, help="results folder (default: $OUT, else ./device-suite-out)")
    p.add_argument("--peak-gbps", type=float, default=None, help="override kernel_bench's bandwidth table")
    p.add_argument("--block-windows", type=int, default=64,
                   help=f"calibration windows of {TARGET_SEQLEN} tokens for the block step (the target is 256)")
    p.add_argument("--cap", type=lambda s: {k: float(v) for k, v in (kv.split("=") for kv in s.split(","))},
                   default={}, help="per-step caps in seconds, e.g. tests=120,block=150")
    p.add_argument("--budget-s", type=float, default=SUITE_BUDGET_S, help="the whole suite's wall time")
    p.add_argument("--test-workers", type=int, default=None,
                   help=f"pytest-xdist processes for the tests (default {TEST_WORKERS} on a GPU when xdist imports, "
                        "else none; 0 turns them off)")
    args = p.parse_args(argv)
    steps = [s for s in STEPS if s in args.steps.split(",")]
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; choose from {STEPS}")
    args.out = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join(ROOT, "device-suite-out"))
    os.makedirs(args.out, exist_ok=True)

    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        p.error("no CUDA device here: use --dry-run on a CPU")
    sys.path.insert(0, ROOT)
    from lowrank_engine import report

    device_name = report.device_name("cuda" if gpu else "cpu")
    ctx = Context(args, device_name, gpu)
    start = time.perf_counter()
    suite_deadline = start + args.budget_s
    print(f"[device suite] {device_name}; steps {','.join(steps)}; results in {args.out}", flush=True)
    records = []
    with tempfile.TemporaryDirectory(prefix="device-suite-logs-") as logs_dir:
        # build and kernels side by side (compiling is CPU work; the kernels need no extension), then the rest
        phases = [[s for s in steps if s in ("build", "kernels")]] + [[s] for s in steps if s not in ("build", "kernels")]
        for phase in filter(None, phases):
            for record in run_phase(ctx, phase, logs_dir, suite_deadline):
                records.append(record)
                print(f"[device suite] {record['step']}: {record['status']} ({record.get('seconds', 0):.0f} s)", flush=True)
    records.sort(key=lambda r: STEPS.index(r["step"]))
    verified, why = verdict(records) if not args.dry_run else (False, ["dry run"])
    summary = {"device": device_name, "dry_run": args.dry_run,
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "versions": versions(), "steps": steps, "budget_s": args.budget_s,
               "wall_s": round(time.perf_counter() - start, 1), "gpu_paths_verified": verified,
               "not_verified_because": why, "records": records}
    with open(os.path.join(args.out, "device_suite.json"), "w") as f:
        json.dump(summary, f, indent=1)
    md = to_markdown(summary)
    with open(os.path.join(args.out, "device_suite.md"), "w") as f:
        f.write(md)
    print(md)
    # last, so that a caller reading only the end of the output sees every step
    print("\n".join([f"[device suite] {device_name}: wall {summary['wall_s']:.0f} s; GPU paths verified: "
                     f"{'yes' if verified else 'no'}"] + status_table(summary)))
    return 0 if all(r["status"] == "passed" or r["status"].startswith("skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
