"""Quality benchmark on the DESIGN §4 protocol ("smollm2-cpu-v1").

SmolLM2-135M-Instruct (fp32, dequantized from the packaged GGUF), 64×512 C4 calibration
windows (seed 0), WikiText-2 (128 windows) and C4 (64 windows) perplexity at 512 tokens.
Every configuration runs in its own process, so its peak RSS is its own, through the job code of
`lowrank-engine compress` (job.run_job): row_spec defines each row's JobSpec in one place and the
child reads it as JSON, so every setting the CLI has reaches the benchmark unchanged. The per-block
error report stays on (the layer-error plot needs it) and its seconds count in compress_seconds, as
they do for a user of the CLI. Finished configurations are cached in --runs-dir, so an interrupted
benchmark resumes; a cached row whose resolved settings (job.settings) differ from what its label resolves
to now, after a preset or a default changed, runs again.

    python benchmarks/quality.py                       # the full table
    python benchmarks/quality.py --quick               # minutes on 2 cores: 8 of 30 blocks (CI smoke test)
    python benchmarks/quality.py --memory              # peak RSS: SmolLM2 vs a 4x deeper random model

Writes quality.md, quality.json and quality_layer_error.png to --out-dir.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from lowrank_engine import config, data, job  # first: it sets the OpenMP wait before torch

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOCOL = "smollm2-cpu-v1"
DENSE_REFERENCE = {"wikitext2_ppl": 30.47, "c4_ppl": 34.71}
PEERS = {  # the published AA-SVD code on this protocol (WikiText-2 / C4)
    "svd-llm": {0.2: (211.4, 138.4), 0.4: (1201.8, 505.0), 0.6: (4339.6, 1706.7)},
    "aa-svd": {0.2: (301.2, 174.2), 0.4: (706.3, 333.6), 0.6: (1943.9, 834.1)},
    "aa-svd+refine": {0.4: (491.5, 250.6), 0.6: (1210.0, 606.7)},  # the peer's 3 refinement passes
}
PEER_SECONDS = {"svd-llm": {0.4: 64}, "aa-svd": {0.4: 251}, "aa-svd+refine": {0.4: 567}}  # compression wall time
# the peer's code re-run by us on a named machine, so that its seconds and ours come from the same one
PEER_RUNS_FILE = os.path.join(HERE, "results", "peer_runs.json")
DEFAULT_METHODS = "svd,asvd,fwsvd,svd-llm,shift-aware,aa-svd,aa-svd+refine,erc-svd,saes,saes:fixed"


MODIFIERS = ("refine", "waterfill")
# The ingredients of `best`, each on and off at ABLATION_RATIO:
# (row label, anchored objective, rank allocation, block refinement, model distillation). Rows that vary `best`
# name every setting they change, so a label means the same composition whatever the preset holds now.
ABLATION_RATIO = 0.4
PER_WINDOW = "per-window steps, lr 1e-3"
_BEST = job.preset_fields("best", ABLATION_RATIO)
_BEST_REFINE = f"{PER_WINDOW}, {_BEST['refine_passes']} passes"
_BEST_DISTILL = f"{_BEST['distill_passes']} passes, lr {_BEST['distill_lr']:.0e}".replace("e-0", "e-")  # 1e-4
_BEST_RANKS = _BEST["rank_alloc"]
_LOWEST = job.expand_preset(job.JobSpec(model="", method="best", ratio=None))  # below its first from_ratio
_UNIFORM = "@rank_alloc=uniform"
ABLATION = (
    ("svd-llm", "off", "uniform", "off", "off"),
    ("svd-llm@distill_passes=1", "off", "uniform", "off", "1 pass, lr 1e-4"),
    ("aa-svd", "on", "uniform", "off", "off"),
    ("aa-svd+refine", "on", "uniform", "published: one step per 8-window batch, lr 1e-4", "off"),
    ("best@method=aa-svd@refine_passes=3@distill_passes=0" + _UNIFORM, "on", "uniform", PER_WINDOW + ", 3 passes", "off"),
    ("best@refine_passes=3@distill_passes=0" + _UNIFORM, "off", "uniform", PER_WINDOW + ", 3 passes", "off"),
    ("best@refine_passes=1@distill_passes=1" + _UNIFORM, "off", "uniform", PER_WINDOW + ", 1 pass", "1 pass, lr 1e-4"),
    ("best@refine_passes=3@distill_passes=1" + _UNIFORM, "off", "uniform", PER_WINDOW + ", 3 passes", "1 pass, lr 1e-4"),
    ("best@distill_passes=0" + _UNIFORM, "off", "uniform", _BEST_REFINE, "off"),
    ("best" + _UNIFORM, "off", "uniform", _BEST_REFINE, _BEST_DISTILL),
    ("best@rank_alloc=type-waterfill", "off", "type-waterfill", _BEST_REFINE, _BEST_DISTILL),
    ("best", "off", _BEST_RANKS, _BEST_REFINE, _BEST_DISTILL),
    # the matrices the allocation keeps dense: the other choice than `best`'s at this ratio
    (f"best@refine_dense_lr_ratio={0.1 if _BEST['refine_dense_lr_ratio'] == 0 else 0.0}", "off", _BEST_RANKS,
     _BEST_REFINE, _BEST_DISTILL),
)
# the starts of refinement compared at each ratio on the selection windows (job.PRESETS["best"]'s method),
# with 3 refinement passes, no distillation and uniform ranks
START_CHOICE = ("best@refine_passes=3@distill_passes=0" + _UNIFORM,
                "best@method=aa-svd@refine_passes=3@distill_passes=0" + _UNIFORM)
QUICK_BLOCKS = 8  # --quick keeps SmolLM2's first 8 blocks: the per-linear solves, not the tokens, set its time


def truncated_checkpoint(spec: str, blocks: int, directory: str) -> str:
    """A copy of `spec` with only its first `blocks` decoder blocks, saved to `directory`."""
    import torch

    from lowrank_engine import models

    model, tokenizer = models.load_model(spec)
    name, layers = models.find_decoder_blocks(model)
    if not 0 < blocks <= len(layers):
        raise SystemExit(f"--blocks must be in 1..{len(layers)}, got {blocks}")
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, torch.nn.ModuleList(layers[:blocks]))
    model.config.num_hidden_layers = blocks
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:blocks]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def row_fields(label: str) -> tuple[dict, dict]:
    """The JobSpec fields a row label names, and its overrides: 'saes:fixed' → saes with the fixed β search;
    '+refine' and '+waterfill' add refinement and water-filled ranks; a preset name ('best') stays the
    method; '@field=value' (repeatable) overrides any JobSpec field after the preset is expanded, for
    ablations: 'best@method=svd-llm' is the best preset started from svd-llm."""
    label, *overrides = label.split("@")
    base, *modifiers = label.split("+")
    for modifier in modifiers:
        if modifier not in MODIFIERS:
            raise ValueError(f"unknown modifier +{modifier} in {label}; choose from {', '.join(MODIFIERS)}")
    method, _, search = base.partition(":")
    fields = {"method": method}
    if search:
        fields["beta_search"] = search
    if "refine" in modifiers:
        fields["refine"] = True
    if "waterfill" in modifiers:
        fields["rank_alloc"] = "waterfill"
    known, values = {f.name for f in dataclasses.fields(job.JobSpec)}, {}
    for override in overrides:
        name, sep, text = override.partition("=")
        if not sep or name not in known:
            raise ValueError(f"cannot read @{override} in a row label: write @field=value with a JobSpec field")
        kind = config.field_type(job.JobSpec, name)
        values[name] = (text.lower() in ("1", "true", "yes")) if kind is bool else kind(text)
    return fields, values


def label_spec(spec: job.JobSpec, fields: dict, overrides: dict) -> job.JobSpec:
    """`spec` with its label's preset expanded (filling what the label does not set), then its overrides."""
    return dataclasses.replace(job.expand_preset(spec, explicit=set(fields) | set(overrides)), **overrides)


