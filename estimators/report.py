"""Reports of predictor quality: per-layer tables, report.json, report.md and a plot.

`results` everywhere is {split: {predictor: {target layer: RoutingMetrics}}}, split
being "validation" (held-out sequences of the training traces) or "eval" (a separate
held-out trace). The plot shows recall@k per target layer, one line per predictor,
one panel per split (in the manner of the paper's per-layer hit-rate figure).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from specmoe.paths import display_path

from .metrics import RoutingMetrics, mean_over_layers, per_layer_table

__all__ = ["REPORT_JSON", "REPORT_MD", "PLOT_PNG", "LINE_STYLES", "build_report", "render_tables",
           "render_markdown", "split_title", "recall_figure", "plot_recall", "write_report"]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "recall_per_layer.png"
TABLE_METRICS = ("recall", "weighted_recall", "exact_match", "top1")
_SPLIT_TITLES = {"validation": "validation (held-out sequences of the training traces)",
                 "eval": "eval (separate held-out trace)"}

Results = Mapping[str, Mapping[str, Mapping[int, RoutingMetrics]]]


def build_report(results: Results, meta: Mapping[str, Any] | None = None) -> dict:
    """JSON-ready report: per split and predictor, the mean over layers and every layer."""
    splits = {}
    for split, per_pred in results.items():
        preds = {}
        for name, layers in per_pred.items():
            if not layers:
                continue
            preds[name] = {
                "mean": mean_over_layers(layers).to_dict(),
                "layers": {str(t): m.to_dict() for t, m in sorted(layers.items())},
            }
        splits[split] = preds
    return {"format": "specmoe-estimator-report", "format_version": 1, **dict(meta or {}), "splits": splits}


def render_tables(per_pred: Mapping[str, Mapping[int, RoutingMetrics]], metrics=TABLE_METRICS) -> str:
    present = {name: layers for name, layers in per_pred.items() if layers}
    return "\n\n".join(per_layer_table(present, m) for m in metrics)


def render_markdown(report: Mapping[str, Any], results: Results, plot_name: str | None = PLOT_PNG) -> str:
    lines = ["# Expert-routing predictors", ""]
    model = report.get("model") or {}
    if model:
        lines.append(f"Model `{display_path(model.get('id'))}` ({model.get('family')}), {model.get('num_experts')} experts, "
                     f"top-{model.get('top_k')}; lookahead {report.get('lookahead')} MoE layer(s). "
                     "Rows are target layers (decoder indices); predictions use the true routing of the "
                     "source layer.")
        lines.append("")
    params = report.get("parameters")
    if params:
        lines.append(f"Estimator size: {params.get('correction', 0):,} correction parameters + "
                     f"{params.get('default_vectors', 0):,} default-vector entries = "
                     f"{100 * params.get('share', 0.0):.3f}% of the model's "
                     f"{params.get('expert', 0):,} expert parameters.")
        lines.append("")
    hybrid = report.get("hybrid")
    if hybrid:
        learned = sorted(int(t) for t, k in hybrid.items() if k == "learned")
        quasi = sorted(int(t) for t, k in hybrid.items() if k != "learned")
        lines.append(f"Hybrid (chosen per layer by validation recall): `learned` on layers "
                     f"{learned or 'none'}, `quasi` on layers {quasi or 'none'}.")
        lines.append("")
    if plot_name:
        lines += [f"![recall@k per layer]({plot_name})", ""]
    for split, per_pred in results.items():
        lines.append(f"## {split_title(split, report.get('traces'))}")
        lines.append("")
        lines.append("| predictor | recall@k | weighted recall | exact match | top-1 | tokens/layer |")
        lines.append("|---|---|---|---|---|---|")
        for name, layers in per_pred.items():
            if not layers:
                continue
            m = mean_over_layers(layers)
            lines.append(f"| {name} | {m.recall:.4f} | {m.weighted_recall:.4f} | {m.exact_match:.4f} | "
                         f"{m.top1:.4f} | {m.tokens // max(1, len(layers))} |")
        lines.append("")
        lines.append("```")
        lines.append(render_tables(per_pred))
        lines.append("```")
        lines.append("")
    return "\n".join(lines)


# one look per predictor: colour, marker and dash all differ, and `hybrid` (which equals
# `learned` or `quasi` on every layer) is drawn hollow and larger, so the line under it shows
LINE_STYLES = {
    "current": dict(color="tab:gray", marker="v", linestyle=":", markersize=4),
    "quasi": dict(color="tab:blue", marker="o", linestyle="--", markersize=4),
    "learned": dict(color="tab:green", marker="s", linestyle="-", markersize=4),
    "hybrid": dict(color="tab:red", marker="D", linestyle=(0, (1, 2)), markersize=8, markerfacecolor="none",
                   markeredgewidth=1.3),
    "previous": dict(color="tab:purple", marker="x", linestyle="-.", markersize=5),
}


def split_title(split: str, traces: Mapping[str, Any] | None = None) -> str:
    """Panel / section title of a split, naming its traces when known."""
    names = list((traces or {}).get(split) or [])
    if not names:
        return _SPLIT_TITLES.get(split, split)
    shown = ", ".join(names)
    if split == "validation":
        return f"validation: held-out sequences of {shown}"
    return f"{split}: {shown}"


def recall_figure(results: Results, title: str | None = None, traces: Mapping[str, Any] | None = None):
    """The matplotlib figure of plot_recall (one panel per split, titled with its traces)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    splits = [s for s, per in results.items() if any(per.values())]
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(6.4 * max(1, len(splits)), 4.4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for name, layers in results[split].items():
            if not layers:
                continue
            xs = sorted(layers)
            style = LINE_STYLES.get(name, dict(marker=".", linestyle="-"))
            ax.plot(xs, [layers[t].recall for t in xs], label=name, linewidth=1.4, **style)
        ax.set_title(split_title(split, traces), fontsize=9, wrap=True)
        ax.set_xlabel("predicted MoE layer")
        ax.set_ylabel("recall@k (hit rate)")
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_recall(results: Results, path: str | Path, title: str | None = None,
                traces: Mapping[str, Any] | None = None) -> Path:
    """PNG of recall@k per target layer, one line per predictor, one panel per split
    (`traces`: {split: [trace names]} for the panel titles)."""
    import matplotlib.pyplot as plt

    fig = recall_figure(results, title, traces)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(out_dir: str | Path, results: Results, meta: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """report.json, report.md and the plot in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(results, meta)
    model = (meta or {}).get("model") or {}
    title = f"{display_path(model.get('id', ''))} - lookahead {(meta or {}).get('lookahead', '?')}".strip(" -")
    png = plot_recall(results, out / PLOT_PNG, title=title, traces=(meta or {}).get("traces"))
    paths = {"json": out / REPORT_JSON, "md": out / REPORT_MD, "png": png}
    for key, text in (("json", json.dumps(report, indent=2) + "\n"), ("md", render_markdown(report, results))):
        tmp = paths[key].with_name(paths[key].name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, paths[key])
    return paths
