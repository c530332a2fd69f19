"""One compression job end to end: load → calibrate → compress → evaluate → save → summarize.

The CLI and the quality benchmark both run jobs through `run_job`; `compress` and `evaluate` are its two
halves (the quality benchmark evaluates its dense row, and `lowrank-engine eval` its models, through
`evaluate`). A job's settings are one `JobSpec`: the compression settings of config.CompressionConfig
plus the job's own, each defined once with its help text, from which the CLI's flags are generated.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

from lowrank_engine import (checkpoint, config, data, distill, distributed, evaluation, models, pipeline, report,
                            workdir)
from lowrank_engine.config import read_rank_map, setting  # noqa: F401  (read_rank_map: the job's name for it)

logger = logging.getLogger("lowrank_engine")

SUMMARY_COLUMNS = ("method", "ratio", "compressible_params", "compressible_reduction", "model_params",
                   "model_reduction", "wikitext2_ppl", "c4_ppl", "kl", "top1_agreement", "compress_seconds",
                   "peak_rss_mb")
RANK_ALLOCATIONS = ("uniform", "waterfill", "type-waterfill", "type-waterfill-dense", "last-layers")
EVAL_WINDOWS = {"wikitext2": 128, "c4": 64, data.SELECTION_SET: 16}  # windows per perplexity set (DESIGN §4)


def parse_eval_sets(value: str) -> tuple:
    return tuple(s for s in value.split(",") if s)


def _windows_per_set(value: int) -> dict:
    return {name: value for name in data.EVAL_SETS}


@dataclass
class JobSpec(config.CompressionConfig):
    """Every setting of a job: the inherited compression settings, then the job's own. The defaults are
    `lowrank-engine compress` with no flags (the quick start)."""
    cli_title = "job settings"  # the CLI's heading of these flags (not a field)

    # The quick start compresses with `best` on 64×512 self-sampled tokens: the smallest calibration on which
    # refinement was measured to help (REFINE_MIN_TOKENS), with 2 refinement passes and no distillation (the
    # Makefile's quickstart; timings in the README's quick start).
    method: str = config.redefault(config.CompressionConfig, "method", "best")
    model: str = setting(models.DEFAULT_MODEL, "'smollm2-135m' (embedded default), a local HF checkpoint "
                                               "directory, or a hub id")
    rank_alloc: str = setting("uniform", "how the ratio is spread: the same ratio per matrix; water-filling by the "
                                         "dense whitened spectra (one extra statistics pass), per matrix or with one rank "
                                         "per matrix type shared by every block (type-waterfill), which may also keep a whole "
                                         "type dense where that loses less for its parameters (type-waterfill-dense); "
                                         "or ResSVD's last-layers rule (--last-layers K, or searched)", choices=RANK_ALLOCATIONS)
    last_layers: Optional[int] = setting(None, "with --rank-alloc last-layers: compress only the last K blocks, "
                                               "harder, at the same overall ratio; without it, K is searched: a few "
                                               "feasible K are tried on 8 calibration windows and the one with the "
                                               "smallest last-block error against the dense model wins")
    calibration: str = setting("self", f"'self' (text sampled from the model; no data set needed), one of "
                                       f"{list(data.NAMED_SETS)} (from $LOWRANK_ENGINE_DATA or the hub), or a "
                                       ".txt/.jsonl/.parquet file")
    nsamples: int = setting(64, "number of calibration windows")
    seqlen: int = setting(512, "tokens per calibration window")
    seed: int = setting(0, "seed for window sampling and self-calibration")
    output: Optional[str] = setting(None, "checkpoint directory (default lowrank-out/<model>-<method>-r<ratio>)")
    resume: bool = setting(False, "continue an interrupted run from its last finished block")
    save: bool = setting(True, "write the checkpoint; without it the compressed model stays in memory only",
                         flag="--no-save")
    eval_sets: Optional[tuple] = setting(None, "comma-separated perplexity sets (wikitext2,c4; c4-select: C4 calibration "
                                               "documents, another seed, for choosing settings); default: wikitext2,c4 "
                                               "when $LOWRANK_ENGINE_DATA is set, else none", type=str, from_cli=parse_eval_sets)
    eval_windows: dict = setting(help="windows per perplexity set", factory=lambda: dict(EVAL_WINDOWS), type=int,
                                 from_cli=_windows_per_set,
                                 default_help=" / ".join(f"{n} {k}" for k, n in EVAL_WINDOWS.items()))
    eval_seqlen: int = setting(512, "tokens per perplexity window")
    # Per-sequence top-1 agreement varies a lot (standard deviation 0.06-0.07 for the quick start's SmolLM2 model):
    # means of 8 sequences ranged 0.529-0.652 for one model, 64 sequences give a standard error near 0.008.
    fidelity_samples: int = setting(64, "held-out sequences sampled from the dense model for KL / top-1 agreement "
                                        "(0 disables)")
    fidelity_seqlen: int = setting(128, "tokens per held-out sequence")
    trust_remote_code: bool = setting(False, "allow custom model code from the checkpoint")
    progress: bool = setting(True, "progress bars", flag="--quiet")
    plot: bool = setting(True, "draw the per-block error plot layer_error.png next to the checkpoint",
                         flag="--no-plot")
    preset: Optional[str] = setting(None, "the preset this job's settings came from (set by expand_preset)",
                                    cli=False)

    def __post_init__(self):
        if self.eval_sets is not None and not isinstance(self.eval_sets, tuple):  # a list, read back from JSON
            self.eval_sets = tuple(self.eval_sets)


# A preset composes the engine's stages (objective, rank allocation, refinement, distillation); it is not
# a method of its own. Its keys are JobSpec fields ("tuning": the refine_* and distill_* ones); it fills in
# those the user did not set. "best": SVD-LLM's closed form, then block refinement on the dense block's
# output, then model distillation (distill.py). Refinement's target is the dense output
# Block(X), so the error that single-stream factors let compound is fitted away block by block; starting
# it from svd-llm rather than the anchored aa-svd gave the lower perplexity on the selection windows
# (c4-select) at ratios 0.2, 0.4 and 0.6 (57.67 / 88.87 / 175.74 against 63.61 / 102.34 / 199.76;
# benchmarks/results/quality.md, "best's starting point"), so the start is the same at every ratio. Refinement
# takes one AdamW step per calibration window at a 1e-3 peak: the published one step per batch at 1e-4
# barely moves the factors in a few passes. On the first 5 SmolLM2 blocks at ratio 0.4 (64×512 C4,
# 3 passes) the last block's relative output error was 0.0805 (published settings), 0.0734 (per-window
# steps), 0.0639 (lr 3e-4), 0.0579 (lr 1e-3), 0.0568 (lr 3e-3); SAES as the starting point gave 0.0581
# for a costlier solve. Three passes of per-window steps are 192 steps on 64 windows, about the
# published 25 passes of 8-window batches (200 steps), at an eighth of the compute. Ranks: water-filling
# every matrix on its own was measured worse at ratio 0.4 (551.5 / 269.6 against 447.1 / 222.2 uniform,
# aa-svd + 3 published refinement passes); one rank per matrix type shared by every block (type-waterfill)
# survives refinement. The dense whitened spectra put SmolLM2's q/k/gate tails far below v/up/down (0.014 /
# 0.014 / 0.059 against 0.16 / 0.12 / 0.12 of the energy at the uniform rank, 0.4), and water-filling by
# type moves rank from q and gate to k, v, o, up and down. With 3 refinement passes and no distillation at
# 0.4, the selection perplexity was 88.87 uniform, 81.34 type-waterfill (84.23 halfway), 85.80 for q/k at
# 1.5× the ratio; by depth, more rank for the first blocks hurt (103.41, ratios 0.2 → 0.6 over depth) and more
# for the last ones helped less (86.45, 0.52 → 0.28).
# Distillation then trains the whole model on the KL to the dense model's next-token distribution; on the
# refined 0.4 model (a prototype of this stage, without weight decay) the selection perplexity after one
# pass was 73.23 / 72.83 / 81.98 at peak lr 3e-5 / 1e-4 / 3e-4 (88.87 before). More steps, not a higher lr:
# three passes at 1e-4 (with weight decay) reached 69.14 at 0.4 and 51.38 at 0.2 (one pass: 72.83 / 54.18);
# also training the tied embeddings and head gave nothing (71.62 against 71.25 after two of three passes).
# Six refinement passes instead of three took the 0.4 model before distillation from 88.87 to 80.71.
# Keeping whole types dense (type-waterfill-dense): at 0.2 type-waterfill left up/down at rank 381/388, where
# a pair stores 91-93% of W and still loses the tail; keeping up, down, o and v dense and cutting q/k/gate to
# 113/111/191 halves the normalized loss (3.68 against 6.49) and, after 6 refinement passes, took the
# selection perplexity from 52.08 to 46.72 with 27% less refinement time (935 s against 1282 s). Whole rows
# (WikiText-2 / C4, one Intel Xeon VM): 0.2 56.26 / 51.39 against 71.07 / 56.68, 0.4 105.73 / 74.93 against
# 111.30 / 75.50, but 0.6 206.26 / 123.92 against 196.56 / 114.18 (there it only keeps v dense), so from 0.5 up
# `best` keeps type-waterfill (from_ratio: the smallest ratio at which those settings replace the preset's).
# Below 0.3 the matrices kept dense train too, at each stage's full learning rate (refine_dense_lr_ratio 1):
# at 0.2, whole rows with 3 distillation passes (selection perplexity, WikiText-2 / C4): frozen 44.27,
# 56.26 / 51.39; 0.3x lr 43.18, 54.09 / 49.86; 1x lr 42.71, 54.00 / 49.10 (0.1x lr with 5 passes: 43.78,
# 55.05 / 50.65; 5 passes instead of 3 bought nothing in the probes). At 0.4, 0.1x lr gave 63.31 against
# 63.33 frozen (both on one AMD EPYC VM), so from 0.3 up they stay frozen.
PRESETS = {
    "best": {"method": "svd-llm", "rank_alloc": "type-waterfill-dense", "refine": True,
             "tuning": {"refine_passes": 6, "refine_micro_batch": 1, "refine_lr": 1e-3,
                        "distill_passes": 3, "distill_lr": 1e-4, "refine_dense_lr_ratio": 1.0},
             "from_ratio": {0.3: {"refine_dense_lr_ratio": 0.0},
                            0.5: {"rank_alloc": "type-waterfill"}}},
}


def preset_fields(name: str, ratio: Optional[float] = None) -> dict:
    """The JobSpec fields a preset sets (its method included), at `ratio` where the preset chooses by ratio."""
    preset = PRESETS[name]
    chosen = {**{k: v for k, v in preset.items() if k not in ("tuning", "from_ratio")}, **preset.get("tuning", {})}
    for threshold, changes in sorted(preset.get("from_ratio", {}).items()):
        if ratio is not None and ratio >= threshold:
            chosen.update(changes)
    return chosen


def expand_preset(spec: JobSpec, explicit: Optional[set] = None) -> JobSpec:
    """A job whose method names a preset, with the preset's settings filled in where the user set none.
    `explicit`: the names of the fields the user gave (the CLI knows them); None counts every field that
    differs from its default as given."""
    if spec.method not in PRESETS:
        return spec
    if explicit is None:
        explicit = {f.name for f in fields(JobSpec) if getattr(spec, f.name) != config.field_default(f)}
    filled = {k: v for k, v in preset_fields(spec.method, spec.ratio).items() if k == "method" or k not in explicit}
    return replace(spec, **filled, preset=spec.method)


def default_output(spec: JobSpec) -> str:
    name = os.path.basename(os.path.normpath(spec.model)) or "model"
    tag = f"r{spec.ratio}" if spec.ratio is not None else "rankmap"
    return os.path.join("lowrank-out", f"{name}-{spec.preset or spec.method}-{tag}")


# where a job writes and what it may hold, not what it computes
_WHERE_AND_HOW = ("output", "resume", "save", "progress", "plot", "offload", "max_memory")
_EVALUATION = ("eval_sets", "eval_windows", "eval_seqlen", "fidelity_samples", "fidelity_seqlen", "track_error")


def settings(spec: JobSpec, evaluation: bool = True) -> dict:
    """The resolved job as JSON, for its record: what made a checkpoint, and whether a cached result is stale
    (a preset changed, a default moved). Without `evaluation`: only what decides the compressed model."""
    skip = _WHERE_AND_HOW + (() if evaluation else _EVALUATION)
    chosen = {f.name: getattr(spec, f.name) for f in fields(JobSpec) if f.name not in skip}
    return json.loads(json.dumps(chosen, sort_keys=True, default=str))


def changed_settings(stored: dict, current: dict) -> list[str]:
    """The names of `current`'s settings that `stored` lacks or holds with another value."""
    return sorted(k for k in current if stored.get(k, object()) != current[k])


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
    return allocation.waterfill_from_model(path, source, input_ids, spec.ratio,
                                           by_type=spec.rank_alloc.startswith("type-waterfill"),
                                           allow_dense=spec.rank_alloc == "type-waterfill-dense", device=spec.device,
                                           batch_size=spec.batch_size, trust_remote_code=spec.trust_remote_code,
                                           progress=spec.progress, offload=spec.offload, solve_dtype=spec.solve_dtype,
                                           compute_dtype=spec.compute_dtype, max_memory=spec.max_memory)


