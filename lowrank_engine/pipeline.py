"""The streaming pipeline: one decoder block at a time, two activation streams.

X is the input a block sees in the original model, X' the input it sees in the model compressed so
far. For each block, `Compressor.compress_block` runs the stages of DESIGN §2 in order:

    probe      which linears share an input, in what order they run     probe.probe_block
    plan       per group: what to collect, how it is solved              statistics.plan_groups
    statistics the dense pass over X (and, for two-stream methods,       statistics.dense_pass,
               X' group by group, replaying what is already final)       statistics.two_stream_statistics, replay
    solve      whitening and the closed form, one solver for all         solvers.solve_group
    install    factor pairs replace the linears (shared across processes) distributed.broadcast_factors
    refine     optional: tune factors and norms on the block's output     refine.refine_block
    propagate  X' through the compressed block (X_next came from the dense pass)
    write      the finished block, for --resume                          workdir.ResumeDir

A method only decides which statistics (A = XᵀX, B = X'ᵀX', C = XᵀX') are accumulated and how the
solver combines them. Blocks come from a `sources.BlockSource` (in memory, or streamed from
safetensors); the streams live where `streams.StreamStore` puts them.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_engine import checkpoint, distributed, memory, refine, solvers, streams, workdir
from lowrank_engine.config import CompressionConfig
from lowrank_engine.models import block_linears, set_submodule
from lowrank_engine.modules import LowRankLinear
from lowrank_engine.probe import capture_block_inputs, discover_groups, group_inputs, probe_block, run_block  # noqa: F401
from lowrank_engine.replay import TwoStreamReplay
from lowrank_engine.rss import peak_rss_mb, reset_peak_rss, return_freed_memory, reuse_freed_heap  # noqa: F401
from lowrank_engine.sources import BlockSource, LazyBlockSource, cast_parameters, move_non_block_tensors  # noqa: F401
from lowrank_engine.statistics import (ActivationError, DensePass, GroupPlan, check_finite, dense_pass,  # noqa: F401
                                       plan_groups, release_group, two_stream_statistics)


@dataclass
class BlockReport:
    index: int
    seconds: dict = field(default_factory=dict)
    output_rel_mse: float = float("nan")
    output_cosine_distance: float = float("nan")
    modules: dict = field(default_factory=dict)  # name → {rank, truncation_loss, retained_energy, beta, clamped}
    refine: dict = field(default_factory=dict)  # first/last pass loss and steps, when refined


@dataclass
class CompressionResult:
    ranks: dict
    blocks: list
    seconds: float
    peak_rss_mb: float
    peak_gpu_mb: float
    stage_seconds: dict
    spectra: Optional[dict] = None  # full linear name → σ(G), when the Compressor was asked to keep them

    @property
    def clamped(self) -> dict:
        """Linears whose whitening raised eigenvalues to the floor → how many (a clamp changes the optimum)."""
        return {f"{b.index}.{n}": m["clamped"] for b in self.blocks for n, m in b.modules.items() if m.get("clamped")}


class StageTimer:
    """Seconds per stage for the whole run and for the current block; shows the stage on the progress bar."""

    def __init__(self):
        self.total: dict = defaultdict(float)
        self.block: dict = {}
        self.bar = None

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if self.bar is not None:
            self.bar.set_postfix_str(stage)
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.total[stage] += seconds
            self.block[stage] = self.block.get(stage, 0.0) + seconds


# --------------------------------------------------------------------------------------
# ranks and dtypes
# --------------------------------------------------------------------------------------
def module_rank(name: str, module: nn.Linear, cfg: CompressionConfig) -> Optional[int]:
    """The module's rank; None keeps it dense (a rank map entry of null)."""
    m, n = module.out_features, module.in_features
    if cfg.rank_map and name in cfg.rank_map:
        if cfg.rank_map[name] is None:
            return None
        k = int(cfg.rank_map[name])
    elif cfg.ratio is not None:
        k = solvers.rank_for_ratio(m, n, cfg.ratio)
    else:
        raise ValueError(f"no rank for {name}: give a ratio or a rank map entry")
    solvers.check_rank(name, m, n, k)
    return k


def validate_rank_map(rank_map: dict, model_linears: dict) -> None:
    unknown = sorted(set(rank_map) - set(model_linears))
    if unknown:
        raise ValueError(f"rank map names modules that are not compressible linears: {unknown[:5]}")
    for name, k in rank_map.items():
        if k is not None:  # null keeps the module dense
            mod = model_linears[name]
            solvers.check_rank(name, mod.out_features, mod.in_features, int(k))