def row_spec(args, label: str, ratio: float, output: str | None = None) -> job.JobSpec:
    """The one definition of a row's job: the protocol's calibration and evaluation, the label's method (its
    preset expanded), the model kept in memory and evaluated. Every other setting is the JobSpec default, so a
    new setting reaches the benchmark without touching it. With `output` (the memory protocol) the blocks
    stream to disk there and nothing is evaluated. The per-block error report stays on (the layer-error plot
    needs it), so compress_seconds include it."""
    fields, overrides = ({}, {}) if label == "dense" else row_fields(label)
    if label != "dense":
        fields["ratio"] = ratio
    if fields.get("refine"):
        fields["refine_passes"] = args.refine_passes
    spec = job.JobSpec(model=args.model, calibration="c4", nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                       eval_sets=("wikitext2", "c4", data.SELECTION_SET), eval_seqlen=args.eval_seqlen,
                       eval_windows={"wikitext2": args.wikitext_windows, "c4": args.c4_windows,
                                     data.SELECTION_SET: args.selection_windows},
                       batch_size=args.batch_size, device=args.device, save=False, fidelity_samples=0, plot=False,
                       progress=not args.quiet, track_error=True, **fields)
    if output is not None:
        spec = dataclasses.replace(spec, save=True, output=output, eval_sets=())
    return spec if label == "dense" else label_spec(spec, fields, overrides)  # dense: no preset to expand