def _compressible_parameters(model) -> int:
    _, blocks = models.find_decoder_blocks(model)
    return sum(p.numel() for b in blocks for m in models.block_linears(b).values() for p in m.parameters())


def _validate(spec: JobSpec) -> None:
    """The job's own checks; every compression setting is checked by CompressionConfig.validate (on the
    settings a preset method stands for)."""
    expand_preset(spec).compression().validate()
    if spec.rank_alloc not in RANK_ALLOCATIONS:
        raise ValueError(f"unknown rank allocation {spec.rank_alloc!r}; choose from {', '.join(RANK_ALLOCATIONS)}")
    if spec.rank_alloc != "uniform" and spec.ratio is None:
        raise ValueError(f"--rank-alloc {spec.rank_alloc} distributes a --ratio; give one")
    if spec.last_layers and spec.rank_alloc != "last-layers":
        raise ValueError("--last-layers K only applies with --rank-alloc last-layers")
    if spec.last_layers is not None and spec.last_layers < 1:
        raise ValueError(f"--last-layers K must be at least 1, got {spec.last_layers}")
    for name in spec.eval_sets or ():
        if name not in data.EVAL_SETS:
            raise ValueError(f"unknown evaluation set {name!r}; choose from {', '.join(data.EVAL_SETS)}")


