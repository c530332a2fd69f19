"""Zero-shot accuracy of dense SmolLM2 and compressed checkpoints, scored by lm-eval (issue 21).

Compression follows the DESIGN §4 protocol of quality.py ("smollm2-cpu-v1": SmolLM2-135M-Instruct fp32,
C4 64×512 calibration windows, seed 0), each configuration in its own process through the quality
benchmark's row job (quality.row_spec, run by job.run_job) and saved as a checkpoint, which
`lowrank_engine.zeroshot` scores (lm-eval's HF wrapper on the stock task definitions, data from
$LOWRANK_ENGINE_DATA/zeroshot). Checkpoints and scores are cached in --work-dir, so an interrupted run
resumes; `--phase compress` and `--phase score` can run side by side (scoring waits for each checkpoint).
`quality.py --keep-checkpoints <work-dir>/checkpoints` leaves the checkpoints of its rows there, so one
compression gives both a perplexity row and a zero-shot row.

    python benchmarks/zeroshot.py --limit 100          # the first 100 documents of each task
    python benchmarks/zeroshot.py                      # every document (hours on a small CPU)

Writes zeroshot.md and zeroshot.json to --out-dir: one record per model and task.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # quality.py holds the protocol's definitions
import quality  # noqa: E402

PROTOCOL = quality.PROTOCOL

DEFAULT_METHODS = "dense,svd-llm,aa-svd,best"
DEFAULT_RATIOS = "0.2,0.4"
TASKS = "arc_easy,arc_challenge,piqa,openbookqa,lambada_openai"


def configs(args) -> list[tuple[str, float]]:
    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(r) for r in args.ratios.split(",") if r]
    return [(m, 0.0) for m in methods if m == "dense"] + [(m, r) for m in methods if m != "dense" for r in ratios]


def checkpoint_dir(args, method: str, ratio: float) -> str:
    return quality.kept_checkpoint(os.path.join(args.work_dir, "checkpoints"), method, ratio)


def compression_job(args):
    """The quality benchmark's row job for --method at --ratio (quality.row_job), saved where this script
    scores it; no perplexity and no error report (not needed here)."""
    protocol = quality.build_parser().parse_args([
        "--model", args.model, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
        "--keep-checkpoints", os.path.join(args.work_dir, "checkpoints"), "--quiet"])
    return dataclasses.replace(quality.row_job(protocol, args.method, args.ratio), eval_sets=(), track_error=False)


def compress_one(args) -> None:
    """Child process: one configuration compressed and saved by job.run_job, as the quality table runs it."""
    from lowrank_engine import job

    job.run_job(compression_job(args))


def wanted_settings(args, method: str, ratio: float) -> dict:
    """What decides the model `method` at `ratio` resolves to now (job.settings without evaluation)."""
    from lowrank_engine import job

    spec = compression_job(argparse.Namespace(**{**vars(args), "method": method, "ratio": ratio}))
    return job.settings(spec, evaluation=False)


def check_current(args, method: str, ratio: float, wanted: dict) -> None:
    """Refuse a cached checkpoint (made here, or by quality.py --keep-checkpoints) whose job is not `wanted`,
    the one this label resolves to now: its scores would be another model's."""
    from lowrank_engine import job

    out = checkpoint_dir(args, method, ratio)
    with open(os.path.join(out, "results.json")) as f:
        stored = json.load(f)[0].get("settings", {})
    changed = job.changed_settings(stored, wanted)
    if changed:
        raise SystemExit(f"zeroshot: {out} was compressed with other settings than {method} at {ratio} resolves to "
                         f"now ({', '.join(changed)}); remove it, or name it by a label that sets them")


def run_compressions(args) -> None:
    for method, ratio in configs(args):
        out = checkpoint_dir(args, method, ratio)
        if method == "dense":
            continue
        if os.path.exists(out):  # done here, or by quality.py --keep-checkpoints
            check_current(args, method, ratio, wanted_settings(args, method, ratio))
            continue
        print(f"compressing {method} {ratio}", flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--compress-one", "--method", method,
                        "--ratio", str(ratio), "--model", args.model, "--work-dir", args.work_dir,
                        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed)],
                       check=True)


def score_file(args, method: str, ratio: float) -> str:
    return os.path.join(args.work_dir, "scores", f"{method}_{ratio}_limit{args.limit or 'all'}.json")