def compute_dtype(cfg: CompressionConfig, storage: torch.dtype) -> torch.dtype:
    """The dtype blocks run in. CPU GEMMs in bf16/fp16 are two orders of magnitude slower than
    fp32 (0.8 vs 83 GFLOP/s measured on 2 cores), so half-precision checkpoints run in fp32 there;
    factors are rounded to the checkpoint's dtype as they are installed, and written in it."""
    if cfg.compute_dtype:
        return getattr(torch, cfg.compute_dtype)
    if torch.device(cfg.device).type == "cpu" and storage in (torch.bfloat16, torch.float16):
        return torch.float32
    return storage


def solve_dtype(cfg: CompressionConfig) -> torch.dtype:
    if cfg.solve_dtype:
        return getattr(torch, cfg.solve_dtype)
    return torch.float64 if torch.device(cfg.device).type == "cpu" else torch.float32


# --------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------
class Compressor:
    """Runs the pipeline over a model. `work_dir` (optional) receives one file per finished block;
    `keep_spectra` keeps every linear's σ(G) in the result (rank allocation)."""

    def __init__(self, source: BlockSource, cfg: CompressionConfig, work_dir: Optional[str] = None,
                 progress: bool = True, keep_spectra: bool = False):
        cfg.validate()
        self.source, self.cfg, self.progress = source, cfg, progress
        self.method = solvers.get_method(cfg.method)
        if cfg.rank_map:  # before any output exists
            validate_rank_map(cfg.rank_map, {f"{source.blocks_name}.{i}.{n}": m for i in range(len(source.blocks))
                                             for n, m in block_linears(source.blocks[i]).items()})
        self.resume_dir = workdir.ResumeDir(work_dir) if work_dir else None
        self.device = torch.device(cfg.device)
        self.offload = streams.normalize_offload(cfg.offload)
        self.store: Optional[streams.StreamStore] = None
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.dtype = solve_dtype(cfg)
        self.storage_dtype = source.activation_dtype()
        self.compute_dtype = compute_dtype(cfg, self.storage_dtype)
        self.timer = StageTimer()
        self.ranks: dict = {}
        self.reports: list[BlockReport] = []
        self.spectra: Optional[dict] = {} if keep_spectra else None
        self.fisher: Optional[dict] = None  # fwsvd: full module name → column Fisher (set by prepare)

    @property
    def work_dir(self) -> Optional[str]:
        return self.resume_dir.work_dir if self.resume_dir else None

    def _full(self, index: int, name: str) -> str:
        return f"{self.source.blocks_name}.{index}.{name}"

    # -- one block -----------------------------------------------------------------------
    @torch.no_grad()
    def compress_block(self, index: int, dense: nn.Module, x_stream, xp_stream, kwargs: list):
        """Factorize one block; returns (compressed block, X_next, X'_next, report)."""
        cfg, method, timer = self.cfg, self.method, self.timer
        report = BlockReport(index)
        comp = copy.deepcopy(dense)
        structure = probe_block(dense, x_stream[0].to(self.device), kwargs[0], self.device)
        linears = block_linears(dense)
        ranks = {name: module_rank(self._full(index, name), linears[name], cfg) for name in linears}
        plans = plan_groups(method, structure.groups, linears, ranks)

        with timer("statistics"):  # the dense pass: X_next, and what each group needs of X
            dense_side = dense_pass(dense, plans, method, lambda block: self._propagate(block, x_stream, kwargs),
                                    self.store, self.device, f"block {index}")
        if method.two_stream:
            # in execution order: X' for a later group sees the factors of the earlier ones
            replay = TwoStreamReplay(comp, structure, self.device, self.store.holding_device) \
                if self.offload != "disk" else None  # replayed outputs are one more stream; disk keeps RAM flat
            for i, plan in enumerate(plans):
                if plan.compressed:
                    with timer("statistics"):
                        stats = two_stream_statistics(plan, comp, xp_stream, kwargs, dense_side, method.needs,
                                                      self.device, f"block {index}", replay)
                    release_group(dense_side, plan.first)
                    mine = distributed.owner(i) == self.rank
                    self._install(comp, index, plan, self._solve(index, plan, stats, linears) if mine else None,
                                  distributed.owner(i), report)
                    del stats
                else:
                    release_group(dense_side, plan.first)
                if replay:
                    replay.installed_group(plan.linears)
        else:
            # every group's statistics are ready at once: whiten them in batches; with several
            # processes each solves its own groups, then all exchange factors
            solved = self._solve_single_stream(index, plans, dense_side.statistics, linears)
            for i, plan in enumerate(plans):
                self._install(comp, index, plan, solved.pop(plan.first, None), distributed.owner(i), report)
            replay = None

        if cfg.refine:  # refinement moves every factor: nothing stays final, no replay
            replay = None
            with timer("refine"):
                report.refine = refine.refine_block(comp, xp_stream, dense_side.x_next, kwargs, self.device, cfg,
                                                    run_block)
        if not method.two_stream and not cfg.track_error and not cfg.refine:  # X' feeds only the error report
            return comp, dense_side.x_next, self.store.stream("xp"), report
        # a single-stream method without refinement propagates X' only to report the error: timed apart
        with timer("propagate" if method.two_stream or cfg.refine else "error_tracking"):
            xp_next = self._propagate(comp, xp_stream, kwargs, check=f"the output of block {index}", replay=replay)
            report.output_rel_mse, report.output_cosine_distance = stream_error(dense_side.x_next, xp_next)
        return comp, dense_side.x_next, xp_next, report

    def _solve(self, index: int, plan: GroupPlan, stats: solvers.GroupStatistics, linears: dict,
               whitening: Optional[solvers.Whitening] = None) -> dict:
        """The factors of one group's compressed linears."""
        cfg, method = self.cfg, self.method
        weights = {name: linears[name].weight for name in plan.compressed}
        ranks = plan.ranks
        with self.timer("solve"):
            if method.diagonal == "fisher":  # a metric per linear, not per group
                return {name: solvers.solve_group(method, {name: W}, {name: ranks[name]}, solvers.GroupStatistics(
                    D=self.fisher[self._full(index, name)].to(self.device)), eps_rel=cfg.eps_rel,
                    dtype=self.dtype)[name] for name, W in weights.items()}
            return solvers.solve_group(method, weights, ranks, stats, eps_rel=cfg.eps_rel,
                                       beta_search=cfg.beta_search, beta_max=cfg.beta_max, dtype=self.dtype,
                                       whitening=whitening, residual_split=cfg.residual_split,
                                       residual_stage2=cfg.residual_stage2)

    def _solve_single_stream(self, index: int, plans: list[GroupPlan], statistics: dict, linears: dict) -> dict:
        """This process's groups (dealt round-robin), the whitened ones whitened in batches."""
        mine = [p for i, p in enumerate(plans) if distributed.owner(i) == self.rank and p.compressed]
        whitenings = {}
        if self.method.coefficients is not None:
            with self.timer("whitening"):
                whitenings = self._batched_whitening({p.first: statistics[p.first] for p in mine
                                                      if p.path.solve == "whitened"})
        solved = {p.first: self._solve(index, p, statistics.pop(p.first, solvers.GroupStatistics()), linears,
                                       whitenings.pop(p.first, None)) for p in mine}
        statistics.clear()
        return solved

    def _batched_whitening(self, statistics: dict) -> dict:
        """One batched whitening per metric size (q/k/v and gate/up of every group whiten together)."""
        by_size: dict[int, list] = defaultdict(list)
        for first, stats in statistics.items():
            H = solvers.combine_metric(self.method.coefficients, stats).to(self.dtype)
            by_size[H.shape[0]].append((first, H))
        out = {}
        for items in by_size.values():
            whites = solvers.whiten_many([H for _, H in items], self.cfg.eps_rel)
            out.update({first: w for (first, _), w in zip(items, whites)})
        return out

    def _install(self, comp: nn.Module, index: int, plan: GroupPlan, factors: Optional[dict], owner: int,
                 report: BlockReport) -> None:
        """Replace the group's compressed linears by factor pairs (the solving process shares them first)."""
        if not plan.compressed:  # the same on every process: no exchange either
            return
        factors = distributed.broadcast_factors(factors, plan.shapes, self.dtype, self.device, src=owner)
        for name, f in factors.items():
            old = comp.get_submodule(name)
            set_submodule(comp, name, LowRankLinear.from_factors(  # rounded as they will be stored
                f.U, f.V, None if old.bias is None else old.bias, dtype=self.storage_dtype).to(old.weight.dtype))
            self.ranks[self._full(index, name)] = f.rank
            if self.spectra is not None:
                self.spectra[self._full(index, name)] = f.sigma.detach().cpu()
            report.modules[name] = {"rank": f.rank, "truncation_loss": f.truncation_loss,
                                    "retained_energy": f.retained_energy, "beta": f.beta, "clamped": f.clamped}

    def _propagate(self, block: nn.Module, stream, kwargs: list, check: Optional[str] = None,
                   replay: Optional[TwoStreamReplay] = None):
        out_stream = self.store.stream("x")
        for b, (x, kw) in enumerate(zip(stream, kwargs)):
            with replay.replay(b, record=False) if replay else contextlib.nullcontext():
                out = run_block(block, x, kw, self.device)
            if check:
                check_finite(out, check)
            out_stream.append(out)
        return out_stream

    # -- the whole model -----------------------------------------------------------------
    def memory_plan(self, input_ids: torch.Tensor) -> memory.MemoryPlan:
        """The planned peak per device; raises MemoryBudgetError when `max_memory` cannot hold a block."""
        cfg = self.cfg
        per_rank = -(-input_ids.shape[0] // self.world)  # the largest shard: every rank plans (and fails) alike
        plan = memory.plan(self.source, self.method, device=cfg.device, offload=self.offload,
                           n_samples=per_rank, seqlen=input_ids.shape[1], batch_size=cfg.batch_size,
                           solve_dtype=self.dtype, track_error=cfg.track_error, refine=cfg.refine,
                           compute_dtype=self.compute_dtype)
        if cfg.max_memory:
            plan.check(memory.parse_budget(cfg.max_memory, cfg.device))
        return plan

    def prepare(self, input_ids: torch.Tensor, dense_model: Callable[[], nn.Module]) -> None:
        """Statistics that need the whole dense model at once: FWSVD's Fisher (gradients). `dense_model`
        is called only for such methods, and its model is dropped once they are collected."""
        if self.method.diagonal == "fisher":
            from lowrank_engine import fisher

            self.fisher = fisher.column_fisher(dense_model(), input_ids, device=self.device, progress=self.progress)

    def _say(self, text: str) -> None:
        if self.progress and self.rank == 0:
            tqdm.write(text)

    def run(self, input_ids: torch.Tensor) -> CompressionResult:
        start = time.perf_counter()
        if self.method.diagonal == "fisher" and self.fisher is None:
            raise ValueError("fwsvd needs Fisher statistics: call Compressor.prepare(input_ids, dense_model) first")
        plan = self.memory_plan(input_ids)  # before any work: a budget that cannot fit one block fails here
        done = self._finished_blocks(input_ids)  # fingerprints every window, before they are split over ranks
        input_ids = distributed.shard(input_ids)  # each rank streams its own windows
        self._say(plan.describe())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        spill = os.path.join(self.work_dir, "streams", f"rank{self.rank}") if self.work_dir else None
        self.store = streams.StreamStore(self.offload, self.device, spill)
        try:
            with reuse_freed_heap():
                result = self._run(input_ids, done, start)
        finally:
            self.store.close()
            for empty in (spill, os.path.dirname(spill)) if spill else ():
                try:
                    os.rmdir(empty)  # the parent only once no other rank still spills there
                except OSError:
                    pass
        measured = f"measured peak: cpu {result.peak_rss_mb / 1024:.2f} GiB (RSS)"
        if self.device.type == "cuda":
            measured += f", cuda {result.peak_gpu_mb / 1024:.2f} GiB"
        self._say(measured)
        if result.clamped:
            self._say(f"whitening clamped {sum(result.clamped.values())} eigenvalues in {len(result.clamped)} linears "
                      "(dead channels, or more features than calibration tokens): their factors are the optimum "
                      "of a regularized objective; more calibration tokens avoid it")
        return result

    def _run(self, input_ids: torch.Tensor, done: set, start: float) -> CompressionResult:
        src, cfg, timer = self.source, self.cfg, self.timer
        move_non_block_tensors(src.model, src.blocks_name, self.device)
        timer.block = {}
        with timer("capture"):
            x_stream = self.store.stream("x")
            block_kwargs = capture_block_inputs(src.model, src.blocks, input_ids, cfg.batch_size, self.device,
                                                x_stream)
        src.after_capture()
        needs_xp = self.method.two_stream or cfg.track_error or cfg.refine
        xp_stream = self.store.copy(x_stream, "xp") if needs_xp else self.store.stream("xp")
        show = self.progress and self.rank == 0
        bar = tqdm(range(len(src.blocks)), desc=f"{cfg.method} r={cfg.ratio}", unit="block", disable=not show)
        timer.bar = bar if show else None
        for index in bar:
            timer.block = {}
            with timer("load"):
                dense = src.materialize(index, self.device, self.compute_dtype)
            kwargs, block_kwargs[index] = block_kwargs[index], None  # this block's own, per batch
            if index in done:
                bar.set_postfix_str("resumed")
                comp, x_next, xp_next, report = self._replay_block(index, dense, x_stream, xp_stream, kwargs)
            else:
                comp, x_next, xp_next, report = self.compress_block(index, dense, x_stream, xp_stream, kwargs)
            x_stream.release()
            xp_stream.release()
            x_stream, xp_stream = x_next, xp_next
            if index not in done and self.resume_dir and self.rank == 0:  # every rank holds the same factors
                with timer("write"):  # after propagation: the stored report holds the block's error
                    self._write_block(index, comp, report)
            report.seconds = dict(timer.block)
            self.reports.append(report)
            del dense
            src.release(index, comp)
            del comp
            return_freed_memory()
            bar.set_postfix_str(f"rel_mse {report.output_rel_mse:.3g}")
        timer.bar = None
        peak_gpu = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else 0.0
        # the largest process's peak: every rank holds one block and its share of the streams
        return CompressionResult(ranks=dict(self.ranks), blocks=self.reports, seconds=time.perf_counter() - start,
                                 peak_rss_mb=distributed.all_reduce_max(peak_rss_mb()),
                                 peak_gpu_mb=distributed.all_reduce_max(peak_gpu), stage_seconds=dict(timer.total),
                                 spectra=self.spectra)

    # -- resume --------------------------------------------------------------------------
    def _finished_blocks(self, input_ids: torch.Tensor) -> set:
        if not self.resume_dir:
            return set()
        # rank 0 alone reads the state, so every rank replays the same blocks (no shared-FS races)
        done = None
        if self.rank == 0:
            fingerprint = workdir.run_fingerprint(self.cfg, input_ids, self.source.identity(), self.world)
            done = self.resume_dir.finished_blocks(fingerprint)
        return distributed.broadcast_object(done, src=0)

    def _write_block(self, index: int, comp: nn.Module, report: BlockReport) -> None:
        prefix = f"{self.source.blocks_name}.{index}."
        tensors = {prefix + k: v.to(self.storage_dtype) if v.dtype == self.compute_dtype else v
                   for k, v in comp.state_dict().items()}
        ranks = {prefix + n: m.rank for n, m in comp.named_modules() if isinstance(m, LowRankLinear)}
        self.resume_dir.write_block(index, tensors, ranks, asdict(report))

    @torch.no_grad()
    def _replay_block(self, index: int, dense: nn.Module, x_stream, xp_stream, kwargs):
        """A block finished by an earlier run: load its factors, then only propagate the streams."""
        tensors, ranks, report = self.resume_dir.read_block(index, self.device)
        prefix = f"{self.source.blocks_name}.{index}."
        comp = copy.deepcopy(dense)
        checkpoint.install_lowrank_modules(comp, {k[len(prefix):]: r for k, r in ranks.items()}, device=self.device)
        comp.load_state_dict({k[len(prefix):]: t for k, t in tensors.items()}, strict=True, assign=True)
        cast_parameters(comp, self.compute_dtype)
        self.ranks.update(ranks)
        return (comp, self._propagate(dense, x_stream, kwargs), self._propagate(comp, xp_stream, kwargs),
                BlockReport(**report))


def error_sums(x: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
    """float64 [‖X'−X‖², ‖X‖², Σ(1 − cos), tokens] of one batch (the parts of stream_error)."""
    a, b = x.double(), xp.to(x.device).double()
    cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)
    return torch.tensor([float(((b - a) ** 2).sum()), float((a ** 2).sum()), float((1 - cos).sum()), cos.numel()],
                        dtype=torch.float64)


def errors_from_sums(sums: torch.Tensor) -> tuple[float, float]:
    num, den, cos_sum, count = sums.tolist()
    return num / max(den, 1e-300), cos_sum / max(count, 1)


def stream_error(x: list, xp: list) -> tuple[float, float]:
    """Relative MSE ‖X'−X‖²/‖X‖² and mean per-token cosine distance between the streams (over all ranks)."""
    sums = torch.zeros(4, dtype=torch.float64)
    for a, b in zip(x, xp):
        sums += error_sums(a, b)
    return errors_from_sums(distributed.all_reduce_sum_tensor(sums))


def compress_model(model: nn.Module, input_ids: torch.Tensor, cfg: CompressionConfig,
                   work_dir: Optional[str] = None, progress: bool = True) -> CompressionResult:
    """Compress an in-memory HF causal LM in place."""
    model.eval()
    compressor = Compressor(BlockSource(model), cfg, work_dir=work_dir, progress=progress)
    compressor.prepare(input_ids, lambda: model)
    return compressor.run(input_ids)
