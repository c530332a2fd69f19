"""Every compression setting, defined once.

A field's default and help text live here; the CLI's flags, the job's spec (job.JobSpec extends this
class) and the quality benchmark's runs are all built from these fields, so a new setting is added in
one place. `validate` holds every check of a setting's value. `add_arguments` turns the fields of this
class (or of a subclass, such as job.JobSpec) into argparse flags, and `from_arguments` reads them back.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from lowrank_engine import solvers


def setting(default: Any = None, help: str = "", *, factory=None, **cli) -> Any:
    """A dataclass field with its help text and how the CLI offers it (see `add_arguments`):

    flag          the flag's name when it is not --<field-name> (a True-by-default bool's flag turns it off,
                  e.g. --no-track-error)
    cli=False     not a flag
    choices       the allowed values, or a callable giving them when the parser is built
    nargs, const, metavar, type   as in argparse (type defaults to the field's annotation)
    from_cli      turns the parsed value into the field's value (e.g. a file name into its contents); its
                  ValueError is the CLI's one-line error
    cli_default   a callable giving the CLI's default where it differs from the field's (the device)
    default_help  the default as the help shows it, where the value itself says little
    """
    metadata = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def redefault(cls, name: str, default: Any) -> Any:
    """A subclass's field with another default and `cls`'s help and CLI options (defined once, there)."""
    return field(default=default, metadata=cls.__dataclass_fields__[name].metadata)


def read_rank_map(path: str) -> dict:
    """A rank map file: JSON {module name: rank, or null to keep the module dense}."""
    try:
        with open(path, encoding="utf-8") as f:
            rank_map = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read rank map {path}: {exc}") from exc
    if not isinstance(rank_map, dict) or not all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                                                 for v in rank_map.values()):
        raise ValueError(f"rank map {path} must be a JSON object of module name → integer rank (null: keep dense)")
    return rank_map


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _method_choices() -> list:
    from lowrank_engine import job  # presets compose job stages (rank allocation); the CLI offers them too

    return sorted(solvers.METHODS) + sorted(job.PRESETS)


@dataclass
class CompressionConfig:
    cli_title = "compression settings"  # the CLI's heading of these flags (not a field)

    method: str = setting("saes", "compression objective, or a preset of the engine's stages (best: svd-llm + block "
                                  "refinement + model distillation; see job.PRESETS)", choices=_method_choices)
    ratio: Optional[float] = setting(0.2, "fraction of the compressible-linear parameters REMOVED, in (0, 1)")
    rank_map: Optional[dict] = setting(
        None, "JSON file {module name: rank, or null to keep it dense}; overrides --ratio and --rank-alloc for the "
              "modules it names", type=str, metavar="FILE", from_cli=read_rank_map)
    beta_search: str = setting("exact", "saes only: ACES β search, exact 1-D search or fixed-subspace closed form",
                               choices=sorted(solvers.BETA_SEARCHES))
    beta_max: float = setting(solvers.BETA_MAX, "saes only: the largest β searched", cli=False)
    eps_rel: float = setting(1e-6, "whitening: eigenvalues below eps_rel × the largest are clamped", cli=False)
    device: str = setting("cpu", "compute device", cli_default=default_device)
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
                                      "methods propagate the compressed stream only for it (its seconds count in "
                                      "compress_seconds); the factors are the same without it",
                                flag="--no-track-error")
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
    refine_dense_lr_ratio: float = setting(0.0, "the linears the rank allocation kept dense also train (refinement and "
                                                "distillation), at this fraction of the learning rate; 0 = frozen",
                                           flag="--refine-dense-lr")
    refine_tokens: Optional[int] = setting(None, "token budget per pass (default: every calibration token); keeps "
                                                 "refinement cheap on a CPU")
    refine_micro_batch: Optional[int] = setting(None, "calibration windows per optimizer step (default: --batch-size); "
                                                      "smaller takes more steps for the same compute")
    # model distillation after the last block (distill.py); refinement's schedule, decay, clip and micro-batch
    distill_passes: int = setting(0, "passes of whole-model distillation over the calibration windows after the last "
                                     "block: every factor and norm is tuned so that the next-token distribution "
                                     "matches the dense model's (KL); needs both whole models in memory; 0 = off")
    distill_lr: float = setting(1e-4, "peak learning rate of distillation")

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
                or (self.refine_tokens is not None and self.refine_tokens < 1)
                or self.distill_passes < 0 or self.distill_lr <= 0 or not self.refine_dense_lr_ratio >= 0):
            raise ValueError("bad refinement settings: " + ", ".join(
                f"{n}={getattr(self, n)}" for n in ("refine_passes", "refine_lr", "refine_warmup", "refine_clip",
                                                    "refine_micro_batch", "refine_tokens", "distill_passes",
                                                    "distill_lr", "refine_dense_lr_ratio")))

    def compression(self) -> "CompressionConfig":
        """The compression settings alone, as a plain CompressionConfig (of a job.JobSpec: what the pipeline runs)."""
        return CompressionConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CompressionConfig)})


# --------------------------------------------------------------------------------------
# the fields as command-line flags
# --------------------------------------------------------------------------------------
def field_type(cls, name: str):
    """A field's type without Optional: int, float, str, bool, tuple, dict, ..."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    return typing.get_origin(hint) or hint


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def cli_fields(cls) -> list:
    """The fields of `cls` that are flags."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def cli_default(f: dataclasses.Field) -> Any:
    """The value a field takes when its flag is not given."""
    make = f.metadata.get("cli_default")
    return make() if make else field_default(f)


def add_arguments(parser: argparse.ArgumentParser, cls, only=None) -> None:
    """One flag per field of `cls` (all of them, or those named in `only`). A bool field is a bare flag that
    flips its default (False: --name; True: its `flag`, e.g. --no-track-error); every other field takes a value
    of its annotated type. Flags default to argparse.SUPPRESS, so that the parsed namespace holds exactly the
    flags given (`from_arguments` reads them); each help line shows the default itself."""
    groups = {}
    if only is None:  # the flags of each class under its own heading, the most derived class's first
        for klass in cls.__mro__:
            if dataclasses.is_dataclass(klass) and "cli_title" in vars(klass):
                groups[klass] = parser.add_argument_group(klass.cli_title)
    for f in cli_fields(cls):
        if only is not None and f.name not in only:
            continue
        meta, default = f.metadata, cli_default(f)
        kind = field_type(cls, f.name)
        options = {"dest": f.name, "default": argparse.SUPPRESS}
        suffix = ""
        if kind is bool:
            options["action"] = "store_false" if default else "store_true"
            shown = None
            if default:
                if "flag" not in meta:
                    raise TypeError(f"{cls.__name__}.{f.name}: a setting on by default needs the flag that turns it "
                                    "off (flag='--no-...')")
                suffix = f" (on by default; {flag_name(f)} turns it off)"
        else:
            options["type"] = meta.get("type") or kind
            if options["type"] not in (int, float, str):
                raise TypeError(f"{cls.__name__}.{f.name}: a {kind} field needs a type= and from_cli= to be a flag")
            for key in ("nargs", "const", "metavar"):
                if key in meta:
                    options[key] = meta[key]
            choices = meta.get("choices")
            if choices is not None:
                options["choices"] = list(choices() if callable(choices) else choices)
            shown = meta.get("default_help", default)
        text = meta.get("help", "") + suffix
        if shown is not None:
            text += f" (default: {shown})"
        options["help"] = text.replace("%", "%%")
        # under the heading of the class that defines it first (a subclass may give it another default)
        owner = next((k for k in reversed(groups) if f.name in vars(k).get("__annotations__", {})), None)
        (groups[owner] if owner is not None else parser).add_argument(flag_name(f), **options)


def from_arguments(cls, namespace: argparse.Namespace, only=None) -> tuple[dict, set]:
    """(field values, the names of the fields whose flags were given) from a namespace parsed with the flags of
    `add_arguments`; a field whose flag was not given takes its CLI default only where that differs from the
    field's (`cli_default`), else it is left out, so that cls(**values) has the field's own default."""
    values = {}
    for f in cli_fields(cls):
        if (only is None or f.name in only) and hasattr(namespace, f.name):
            value = getattr(namespace, f.name)
            convert = f.metadata.get("from_cli")
            values[f.name] = convert(value) if convert is not None and value is not None else value
    explicit = set(values)
    for f in cli_fields(cls):
        if (only is None or f.name in only) and f.name not in values and "cli_default" in f.metadata:
            values[f.name] = f.metadata["cli_default"]()
    return values, explicit
