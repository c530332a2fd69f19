"""One compression job end to end: load → calibrate → compress → evaluate → save → summarize.

The CLI and the quality benchmark both run jobs through `run_job`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field, replace
from typing import Optional

from lowrank_engine import checkpoint, data, distributed, evaluation, models, pipeline, report, workdir

logger = logging.getLogger("lowrank_engine")

SUMMARY_COLUMNS = ("method", "ratio", "compressible_params", "compressible_reduction", "model_params",
                   "model_reduction", "wikitext2_ppl", "c4_ppl", "kl", "top1_agreement", "compress_seconds",
                   "peak_rss_mb")


@dataclass
class JobSpec:
    model: str = models.DEFAULT_MODEL
    method: str = "saes"
    ratio: Optional[float] = 0.2
    rank_map: Optional[str] = None  # path to a JSON {module: rank or null (dense)}
    rank_alloc: str = "uniform"  # uniform | waterfill | last-layers
    last_layers: Optional[int] = None  # last-layers: how many final blocks are compressed (None: searched)
    calibration: str = "self"
    nsamples: int = 16
    seqlen: int = 256
    seed: int = 0
    beta_search: str = "exact"
    device: str = "cpu"
    offload: str = "none"  # none | cpu | disk
    batch_size: int = 8
    max_memory: Optional[str] = None  # e.g. "20GiB" or "cuda:60GiB,cpu:24GiB"
    residual_split: float = 0.75  # erc-svd
    residual_stage2: str = "aa-svd"  # erc-svd
    refine: dict = field(default_factory=dict)  # CompressionConfig refine_* fields (refine=True to enable)
    solve_dtype: Optional[str] = None  # float32 | float64 (default: float64 on CPU, float32 on GPU)
    compute_dtype: Optional[str] = None  # blocks' precision (default: the checkpoint's; fp32 on CPU for bf16/fp16)
    output: Optional[str] = None
    resume: bool = False
    save: bool = True
    eval_sets: tuple = ()  # subset of ("wikitext2", "c4")
    eval_windows: dict = field(default_factory=lambda: {"wikitext2": 128, "c4": 64})
    eval_seqlen: int = 512
    fidelity_samples: int = 8
    fidelity_seqlen: int = 128
    trust_remote_code: bool = False
    progress: bool = True
    plot: bool = True
    preset: Optional[str] = None  # set by expand_preset: the preset this job's options came from


# A preset composes the engine's stages (objective, rank allocation, refinement); it is not a
# method of its own. "best": the anchored objective (AA-SVD stage 1) stops error from compounding
# through depth, and block refinement recovers what the per-matrix closed forms cannot. Refinement
# takes one AdamW step per calibration window at a 1e-3 peak: the published one step per batch at 1e-4
# barely moves the factors in a few passes. On the first 5 SmolLM2 blocks at ratio 0.4 (64×512 C4,
# 3 passes) the last block's relative output error was 0.0805 (published settings), 0.0734 (per-window
# steps), 0.0639 (lr 3e-4), 0.0579 (lr 1e-3), 0.0568 (lr 3e-3); SAES as the starting point gave 0.0581
# for a costlier solve. Three passes of per-window steps are 192 steps on 64 windows, about the
# published 25 passes of 8-window batches (200 steps), at an eighth of the compute. Water-filled ranks were measured worse at ratio 0.4 (551.5 / 269.6 against
# 447.1 / 222.2 uniform), so ranks stay uniform (benchmarks/results/quality.md).
PRESETS = {
    "best": {"method": "aa-svd", "rank_alloc": "uniform", "refine": True,
             "refine_options": {"refine_passes": 3, "refine_micro_batch": 1, "refine_lr": 1e-3}},
}


def expand_preset(spec: JobSpec) -> JobSpec:
    """A job whose method names a preset, with the preset's options filled in."""
    preset = PRESETS.get(spec.method)
    if preset is None:
        return spec
    # the preset's refinement settings, unless the job names its own
    refine = {**preset.get("refine_options", {}), **spec.refine,
              "refine": preset["refine"] or spec.refine.get("refine", False)}
    return replace(spec, method=preset["method"], rank_alloc=preset["rank_alloc"], refine=refine, preset=spec.method)


