"""Every compression setting, defined once.

A field's default and help text live here; the CLI's flags, the job's spec (job.JobSpec extends this
class) and the quality benchmark's runs are all built from these fields, so a new setting is added in
one place. `validate` holds every check of a setting's value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from lowrank_engine import solvers


def setting(default: Any = None, help: str = "", *, factory=None, **cli) -> Any:
    """A dataclass field with its help text and argparse options (`choices`, `flag`, `cli=False`)."""
    metadata = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class CompressionConfig:
    method: str = setting("saes", "compression objective (or a preset of the engine's stages, see job.PRESETS)")
    ratio: Optional[float] = setting(0.2, "fraction of the compressible-linear parameters REMOVED, in (0, 1)")
    rank_map: Optional[dict] = setting(
        None, "JSON file {module name: rank, or null to keep it dense}; overrides --ratio and --rank-alloc for the "
              "modules it names")
    beta_search: str = setting("exact", "saes only: ACES β search, exact 1-D search or fixed-subspace closed form",
                               choices=sorted(solvers.BETA_SEARCHES))
    beta_max: float = setting(solvers.BETA_MAX, "saes only: the largest β searched", cli=False)
    eps_rel: float = setting(1e-6, "whitening: eigenvalues below eps_rel × the largest are clamped", cli=False)
    device: str = setting("cpu", "compute device")
    offload: str = setting("none", "where the two activation streams live: on the compute device, in pinned CPU "
                                   "memory, or memory-mapped files in <output>.partial ($TMPDIR with --no-save), one "
                                   "batch resident at a time; a bare --offload means cpu",
                           choices=["none", "cpu", "disk"], nargs="?", const="cpu")
    batch_size: int = setting(8, "calibration windows per forward")
    solve_dtype: Optional[str] = setting(None, "precision of whitening and SVD (default float64 on CPU, float32 on GPU)",
                                         choices=["float32", "float64"])
    compute_dtype: Optional[str] = setting(
        None, "precision the blocks run in (default: the checkpoint's; float32 on CPU for bf16/fp16 checkpoints, "
              "whose CPU GEMMs are ~100x slower); factors are written in the checkpoint's",
        choices=["float32", "bfloat16", "float16"])
    track_error: bool = setting(True, "report each block's output error against the dense model; single-stream "
                                      "methods propagate the compressed stream only for it (--no-track-error skips "
                                      "that pass; the factors are the same)", flag="--no-track-error")
    max_memory: Optional[str] = setting(
        None, "memory budget, e.g. 20GiB (compute device) or cuda:60GiB,cpu:24GiB; the run stops before any work "
              "when the planned peak of one block does not fit")
    residual_split: float = setting(solvers.RESIDUAL_SPLIT, "erc-svd only: share of each rank given to stage 1 (the rest compensates "
                                          "the residual)")
    residual_stage2: str = setting(solvers.RESIDUAL_STAGE2, "erc-svd only: the objective of the residual stage (aa-svd: WX − W₁X' "
                                             "on X')", choices=list(solvers.RESIDUAL_STAGE2_METHODS))
    # block refinement (AA-SVD stage 2); the defaults are the published ones
    refine: bool = setting(False, "AA-SVD stage 2 after any method: tune each block's factors and norms to match the "
                                  "dense block's output (AdamW, warm-up then cosine decay, gradient clipping)")
    refine_passes: int = setting(25, "passes over the calibration set per block")
    refine_lr: float = setting(1e-4, "peak learning rate")
    refine_weight_decay: float = setting(0.01, "AdamW weight decay of the factors (norm weights get none)")
    refine_warmup: float = setting(0.1, "fraction of steps with linear warm-up")
    refine_final_lr_ratio: float = setting(0.1, "final learning rate as a fraction of the peak", flag="--refine-final-lr")
    refine_clip: float = setting(1.0, "gradient-norm clip")
    refine_tokens: Optional[int] = setting(None, "token budget per pass (default: every calibration token); keeps "
                                                 "refinement cheap on a CPU")
    refine_micro_batch: Optional[int] = setting(None, "calibration windows per optimizer step (default: --batch-size); "
                                                      "smaller takes more steps for the same compute")

    def validate(self) -> None:
        """One line naming the bad setting; called before any work or output."""
        solvers.get_method(self.method)
        if self.ratio is None and not self.rank_map:
            raise ValueError("give a ratio or a rank map")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1) (fraction of parameters removed), got {self.ratio}")
        if self.beta_search not in solvers.BETA_SEARCHES:
            raise ValueError(f"unknown beta search {self.beta_search!r}; choose {', '.join(solvers.BETA_SEARCHES)}")
        if not 0.0 < self.residual_split <= 1.0:
            raise ValueError(f"residual split must be in (0, 1], got {self.residual_split}")
        if self.residual_stage2 not in solvers.RESIDUAL_STAGE2_METHODS:
            raise ValueError(f"the residual stage's objective is aa-svd or shift-aware, got {self.residual_stage2!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if (self.refine_passes < 0 or self.refine_lr <= 0 or not 0 <= self.refine_warmup < 1 or self.refine_clip <= 0
                or (self.refine_micro_batch is not None and self.refine_micro_batch < 1)
                or (self.refine_tokens is not None and self.refine_tokens < 1)):
            raise ValueError("bad refinement settings: " + ", ".join(
                f"{n}={getattr(self, n)}" for n in ("refine_passes", "refine_lr", "refine_warmup", "refine_clip",
                                                    "refine_micro_batch", "refine_tokens")))