def kept_checkpoint(directory: str, label: str, ratio: float) -> str:
    return os.path.join(directory, f"{label}_{ratio}")


def row_job(args, label: str, ratio: float) -> job.JobSpec:
    """The row's job as the table runs it: row_spec, saving its checkpoint under --keep-checkpoints (then the
    job evaluates the saved checkpoint, as `lowrank-engine compress --output` does)."""
    spec = row_spec(args, label, ratio)
    if args.keep_checkpoints and label != "dense":
        spec = dataclasses.replace(spec, save=True, output=kept_checkpoint(args.keep_checkpoints, label, ratio))
    return spec


def write_spec(spec: job.JobSpec, path: str) -> None:
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(spec), f)


def read_spec(path: str) -> job.JobSpec:
    with open(path) as f:
        return job.JobSpec(**json.load(f))


def device_name() -> str:
    import torch

    from lowrank_engine.report import device_name as name

    return name("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------
# one configuration (runs in a child process)
# --------------------------------------------------------------------------------------
def run_one(label: str, spec: job.JobSpec, protocol: str) -> dict:
    """The row's record: the job run by job.run_job, as `lowrank-engine compress` runs it; the dense row
    evaluates the uncompressed model through the same evaluation code (job.evaluate)."""
    import torch

    from lowrank_engine import models

    record = {"method": label, "ratio": 0.0 if label == "dense" else spec.ratio, "protocol": protocol,
              "device": device_name(), "calibration": f"{spec.calibration} {spec.nsamples}x{spec.seqlen} seed {spec.seed}",
              "threads": torch.get_num_threads(), "refine_passes": spec.refine_passes if spec.refine else None,
              "distill_passes": spec.distill_passes,
              "saved": spec.save, "start": spec.method}  # the closed form a preset starts from
    if spec.preset:
        record["tuning"] = {k: getattr(spec, k) for k in job.PRESETS[spec.preset].get("tuning", {})}
    if label == "dense":
        model, tokenizer = models.load_model(models.resolve_model_path(spec.model),
                                             trust_remote_code=spec.trust_remote_code)
        record.update(compress_seconds=0.0, peak_rss_mb=None, **job.evaluate(model.to(spec.device), tokenizer, spec))
        return record
    result = job.run_job(spec)
    betas = list(result.pop("betas").values())
    record.update({k: v for k, v in result.items() if k not in record and k not in ("model", "output")})
    record.update(compress_seconds=round(result["compress_seconds"], 1), peak_rss_mb=round(result["peak_rss_mb"], 1),
                  stage_seconds={k: round(v, 1) for k, v in result["stage_seconds"].items()})
    if betas:
        record["beta_mean"] = sum(betas) / len(betas)
    return record


# --------------------------------------------------------------------------------------
# the table (parent process)
# --------------------------------------------------------------------------------------
def run_child(label: str, spec: job.JobSpec, protocol: str) -> dict:
    """Run one row in its own process (so that its peak RSS is its own); the job goes to it as JSON."""
    with tempfile.TemporaryDirectory(prefix="lowrank-quality-row-") as tmp:
        spec_file, record_file = os.path.join(tmp, "spec.json"), os.path.join(tmp, "record.json")
        write_spec(spec, spec_file)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", label, "--spec", spec_file,
                               "--protocol", protocol, "--record", record_file])
        if proc.returncode != 0:
            raise SystemExit(f"[quality] {label} ratio {spec.ratio} failed with exit code {proc.returncode}")
        with open(record_file) as f:
            return json.load(f)