def default_output(spec: JobSpec) -> str:
    name = os.path.basename(os.path.normpath(spec.model)) or "model"
    tag = f"r{spec.ratio}" if spec.ratio is not None else "rankmap"
    return os.path.join("lowrank-out", f"{name}-{spec.preset or spec.method}-{tag}")


def read_rank_map(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            rank_map = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read rank map {path}: {exc}") from exc
    if not isinstance(rank_map, dict) or not all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                                                 for v in rank_map.values()):
        raise ValueError(f"rank map {path} must be a JSON object of module name → integer rank (null: keep dense)")
    return rank_map


RANK_ALLOCATIONS = ("uniform", "waterfill", "last-layers")


def allocate_ranks(spec: JobSpec, path: str, source, input_ids) -> dict:
    """The rank map of a non-uniform allocation (entries of --rank-map still override it)."""
    from lowrank_engine import allocation

    if spec.rank_alloc == "last-layers":
        k = spec.last_layers
        if k is None:
            k, errors = allocation.search_last_layers(
                path, input_ids, spec.ratio, spec.method, trust_remote_code=spec.trust_remote_code,
                progress=spec.progress, device=spec.device, batch_size=spec.batch_size, solve_dtype=spec.solve_dtype,
                compute_dtype=spec.compute_dtype)
            if spec.progress:
                print(f"[last-layers] chose k={k} of {sorted(errors)}", flush=True)
        return allocation.last_layers(allocation.model_shapes(source), spec.ratio, k)
    return allocation.waterfill_from_model(path, source, input_ids, spec.ratio, device=spec.device,
                                           batch_size=spec.batch_size, trust_remote_code=spec.trust_remote_code,
                                           progress=spec.progress, offload=spec.offload, solve_dtype=spec.solve_dtype,
                                           compute_dtype=spec.compute_dtype, max_memory=spec.max_memory)


def _compressible_parameters(model) -> int:
    _, blocks = models.find_decoder_blocks(model)
    return sum(p.numel() for b in blocks for m in models.block_linears(b).values() for p in m.parameters())


def _validate(spec: JobSpec) -> None:
    from lowrank_engine import solvers

    solvers.get_method(spec.method)
    if spec.rank_alloc not in RANK_ALLOCATIONS:
        raise ValueError(f"unknown rank allocation {spec.rank_alloc!r}; choose from {', '.join(RANK_ALLOCATIONS)}")
    if spec.rank_alloc != "uniform" and spec.ratio is None:
        raise ValueError(f"--rank-alloc {spec.rank_alloc} distributes a --ratio; give one")
    if spec.last_layers and spec.rank_alloc != "last-layers":
        raise ValueError("--last-layers K only applies with --rank-alloc last-layers")
    if spec.last_layers is not None and spec.last_layers < 1:
        raise ValueError(f"--last-layers K must be at least 1, got {spec.last_layers}")
    if spec.ratio is not None and not 0.0 < spec.ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1) (fraction of parameters removed), got {spec.ratio}")
    for name in spec.eval_sets:
        if name not in data.NAMED_SETS:
            raise ValueError(f"unknown evaluation set {name!r}; choose from {', '.join(data.NAMED_SETS)}")


REFINE_MIN_TOKENS = 64 * 512  # the smallest calibration set on which refinement was measured to help


