"""The architecture matrix, measured: for every supported model type (a tiny random float32 config with
its distinguishing feature switched on, lowrank_engine/architectures.py) the largest divergence of the
engine's streamed dense stream from transformers' own forward, the largest mismatch between the block
errors the engine reports (svd-llm at 0.4) and those of the saved checkpoint run through transformers,
the methods that compress it, and whether save → load is bit-identical.

    python benchmarks/architectures.py                 # every model type
    python benchmarks/architectures.py --only gemma2   # some of them

Writes benchmarks/results/architectures.{md,json}. tests/test_architectures.py asserts the same
measurements (stream ≤ 1e-5 relative, mismatch ≤ 1e-4 relative, every method, bit-identical round trip).
"""
from __future__ import annotations

import argparse
import os
import time

from lowrank_engine import architectures, report  # first: it sets the OpenMP wait before torch loads OpenMP

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ("model_type", "blocks", "sliding_window", "max_stream_rel_err", "max_stream_rel_err_block_0_arguments",
           "max_block_error_mismatch", "methods_ok", "roundtrip_ok", "seconds")
STREAM_TOLERANCE, MISMATCH_TOLERANCE = 1e-5, 1e-4  # what tests/test_architectures.py asserts


def _cell(record: dict, column: str) -> str:
    value = record[column]
    if column == "methods_ok":
        failed = record["methods_failed"]
        return f"{len(value)}/{len(value) + len(failed)}" + (f" (failed: {', '.join(failed)})" if failed else "")
    if isinstance(value, float) and column != "seconds":
        return f"{value:.2e}"
    return report._fmt(value)


def write(records: list, out_dir: str) -> None:
    report.write_json(records, os.path.join(out_dir, "architectures.json"))
    device = records[0]["device"] if records else "?"
    lines = [
        "# Architecture matrix",
        "",
        f"Tiny random float32 configs (lowrank_engine/architectures.py), {architectures.WINDOWS} windows of "
        f"{architectures.SEQLEN} tokens, sliding windows of {architectures.WINDOW} tokens where the architecture "
        f"has them. Device: {device}. torch {torch.__version__}.",
        "",
        "- max_stream_rel_err: the largest ‖engine − model‖/‖model‖ over the block outputs, the engine streaming "
        "the save_pretrained checkpoint block by block with each block's own arguments, the model being "
        f"transformers' forward (tests require < {STREAM_TOLERANCE:g}).",
        "- max_stream_rel_err_block_0_arguments: the same with block 0's arguments replayed to every block, as "
        "the engine did before each block got its own: where it is not 0, blocks receive different masks or "
        "rotary tables.",
        "- max_block_error_mismatch: the largest |reported − measured|/measured over blocks, reported = the "
        "engine's per-block relative MSE for svd-llm at ratio 0.4, measured = the assembled checkpoint run "
        f"through transformers' forward against the dense model (tests require < {MISMATCH_TOLERANCE:g}).",
        "- methods_ok: the methods (and aa-svd+refine) that factorized every linear with finite logits; "
        "roundtrip_ok: save → load gave bit-identical tensors and logits for all of them.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r, c) for c in COLUMNS) + " |" for r in records]
    with open(os.path.join(out_dir, "architectures.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated model types (default: the whole matrix)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    model_types = args.only.split(",") if args.only else sorted(architectures.TINY_CONFIGS)
    unknown = sorted(set(model_types) - set(architectures.TINY_CONFIGS))
    if unknown:
        raise SystemExit(f"not in the matrix: {', '.join(unknown)} (choose from "
                         f"{', '.join(sorted(architectures.TINY_CONFIGS))})")
    records = []
    for model_type in model_types:
        start = time.perf_counter()
        record = architectures.measure(model_type)
        record.update(seconds=round(time.perf_counter() - start, 1), device=report.device_name("cpu"),
                      cpu=report.cpu_model(), threads=torch.get_num_threads())
        records.append(record)
        print(f"[architectures] {model_type}: stream {record['max_stream_rel_err']:.2e}, block-error mismatch "
              f"{record['max_block_error_mismatch']:.2e}, methods {len(record['methods_ok'])} ok, "
              f"round trip {record['roundtrip_ok']}", flush=True)
    write(records, args.out_dir)
    return records


if __name__ == "__main__":
    main()