def run_configs(args, configs: list) -> list:
    os.makedirs(args.runs_dir, exist_ok=True)
    records = []
    for method, ratio in configs:
        spec = row_job(args, method, ratio)
        base, *overrides = method.split("@")
        label = base.replace(":", "-") + (f"{spec.refine_passes}" if spec.refine else "") + \
            (f"-distill{spec.distill_passes}" if spec.distill_passes else "") + "".join("@" + o for o in overrides)
        cache = os.path.join(args.runs_dir, f"{args.protocol}_{label}_{ratio}.json")
        settings = job.settings(spec)  # a cached row is reused while the job it ran is this one
        if os.path.exists(cache):
            with open(cache) as f:
                cached = json.load(f)
            changed = job.changed_settings(cached.get("settings", {}), settings)
            if not changed:
                records.append(cached)
                continue
            print(f"[quality] {method} ratio {ratio}: the cached row ran with other settings "
                  f"({', '.join(changed)}); running it again", flush=True)
        print(f"[quality] {method} ratio {ratio} ...", flush=True)
        start = time.time()
        record = run_child(method, spec, args.protocol)
        record["wall_seconds"] = round(time.time() - start, 1)
        record["settings"] = settings
        with open(cache, "w") as f:
            json.dump(record, f)
        records.append(record)
        print(f"[quality] {method} {ratio}: wikitext2 {record['wikitext2_ppl']:.2f}  c4 {record['c4_ppl']:.2f}  "
              f"({record['compress_seconds']} s)", flush=True)
    return records


def cached_records(args) -> list:
    """Every finished configuration of this protocol (earlier invocations included), in table order."""
    records = []
    for name in os.listdir(args.runs_dir):
        if name.startswith(args.protocol + "_") and name.endswith(".json"):
            with open(os.path.join(args.runs_dir, name)) as f:
                records.append(json.load(f))
    order = {m: i for i, m in enumerate(["dense", "svd", "asvd", "fwsvd", "svd-llm", "shift-aware", "aa-svd",
                                               "aa-svd+refine", "erc-svd", "saes", "saes:fixed", "best"])}
    return sorted(records, key=lambda r: (r["ratio"] if r["method"] != "dense" else -1, order.get(r["method"], 99)))


def load_peer_runs(path: str = PEER_RUNS_FILE) -> list:
    """The peer's measured runs (peer_runs.json): one record per method, ratio and machine."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        runs = json.load(f)
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ValueError(f"{path}: expected a list of records")
    return runs


def find_record(records, protocol: str, device: str, method: str, ratio: float, refine_passes) -> dict | None:
    """The record of this row on this machine, or None. A record without refine_passes (a method that
    does not refine) matches any pass count; one with them matches only its own."""
    for r in records:
        if not isinstance(r, dict):  # quality.json (the whole table) when it shares the records' folder
            continue
        passes = r.get("refine_passes")
        if (r.get("protocol") == protocol and r.get("device") == device and r.get("method") == method
                and abs(r.get("ratio", -1) - ratio) < 1e-9 and (passes is None or passes == refine_passes)):
            return r
    return None


def side_by_side(records: list, runs: list) -> list:
    """Rows that both the engine and the peer's code ran on the same machine."""
    rows = []
    for r in records:
        peer = find_record(runs, r.get("protocol"), r.get("device"), r["method"], r["ratio"], r.get("refine_passes"))
        if peer and r.get("compress_seconds"):
            rows.append({"method": r["method"], "ratio": r["ratio"], "refine_passes": r.get("refine_passes"),
                         "compress_seconds": r["compress_seconds"], "peer_compress_seconds": peer["compress_seconds"],
                         "peer_diagnostic_seconds": peer.get("diagnostic_seconds"),
                         "speedup": peer["compress_seconds"] / r["compress_seconds"],
                         "wikitext2_ppl": r.get("wikitext2_ppl"), "peer_wikitext2_ppl": peer.get("wikitext2_ppl"),
                         "c4_ppl": r.get("c4_ppl"), "peer_c4_ppl": peer.get("c4_ppl"), "device": r["device"]})
    return rows