REFINE_MIN_TOKENS = 64 * 512  # the smallest calibration set on which refinement was measured to help


def refinement_warning(spec: JobSpec) -> Optional[str]:
    """Refinement fits the block to its calibration windows; with few or short windows it overfits.
    SmolLM2 at ratio 0.4, WikiText-2 PPL: aa-svd 1,469 → refined 1,580 on 8×512 tokens (evaluated at 512);
    refined on 8×128 tokens, 104,685 (evaluated at 128) and 235,131 (at 512); on 64×512 tokens
    refinement gains (576 → 447)."""
    if not spec.refine:
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


def resolve(spec: JobSpec, explicit: Optional[set] = None) -> JobSpec:
    """The job as it runs: its preset expanded, its evaluation sets chosen, every setting checked."""
    spec = expand_preset(spec, explicit)
    if spec.eval_sets is None:  # both named sets where a data directory holds them, else none
        spec = replace(spec, eval_sets=tuple(data.NAMED_SETS) if data.data_dir() else ())
    _validate(spec)
    return spec


def evaluation_windows(spec: JobSpec, tokenizer) -> dict:
    """The perplexity windows of each of the job's evaluation sets (loaded before any compression work, so a
    missing data set fails first)."""
    return {name: data.evaluation_windows(name, tokenizer, spec.eval_windows.get(name, EVAL_WINDOWS[name]),
                                          spec.eval_seqlen)
            for name in spec.eval_sets or ()}