def refinement_warning(spec: JobSpec) -> Optional[str]:
    """Refinement fits the block to its calibration windows; with few or short windows it overfits.
    SmolLM2 at ratio 0.4, WikiText-2 PPL: aa-svd 1,469 → refined 1,580 on 8×512 tokens (evaluated at 512);
    refined on 8×128 tokens, 104,685 (evaluated at 128) and 235,131 (at 512); on 64×512 tokens
    refinement gains (576 → 447)."""
    if not spec.refine.get("refine"):
        return None
    problems = []
    if spec.nsamples * spec.seqlen < REFINE_MIN_TOKENS:
        problems.append(f"{spec.nsamples}×{spec.seqlen} calibration tokens (refinement was measured to help at "
                        f"64×512 and to hurt with fewer)")
    if spec.seqlen < spec.eval_seqlen:
        problems.append(f"{spec.seqlen}-token windows, shorter than the {spec.eval_seqlen}-token evaluation")
    if not problems:
        return None
    return ("refinement may overfit: " + "; ".join(problems) + ". Use more calibration windows (--nsamples) and "
            "--seqlen at least the context you serve, or drop --refine.")


def run_job(spec: JobSpec) -> dict:
    """Returns the summary record (also printed and written as JSON next to the checkpoint)."""
    from transformers import AutoConfig, AutoTokenizer

    spec = expand_preset(spec)
    _validate(spec)
    warning = refinement_warning(spec)
    if warning:
        logger.warning(warning)
        print(f"warning: {warning}", flush=True)
    output = spec.output or default_output(spec)
    work_dir = os.path.abspath(output) + ".partial"
    if spec.save and os.path.exists(output):
        raise checkpoint.CheckpointError(f"output directory {output} already exists; remove it or choose another")
    if spec.save and os.path.exists(work_dir):
        workdir.check_not_busy(work_dir)  # a run still going there: refuse before any work
        if not spec.resume:
            raise checkpoint.CheckpointError(f"{work_dir} holds an interrupted run: pass --resume to continue it, "
                                             "or remove it")
    rank_map = read_rank_map(spec.rank_map) if spec.rank_map else None
    path = models.resolve_model_path(spec.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise models.ModelSourceError(f"cannot load model {spec.model!r}: {str(exc).splitlines()[0]}") from exc

    # the skeleton first: an unsupported architecture fails before any calibration work
    source = pipeline.LazyBlockSource(path, spec.trust_remote_code, keep_compressed=not spec.save)
    if spec.calibration == "self":  # sampling needs the whole dense model once, before compression starts
        dense, _ = models.load_model(path, trust_remote_code=spec.trust_remote_code)
        models.check_finite_parameters(dense)  # else sampling fails far from the cause
        calib = data.load_calibration("self", tokenizer, spec.nsamples, spec.seqlen, spec.seed, model=dense.to(spec.device))
        del dense
    else:
        calib = data.load_calibration(spec.calibration, tokenizer, spec.nsamples, spec.seqlen, spec.seed)
    eval_windows = {name: data.evaluation_windows(name, tokenizer, spec.eval_windows.get(name, 64), spec.eval_seqlen)
                    for name in spec.eval_sets}

    if spec.rank_alloc != "uniform":
        rank_map = {**allocate_ranks(spec, path, source, calib.input_ids), **(rank_map or {})}
    cfg = pipeline.CompressionConfig(method=spec.method, ratio=spec.ratio, rank_map=rank_map,
                                     beta_search=spec.beta_search, device=spec.device, offload=spec.offload,
                                     batch_size=spec.batch_size, max_memory=spec.max_memory,
                                     residual_split=spec.residual_split, residual_stage2=spec.residual_stage2,
                                     **spec.refine,
                                     solve_dtype=spec.solve_dtype, compute_dtype=spec.compute_dtype)
    dense_linears = sum(p.numel() for b in source.blocks for m in models.block_linears(b).values()
                        for p in m.parameters())
    dense_params = models.count_parameters(source.model)
    compressor = pipeline.Compressor(source, cfg, work_dir=work_dir if spec.save else None, progress=spec.progress)
    compressor.prepare(calib.input_ids,
                       lambda: models.load_model(path, trust_remote_code=spec.trust_remote_code)[0].to(spec.device))
    compressor.memory_plan(calib.input_ids)  # a budget that cannot hold one block fails before any output exists
    distributed.barrier()  # every rank has checked the output paths before any creates them
    lock = workdir.WorkDirLock(work_dir)  # one process per output; rank 0 holds it for its peers
    created = spec.save and not os.path.exists(work_dir)
    if spec.save:
        os.makedirs(work_dir, exist_ok=True)
        if distributed.rank() == 0:
            lock.acquire()
    try:
        pipeline.reset_peak_rss()
        result = compressor.run(calib.input_ids)
        if distributed.rank() != 0:  # rank 0 assembles, evaluates and reports
            return {"method": spec.method, "ratio": spec.ratio, "rank": distributed.rank()}
        lowrank_config = checkpoint.build_lowrank_config(result.ranks, spec.method, spec.ratio, calib.describe(),
                                                         {"beta_search": spec.beta_search, "base_model": spec.model})
        if spec.save:
            checkpoint.assemble_checkpoint(work_dir, output, source.non_block_state(), config, tokenizer,
                                           lowrank_config, trust_remote_code=spec.trust_remote_code)
            shutil.rmtree(work_dir, ignore_errors=True)
    except ValueError:  # bad input (NaN activations, an unsupported model): a resume would fail alike
        if created and distributed.rank() == 0:
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    finally:
        lock.release()
    if spec.save:
        del source
        model, _ = checkpoint.load(output, device=spec.device, trust_remote_code=spec.trust_remote_code)
    else:
        model = source.model.to(spec.device)

    record = {"method": spec.preset or spec.method, "ratio": spec.ratio, "model": spec.model,
              "compressible_params": _compressible_parameters(model), "compressible_dense": dense_linears,
              "model_params": models.count_parameters(model), "model_dense": dense_params,
              "compress_seconds": result.seconds, "peak_rss_mb": result.peak_rss_mb, "peak_gpu_mb": result.peak_gpu_mb,
              "stage_seconds": result.stage_seconds, "calibration": calib.describe(), "beta_search": spec.beta_search}
    record["compressible_reduction"] = 1 - record["compressible_params"] / dense_linears
    record["model_reduction"] = 1 - record["model_params"] / dense_params
    for name, windows in eval_windows.items():
        record[f"{name}_ppl"] = evaluation.perplexity(model, windows, progress=spec.progress, desc=name)
    if spec.fidelity_samples:
        dense_model = models.load_model(path, trust_remote_code=spec.trust_remote_code)[0].to(spec.device)
        held_out = data.sample_from_model(dense_model, tokenizer, spec.fidelity_samples, spec.fidelity_seqlen,
                                          seed=spec.seed + 10_007)
        record.update(evaluation.fidelity(dense_model, model, held_out))
        del dense_model
    record["layer_errors"] = [(b.output_rel_mse, b.output_cosine_distance) for b in result.blocks]
    record["betas"] = {f"{b.index}.{n}": v["beta"] for b in result.blocks for n, v in b.modules.items()
                       if v.get("beta") is not None}
    if spec.save:
        report.write_json([record], os.path.join(output, "results.json"))
        if spec.plot:
            report.plot_layer_errors({f"{spec.method} r={spec.ratio}": record["layer_errors"]},
                                     os.path.join(output, "layer_error.png"))
        record["output"] = output
    return record


FIGURES = ("wikitext2_ppl", "c4_ppl", "kl", "top1_agreement")


class EvaluationError(ValueError):
    """An evaluation gave a NaN or Inf figure."""


def check_figures(record: dict) -> None:
    """A NaN or Inf figure is a failed evaluation, never a number to report."""
    bad = [name for name in FIGURES if isinstance(record.get(name), float) and not math.isfinite(record[name])]
    if bad:
        kept = f"; the checkpoint is kept at {record['output']} for inspection" if record.get("output") else ""
        raise EvaluationError(f"evaluation failed: {', '.join(f'{n} is {record[n]}' for n in bad)} "
                              f"(the model's outputs are not finite){kept}")


def print_summary(records: list, stream=None) -> str:
    text = report.format_table(records, SUMMARY_COLUMNS)
    print(text, file=stream)
    return text