def error_report(record: dict) -> str | None:
    """Whether a row's compress_seconds include the per-block error report: on / off (the run's setting), or
    excluded (older records that timed a single-stream method's X' pass apart, as error_tracking_seconds).
    Records older still timed everything, and two-stream methods measure the error on streams they
    propagate anyway (error_tracking_seconds 0): on. The dense row compresses nothing (None)."""
    if "track_error" in record:
        return "on" if record["track_error"] else "off"
    if record.get("method") == "dense":
        return None
    return "excluded" if record.get("error_tracking_seconds") else "on"


def kept_dense(record: dict) -> str:
    """What refinement did to the matrices the allocation kept dense ('-' where it keeps none)."""
    settings = record.get("settings") or {}
    if settings.get("rank_alloc") != "type-waterfill-dense":
        return "-"
    lr_ratio = settings.get("refine_dense_lr_ratio") or 0.0  # records from before the setting: frozen
    return f"trained, {lr_ratio:g}× lr" if lr_ratio else "frozen"


def ablation_rows(flat: list) -> list:
    """The ablation table's rows that were measured: +refine rows with the peer's 3 refinement passes, a
    preset's rows with the passes the preset or their label sets."""
    rows = []
    for name, anchored, ranks, refinement, distillation in ABLATION:
        for r in flat:
            passes_ok = r.get("refine_passes") in (None, 3) or name.partition("@")[0] in job.PRESETS
            if r["method"] == name and abs(r["ratio"] - ABLATION_RATIO) < 1e-9 and passes_ok:
                rows.append({**r, "anchored": anchored, "ranks": ranks, "refinement": refinement,
                             "distillation": distillation})
    return rows