def evaluate(model, tokenizer, spec: JobSpec, windows: Optional[dict] = None,
             dense: Optional[Callable] = None) -> dict:
    """The figures of `model` under the job's evaluation settings: perplexity on each of its evaluation sets
    and, with fidelity samples and `dense` (a callable giving the dense model on the job's device), KL and
    top-1 agreement on sequences the dense model samples. Compressed and dense models alike are evaluated
    here: by `run_job`, `lowrank-engine eval` and the quality benchmark's dense row."""
    windows = evaluation_windows(spec, tokenizer) if windows is None else windows
    figures = {}
    for name, w in windows.items():
        figures[f"{name}_ppl"] = evaluation.perplexity(model, w, progress=spec.progress, desc=name)
    if spec.fidelity_samples and dense is not None:
        dense_model = dense()
        held_out = data.sample_from_model(dense_model, tokenizer, spec.fidelity_samples, spec.fidelity_seqlen,
                                          seed=spec.seed + 10_007)
        figures.update(evaluation.fidelity(dense_model, model, held_out))
        del dense_model
    return figures


@dataclass
class Compressed:
    """What `compress` leaves: the compressed model (None on ranks other than 0), its record so far, and what
    evaluating it needs."""
    spec: JobSpec
    record: dict
    model: object = None
    tokenizer: object = None
    windows: Optional[dict] = None
    path: Optional[str] = None  # the dense model's local directory