def score_one(args, method: str, ratio: float) -> list[dict]:
    import lm_eval
    import torch

    from lowrank_engine import checkpoint, models, report, zeroshot

    if method == "dense":
        model, tokenizer = models.load_model(args.model)
    else:
        from transformers import AutoTokenizer

        model, _ = checkpoint.load(checkpoint_dir(args, method, ratio))
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir(args, method, ratio))
    start = time.perf_counter()
    scores = zeroshot.evaluate(model, tokenizer, args.tasks.split(","), limit=args.limit, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    return [{"method": method, "ratio": ratio, "task": task, **row, "limit": args.limit, "protocol": PROTOCOL,
             "lm_eval": lm_eval.__version__, "cpu": report.cpu_model(), "threads": torch.get_num_threads(),
             "score_seconds": round(seconds, 1)} for task, row in scores.items()]


def run_scoring(args) -> None:
    os.makedirs(os.path.join(args.work_dir, "scores"), exist_ok=True)
    for method, ratio in configs(args):
        path = score_file(args, method, ratio)
        wanted = None if method == "dense" else wanted_settings(args, method, ratio)
        if os.path.exists(path):
            with open(path) as f:
                if json.load(f)[0].get("settings") == wanted:  # dense: none stored, none wanted
                    continue
        while method != "dense" and not os.path.exists(os.path.join(checkpoint_dir(args, method, ratio),
                                                                       "results.json")):
            time.sleep(30)  # `--phase compress` is still making it
        if method != "dense":
            check_current(args, method, ratio, wanted)
        print(f"scoring {method} {ratio}", flush=True)
        records = score_one(args, method, ratio)
        if method != "dense":
            for record in records:
                record["settings"] = wanted
        with open(path, "w") as f:
            json.dump(records, f, indent=1)


def full_sizes(tasks: str) -> str:
    """'; every document: arc_easy 2376, ...' from the local files, or '' without them."""
    from lowrank_engine import data, zeroshot

    if not data.data_dir():
        return ""
    sizes = [f"{t} {len(zeroshot.read_local_docs(t, data.data_dir()))}" for t in tasks.split(",")]
    return "; every document would be " + ", ".join(sizes)


def write_table(args) -> None:
    from lowrank_engine.report import format_table

    records, missing = [], []
    for method, ratio in configs(args):
        path = score_file(args, method, ratio)
        if os.path.exists(path):
            with open(path) as f:
                records.extend(json.load(f))
        else:
            missing.append(f"{method} {ratio}")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "zeroshot.json"), "w") as f:
        json.dump(records, f, indent=1)
    limit = f"the first {args.limit} documents of each task" if args.limit else "every document"
    cpus = sorted({r["cpu"] for r in records}) or ["?"]
    cpu = cpus[0] if len(cpus) == 1 else " and ".join(cpus) + " (each record in zeroshot.json names its own)"
    head = (f"# Zero-shot accuracy\n\nlm-eval {records[0]['lm_eval'] if records else '?'} (HF wrapper on the "
            f"in-memory model, stock task definitions, data from $LOWRANK_ENGINE_DATA/zeroshot), 0-shot, "
            f"{limit}. Compression on the DESIGN §4 protocol ({PROTOCOL}: SmolLM2-135M-Instruct fp32, C4 "
            f"{args.nsamples}×{args.seqlen} calibration, seed {args.seed}; uniform ranks except `best`'s "
            f"{quality._BEST_RANKS} allocation, and @field=value labels change that field). CPU: {cpu}. "
            f"`acc_norm` is `-` where the task defines none.\n\n"
            + (f"Not scored yet: {', '.join(missing)}.\n\n" if missing else ""))
    seconds = sorted({r["score_seconds"] for r in records if r.get("score_seconds") is not None})
    threads = " or ".join(str(t) for t in sorted({r["threads"] for r in records if r.get("threads")})) or "?"
    if args.limit and seconds:
        head += (f"Why the limit: scoring one model took {seconds[0]:.0f}–{seconds[-1]:.0f} s at {args.limit} "
                 f"documents per task on {'this CPU' if len(cpus) == 1 else 'these CPUs'} ({threads} thread(s), shared with other jobs)"
                 f"{full_sizes(args.tasks)}.\n\n")
    averages = average_accuracy(records, args.tasks.split(","))
    summary = ("\n## Average over the tasks\n\nmean_acc: the mean of `acc` over "
               f"{', '.join(args.tasks.split(','))}; of_dense: mean_acc / dense's mean_acc.\n\n")
    columns = ("method", "ratio", "task", "acc", "acc_norm", "n")
    with open(os.path.join(args.out_dir, "zeroshot.md"), "w") as f:
        f.write(head + format_table(records, columns, markdown=True) + "\n")
        if averages:
            f.write(summary + format_table(averages, AVERAGE_COLUMNS, markdown=True) + "\n")
    print(head + format_table(records, columns))
    if averages:
        print(summary + format_table(averages, AVERAGE_COLUMNS))


AVERAGE_COLUMNS = ("method", "ratio", "mean_acc", "of_dense")


def average_accuracy(records: list, tasks: list) -> list:
    """One row per model scored on every task: its mean `acc`, and that mean over dense's (when scored)."""
    by_model = {}
    for r in records:
        by_model.setdefault((r["method"], r["ratio"]), {})[r["task"]] = r["acc"]
    rows = [{"method": m, "ratio": ratio, "mean_acc": sum(acc[t] for t in tasks) / len(tasks)}
            for (m, ratio), acc in by_model.items() if all(t in acc for t in tasks)]
    dense = next((r["mean_acc"] for r in rows if r["method"] == "dense"), None)
    for r in rows:
        r["of_dense"] = r["mean_acc"] / dense if dense else None
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="all", choices=["all", "compress", "score", "table"])
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--ratios", default=DEFAULT_RATIOS)
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=None, help="documents per task (lm-eval's --limit: the first N)")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval requests per forward")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="zeroshot-runs", help="checkpoints and cached scores")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--compress-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.compress_one:
        return compress_one(args)
    if args.phase in ("all", "compress"):
        run_compressions(args)
    if args.phase in ("all", "score"):
        run_scoring(args)
    if args.phase in ("all", "score", "table"):
        write_table(args)


if __name__ == "__main__":
    main()