def write_outputs(args, records: list) -> None:
    from lowrank_engine.report import format_table, plot_layer_errors, write_json

    os.makedirs(args.out_dir, exist_ok=True)
    flat = []
    for r in records:
        flat.append({k: r.get(k) for k in ("method", "ratio", "wikitext2_ppl", "c4_ppl", "compress_seconds",
                                           "error_tracking_seconds", "peak_rss_mb", "protocol", "device", "calibration", "beta_mean",
                                           "refine_passes", "stage_seconds")})
        flat[-1]["selection_ppl"] = r.get(f"{data.SELECTION_SET}_ppl")
        flat[-1]["start"] = r.get("start")  # the closed form refinement started from (records since c4-select)
        flat[-1]["error_report"] = error_report(r)
        flat[-1]["kept_dense"] = kept_dense(r)
        flat[-1]["code"] = "current" if "track_error" in r else "older"  # job.run_job records say track_error
        if "track_error" in r:  # the error report's share of compress_seconds (single-stream methods)
            flat[-1]["error_tracking_seconds"] = (r.get("stage_seconds") or {}).get("error_tracking")
        like_for_like = r.get("protocol") == PROTOCOL and r.get("refine_passes") in (None, 3)  # the peer refined 3 passes
        peer = PEERS.get(r["method"], {}).get(r["ratio"]) if like_for_like else None
        if peer:
            flat[-1]["peer_wikitext2_ppl"], flat[-1]["peer_c4_ppl"] = peer
            flat[-1]["peer_compress_seconds"] = PEER_SECONDS.get(r["method"], {}).get(r["ratio"])
    write_json(flat, os.path.join(args.out_dir, "quality.json"))
    ablation, flat_all = ablation_rows(flat), flat
    # ablation variants have their own table (at its ratio; elsewhere they are the only record of a row)
    flat = [r for r in flat if "@" not in r["method"] or abs(r["ratio"] - ABLATION_RATIO) > 1e-9]
    columns = ("method", "ratio", "refine_passes", "wikitext2_ppl", "c4_ppl", "peer_wikitext2_ppl", "peer_c4_ppl",
               "compress_seconds", "error_report", "peer_compress_seconds", "peak_rss_mb")
    devices = list(dict.fromkeys(r["device"] for r in flat if r.get("device"))) or ["?"]
    if len(devices) > 1:  # seconds of different machines side by side: say which is which
        columns = columns + ("device",)
    table = format_table(flat, columns)
    print("\n" + table)
    device = devices[0] if len(devices) == 1 else "see the device column"
    md = [f"# Quality: protocol {args.protocol}", "",
          f"Model {getattr(args, 'model_label', args.model)}; calibration C4 {args.nsamples}×{args.seqlen} (seed {args.seed}); "
          f"WikiText-2 {args.wikitext_windows} and C4 {args.c4_windows} windows of {args.eval_seqlen} tokens. "
          f"Ratio = fraction of compressible-linear parameters removed. Device: {device}. "
          f"Dense reference (DESIGN §4): {DENSE_REFERENCE['wikitext2_ppl']} / {DENSE_REFERENCE['c4_ppl']}. "
          "peer_* columns: the published AA-SVD code on the same protocol, as the issue quotes it; its "
          "peer_compress_seconds come from another 2-core machine (the side-by-side table below times the peer's "
          "code on the engine's machine). saes:fixed = ACES fixed-subspace β. "
          f"best = the `best` preset (svd-llm with {_LOWEST.rank_alloc} ranks, then refinement with one step "
          f"per window at lr 1e-3, {_LOWEST.refine_passes} passes, then model distillation: "
          f"{_LOWEST.distill_passes} passes, kept dense matrices trained at "
          f"{_LOWEST.refine_dense_lr_ratio}× the lr"
          + "".join(f"; from ratio {threshold}: " + ", ".join(f"{k} {v}" for k, v in changes.items())
                    for threshold, changes in sorted(job.PRESETS["best"].get("from_ratio", {}).items()))
          + "); "
          "best@field=value rows are it with those settings changed (best@distill_passes=0: without "
          "distillation; best@method=aa-svd: started from aa-svd; best@rank_alloc=uniform: the same ratio in "
          "every matrix; best@rank_alloc=type-waterfill: no type kept dense). "
          "Every row runs through the job code of `lowrank-engine compress` (job.run_job) with the per-block error "
          "report on, since the plot below needs it. compress_seconds are what a user waits for from the start of "
          "compression to the last factor: rank allocation, FWSVD's Fisher pass and the error report included "
          "(error_report on). For single-stream methods the report is an extra X' pass; quality.json gives its "
          "share as error_tracking_seconds and every stage in stage_seconds (`--no-track-error` skips it). Rows "
          "marked excluded were timed by older code that left that share out of compress_seconds; two-stream "
          "methods measure the error on streams they propagate anyway, so nothing was ever left out of theirs. "
          "floor.md (benchmarks/floor.py) "
          "times each method's matrix products alone on the same machine: the seconds no implementation goes below."
          + (" Records whose device names no CPU model predate it: they were timed on more than one 2-core VM "
             "(the same GEMMs ran 2.1× apart on them), so their compress_seconds compare only roughly."
             if any(re.fullmatch(r"cpu \(\d+ cores\)", d) for d in devices) else ""),
          "", format_table(flat, columns, markdown=True), ""]
    if args.blocks:
        md[2:2] = [f"**A model cut to its first {args.blocks} blocks**: a smoke test that every row runs. The final "
                   "norm and head never see such shallow features, so these perplexities measure nothing and "
                   "compare with nothing (not even the dense reference).", ""]
    if ablation:
        md += [f"## Ablation of `best` at ratio {ABLATION_RATIO}", "",
               "Each ingredient of `best` on and off: the anchored objective (aa-svd's ‖WX − W'X'‖ against svd-llm's "
               "‖WX − W'X‖), rank allocation (uniform: the ratio in every matrix; type-waterfill: one rank per "
               "matrix type shared by every block, water-filled by the dense whitened spectra; type-waterfill-dense: "
               "the same, where a whole type may also stay dense; kept_dense: whether refinement and distillation also "
               "train the matrices it keeps dense), block refinement (the published schedule, 3 passes, against "
               "`best`'s per-window steps, passes as the row says) and "
               "model distillation (KL to the dense model's next-token distribution on the calibration windows, "
               "after the last block). code: current = measured on the code of this table's latest rows; older = an "
               "earlier engine version, kept because it was not re-run.", "",
               format_table(ablation, ("method", "anchored", "ranks", "kept_dense", "refinement", "distillation",
                                       "selection_ppl", "wikitext2_ppl", "c4_ppl",
                                       "compress_seconds", "error_report", "code")
                            + (("device",) if len({r.get("device") for r in ablation}) > 1 else ()), markdown=True), ""]

    starts = [r for r in flat_all if r["method"] in START_CHOICE]
    if starts:
        md += ["## `best`'s starting point at each ratio", "",
               f"Refinement started from each closed form; `best` takes, at each ratio, the start with the lower "
               f"selection_ppl: perplexity on {args.selection_windows} windows of the C4 calibration documents drawn "
               f"with another seed ({data.SELECTION_SET}), never on the evaluation windows. A row without "
               "selection_ppl was measured before the selection windows existed.", "",
               format_table(sorted(starts, key=lambda r: (r["ratio"], START_CHOICE.index(r["method"]))),
                            ("method", "ratio", "start", "selection_ppl", "wikitext2_ppl", "c4_ppl", "compress_seconds",
                             "code", "device"), markdown=True), ""]

    def label(r):  # rows refined for other than --refine-passes passes say how many
        passes = r.get("refine_passes")
        if passes in (None, args.refine_passes):
            return r["method"]
        return f"{r['method']} ({passes} pass{'' if passes == 1 else 'es'})"

    pairs = side_by_side(records, getattr(args, "peer_runs", None) or [])
    if pairs:
        md += ["## Side by side with the peer's code on the same machine", "",
               "The published AA-SVD code, run by us with its own objectives and pipeline on the same protocol and "
               "the same machine as the engine's row (peer_runs.json says how). speedup = peer seconds / engine "
               "seconds. The peer's seconds include metric-only stages it runs inside its compression "
               "(peer_diagnostic_seconds: a PPL pass through the head and per-linear trace logging; its per-linear "
               "metric hooks are not separable and stay in).", "",
               format_table(pairs, ("method", "ratio", "refine_passes", "compress_seconds", "peer_compress_seconds",
                                    "peer_diagnostic_seconds", "speedup", "wikitext2_ppl", "peer_wikitext2_ppl", "c4_ppl", "peer_c4_ppl",
                                    "device"), markdown=True), ""]
    notes = [f"- {label(r)} {r['ratio']}: {r['note']}" for r in records if r.get("note")]
    if notes:
        md += ["Notes:", *notes, ""]
    with open(os.path.join(args.out_dir, "quality.md"), "w") as f:
        f.write("\n".join(md))
    wanted = args.plot_methods.split(",")
    series = {label(r): r["layer_errors"] for r in sorted(records, key=lambda r: wanted.index(r["method"])
                                                               if r["method"] in wanted else len(wanted))
              if r.get("layer_errors") and abs(r["ratio"] - args.plot_ratio) < 1e-9 and r["method"] in wanted}
    if series:
        plot_layer_errors(series, os.path.join(args.out_dir, "quality_layer_error.png"),
                          title=f"per-block output error vs dense, ratio {args.plot_ratio} ({args.protocol})")