def write_distilled_blocks(source, work_dir: str) -> str:
    """The distilled blocks as <work_dir>/distilled/block-N.safetensors, the checkpoint's block files. The
    blocks/ files keep the factors before distillation: a resumed run replays them and distills again."""
    directory = os.path.join(work_dir, "distilled")
    os.makedirs(directory, exist_ok=True)
    for index, block in enumerate(source.blocks):
        prefix = f"{source.blocks_name}.{index}."
        checkpoint.atomic_save_tensors({prefix + k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()},
                                       os.path.join(directory, f"block-{index:05d}.safetensors"))
    return directory


def compress(spec: JobSpec) -> Compressed:
    """Load, calibrate, compress and (with spec.save) write the checkpoint of a resolved job (`resolve`).
    The record's compress_seconds are what the user waits for from the start of compression to the last
    factor: rank allocation, FWSVD's Fisher pass, and the per-block error report when it is on."""
    from transformers import AutoConfig, AutoTokenizer

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
    path = models.resolve_model_path(spec.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise models.ModelSourceError(f"cannot load model {spec.model!r}: {str(exc).splitlines()[0]}") from exc

    # the skeleton first: an unsupported architecture fails before any calibration work
    # distillation tunes the whole compressed model, so its blocks stay in memory
    source = pipeline.LazyBlockSource(path, spec.trust_remote_code,
                                      keep_compressed=not spec.save or spec.distill_passes > 0)
    if spec.calibration == "self":  # sampling needs the whole dense model once, before compression starts
        dense, _ = models.load_model(path, trust_remote_code=spec.trust_remote_code)
        models.check_finite_parameters(dense)  # else sampling fails far from the cause
        calib = data.load_calibration("self", tokenizer, spec.nsamples, spec.seqlen, spec.seed, model=dense.to(spec.device),
                                      progress=spec.progress)
        del dense
    else:
        calib = data.load_calibration(spec.calibration, tokenizer, spec.nsamples, spec.seqlen, spec.seed)
    windows = evaluation_windows(spec, tokenizer)
    dense_linears = sum(p.numel() for b in source.blocks for m in models.block_linears(b).values()
                        for p in m.parameters())
    dense_params = models.count_parameters(source.model)
    if spec.distill_passes and distributed.rank() == 0:  # the one stage that holds whole models
        distill.check_memory(dense_params, model_config.vocab_size, spec.seqlen, spec)
    dense_model = lambda: models.load_model(path, trust_remote_code=spec.trust_remote_code)[0].to(spec.device)  # noqa: E731

    # compression starts: everything from here to the last factor is compress_seconds (and its peak RSS)
    pipeline.reset_peak_rss()
    start = time.perf_counter()
    job_stages = {}  # the stages around the block pipeline
    rank_map = spec.rank_map
    if spec.rank_alloc != "uniform":
        rank_map = {**allocate_ranks(spec, path, source, calib.input_ids), **(rank_map or {})}
        job_stages["rank_allocation"] = time.perf_counter() - start
    compressor = pipeline.Compressor(source, replace(spec.compression(), rank_map=rank_map),
                                     work_dir=work_dir if spec.save else None, progress=spec.progress)
    began = time.perf_counter()
    compressor.prepare(calib.input_ids, dense_model)  # FWSVD's Fisher: gradients of the whole dense model
    if compressor.fisher is not None:
        job_stages["fisher"] = time.perf_counter() - began
    compressor.memory_plan(calib.input_ids)  # a budget that cannot hold one block fails before any output exists
    distributed.barrier()  # every rank has checked the output paths before any creates them
    lock = workdir.WorkDirLock(work_dir)  # one process per output; rank 0 holds it for its peers
    created = spec.save and not os.path.exists(work_dir)
    if spec.save:
        os.makedirs(work_dir, exist_ok=True)
        if distributed.rank() == 0:
            lock.acquire()
    try:
        result = compressor.run(calib.input_ids)
        if distributed.rank() != 0:  # rank 0 distills, assembles, evaluates and reports
            return Compressed(spec, {"method": spec.method, "ratio": spec.ratio, "rank": distributed.rank()})
        blocks_dir, distill_report, distilled_errors = None, None, None
        if spec.distill_passes:
            began = time.perf_counter()
            teacher, student = dense_model(), source.model.to(spec.device)
            distill_report = distill.distill_model(student, teacher, calib.input_ids, spec, progress=spec.progress)
            job_stages["distill"] = time.perf_counter() - began
            if spec.track_error:  # the per-block report of the model as distillation leaves it
                began = time.perf_counter()
                distilled_errors = distill.block_output_errors(teacher, student, calib.input_ids, spec.batch_size)
                job_stages["distill_error_report"] = time.perf_counter() - began
            del teacher, student
            if spec.save:
                blocks_dir = write_distilled_blocks(source, work_dir)
        seconds = time.perf_counter() - start
        lowrank_config = checkpoint.build_lowrank_config(result.ranks, spec.method, spec.ratio, calib.describe(),
                                                         {"beta_search": spec.beta_search, "base_model": spec.model})
        if spec.save:
            checkpoint.assemble_checkpoint(work_dir, output, source.non_block_state(), model_config, tokenizer,
                                           lowrank_config, trust_remote_code=spec.trust_remote_code,
                                           blocks_dir=blocks_dir)
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
              "compress_seconds": seconds, "peak_rss_mb": result.peak_rss_mb, "peak_gpu_mb": result.peak_gpu_mb,
              "stage_seconds": {**job_stages, **result.stage_seconds}, "track_error": spec.track_error,
              "calibration": calib.describe(), "beta_search": spec.beta_search, "settings": settings(spec)}
    record["compressible_reduction"] = 1 - record["compressible_params"] / dense_linears
    record["model_reduction"] = 1 - record["model_params"] / dense_params
    record["layer_errors"] = [(b.output_rel_mse, b.output_cosine_distance) for b in result.blocks]
    if spec.distill_passes:
        record["distill"] = distill_report
        if distilled_errors is not None:
            record["layer_errors_before_distill"], record["layer_errors"] = record["layer_errors"], distilled_errors
    record["betas"] = {f"{b.index}.{n}": v["beta"] for b in result.blocks for n, v in b.modules.items()
                       if v.get("beta") is not None}
    if spec.save:
        record["output"] = output
    return Compressed(spec, record, model, tokenizer, windows, path)


def run_job(spec: JobSpec, explicit: Optional[set] = None) -> dict:
    """Returns the summary record (also printed and written as JSON next to the checkpoint). `explicit`: the
    fields the user set (see expand_preset)."""
    done = compress(resolve(spec, explicit))
    spec, record = done.spec, done.record
    if done.model is None:  # a rank other than 0
        return record
    record.update(evaluate(done.model, done.tokenizer, spec, done.windows,
                           dense=lambda: models.load_model(done.path, trust_remote_code=spec.trust_remote_code)[0]
                           .to(spec.device)))
    if spec.save:
        output = record["output"]
        report.write_json([{k: v for k, v in record.items() if k != "output"}], os.path.join(output, "results.json"))
        if spec.plot:
            report.plot_layer_errors({f"{spec.method} r={spec.ratio}": record["layer_errors"]},
                                     os.path.join(output, "layer_error.png"))
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

