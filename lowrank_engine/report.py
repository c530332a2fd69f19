"""Plain-text summary tables, JSON records and the per-layer error plot."""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), or "" where the OS does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def device_name(device: str = "cpu") -> str:
    """What benchmark records say they ran on. A CPU names its model as well as its cores: two
    2-core VMs have timed the same GEMMs 2.1× apart, so records of different CPUs must not pair."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = cpu_model()
    return f"cpu ({os.cpu_count()} cores{', ' + model if model else ''})"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.4f}"
    return str(value)


def format_table(records: Sequence[dict], columns: Sequence[str], markdown: bool = False) -> str:
    """A fixed-width text table (or a markdown table) of the given columns."""
    rows = [[_fmt(r.get(c)) for c in columns] for r in records]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join([line, sep, *body])


def finite_or_null(obj):
    """JSON has no NaN or Inf: such floats become null (they mean "no valid figure")."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def write_json(records: Iterable[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(finite_or_null(list(records)), f, indent=2, allow_nan=False)
    os.replace(tmp, path)


def plot_layer_errors(series: dict, path: str, title: str = "per-block output error") -> str:
    """series: label → list of (rel_mse, cosine_distance) per block. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for label, values in series.items():
        blocks = range(len(values))
        axes[0].plot(blocks, [v[0] for v in values], marker=".", label=label)
        axes[1].plot(blocks, [v[1] for v in values], marker=".", label=label)
    axes[0].set(title="relative MSE ‖X'−X‖²/‖X‖²", xlabel="block", yscale="log")
    axes[1].set(title="cosine distance 1−cos(X, X')", xlabel="block", yscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    # one legend below both panels: inside, it hides the curves
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