def run_memory(args) -> None:
    """Peak RSS while compressing SmolLM2-135M and a 4x deeper random model of the same width."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowrank_engine import models
    from lowrank_engine.report import format_table, write_json

    base = models.resolve_model_path(args.model)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        config = AutoConfig.from_pretrained(base)
        config.num_hidden_layers *= 4
        torch.manual_seed(0)
        deep = AutoModelForCausalLM.from_config(config)
        deep.save_pretrained(tmp)
        del deep
        for label, path in (("smollm2-135m", args.model), (f"random {config.num_hidden_layers} blocks", tmp)):
            for src in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if path == tmp and os.path.exists(os.path.join(base, src)):
                    import shutil
                    shutil.copy(os.path.join(base, src), tmp)
            with tempfile.TemporaryDirectory(prefix="lowrank-memory-out-") as out:
                # blocks streamed to disk, as `lowrank-engine compress` writes them; nothing evaluated
                spec = dataclasses.replace(row_spec(args, "svd-llm", 0.4, output=os.path.join(out, "ckpt")), model=path)
                r = run_child("svd-llm", spec, "memory")
            records.append({"model": label, "method": "svd-llm", "ratio": 0.4, "calibration": r["calibration"],
                            "peak_rss_mb": r["peak_rss_mb"], "compress_seconds": r["compress_seconds"],
                            "device": r["device"]})
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(records, os.path.join(args.out_dir, "quality_memory.json"))
    table = format_table(records, ("model", "method", "ratio", "calibration", "peak_rss_mb", "compress_seconds"))
    print("\n" + table)
    with open(os.path.join(args.out_dir, "quality_memory.md"), "w") as f:
        f.write("# Peak RSS while compressing (blocks streamed from safetensors)\n\n"
                + format_table(records, ("model", "method", "ratio", "calibration", "peak_rss_mb",
                                         "compress_seconds"), markdown=True) + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options; their defaults are the protocol's (zeroshot.py reads them from here)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated; 'saes:fixed' = fixed-subspace ACES")
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wikitext-windows", type=int, default=128)
    p.add_argument("--c4-windows", type=int, default=64)
    p.add_argument("--selection-windows", type=int, default=16,
                   help="windows of the calibration documents (another seed) that choices are made on, so that none is "
                        "tuned on the evaluation windows")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=job.JobSpec.batch_size)
    p.add_argument("--refine-passes", type=int, default=3, help="for '+refine' rows (3: the peer's setting)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (benchmarks/results/quick with --quick)")
    p.add_argument("--runs-dir", default=None, help="cache of finished configurations (resumable)")
    p.add_argument("--plot-ratio", type=float, default=0.4)
    p.add_argument("--plot-methods", default="svd-llm,aa-svd,saes,best",
                   help="the per-block error plot's curves (rows at --plot-ratio)")
    p.add_argument("--quick", action="store_true",
                   help=f"the first {QUICK_BLOCKS} blocks, tiny calibration and evaluation: a smoke test")
    p.add_argument("--blocks", type=int, default=None,
                   help="keep only the model's first N decoder blocks (smoke tests; not the protocol)")
    p.add_argument("--memory", action="store_true", help="the peak-RSS comparison instead of the quality table")
    p.add_argument("--skip-dense", action="store_true", help="do not (re)run the dense row")
    p.add_argument("--peer-runs-file", default=PEER_RUNS_FILE,
                   help="the peer's code timed on named machines, for the side-by-side table")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--protocol", default=PROTOCOL, help=argparse.SUPPRESS)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: this row label's job ...
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)  # ... as JSON (row_spec, write_spec)
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)
    p.add_argument("--keep-checkpoints", default=None, metavar="DIR",
                   help="save each row's checkpoint as DIR/<label>_<ratio>: the job streams its blocks there and "
                        "evaluates the saved checkpoint, as `lowrank-engine compress --output` does "
                        "(zeroshot.py scores the checkpoints in its work directory's checkpoints/)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.one:
        record = run_one(args.one, read_spec(args.spec), args.protocol)
        with open(args.record, "w") as f:
            json.dump(record, f)
        return
    if args.quick:
        args.methods, args.ratios = "svd-llm,saes,aa-svd+refine,best", "0.4"
        # evaluated at the calibration length; refinement overfits this little data (a smoke test only)
        args.nsamples, args.seqlen, args.wikitext_windows, args.c4_windows, args.selection_windows = 8, 128, 4, 4, 4
        args.eval_seqlen = args.seqlen
        args.blocks = args.blocks or QUICK_BLOCKS
        args.protocol = "smollm2-cpu-quick"
    if args.blocks:  # rows of a cut model never mix with the protocol's in the runs cache
        args.protocol += f"-{args.blocks}blocks"
    args.out_dir = args.out_dir or os.path.join(HERE, "results", "quick" if args.quick else "")
    if args.quick and not args.runs_dir:  # a smoke test always runs: no cache from an earlier invocation
        args.runs_dir = tempfile.mkdtemp(prefix="lowrank-quick-runs-")
    args.runs_dir = args.runs_dir or os.path.join(args.out_dir, "runs")
    if args.memory:
        args.nsamples, args.seqlen = min(args.nsamples, 8), min(args.seqlen, 512)
        args.wikitext_windows = args.c4_windows = 1
        return run_memory(args)
    configs = [(m, float(r)) for r in args.ratios.split(",") for m in args.methods.split(",")]
    if not args.skip_dense:
        configs.append(("dense", 0.0))
    with tempfile.TemporaryDirectory(prefix="lowrank-cut-model-") as cut:
        if args.blocks:
            args.model_label = f"{args.model}, first {args.blocks} blocks"
            args.model = truncated_checkpoint(args.model, args.blocks, cut)
        run_configs(args, configs)
    args.peer_runs = load_peer_runs(args.peer_runs_file)
    write_outputs(args, cached_records(args))


if __name__ == "__main__":
    main()
