"""The report's figures: mAP per vertical (a panel per head, a colour per method, the specialists and the Bayes
posterior as marks), the share of the generalist-to-specialists gap each student closes, and the loss curves.

Colours are Okabe and Ito's eight, which stay apart under the common colour-vision deficiencies; a method keeps
its colour in every figure, and a legend never sits on the data (it goes beside the axes)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

# Okabe-Ito without black (black marks the specialists) and yellow (too faint on white), then the two
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000"]
METHOD_ORDER = ("generalist", "scaled", "distilled", "fixed_scale", "self_paced", "self_paced_class",
                "bayes_distilled", "bayes_self_paced")
HEAD_ORDER = ("fc_fc", "fc_fc_matched", "fc_sc", "fc_sc_shared", "sc_sc")
REFERENCE_STYLE = {"specialists": dict(color="black", linestyle="-", linewidth=2.2),
                   "bayes": dict(color="#555555", linestyle=(0, (2, 1.5)), linewidth=1.6)}


@dataclass
class Names:
    """What the figures call things: the report's labels of methods, heads and runs."""

    method: Dict[str, str] = field(default_factory=dict)
    head: Dict[str, str] = field(default_factory=dict)
    run: Callable[[str], str] = str

    def of_method(self, m: str) -> str:
        return self.method.get(m, m)

    def of_head(self, h: str) -> str:
        return self.head.get(h, h)


def _split(run: str) -> Tuple[str, str]:
    method, _, head = run.partition("-")
    return method, head


def _ordered(names, order) -> List[str]:
    known = [n for n in order if n in names]
    return known + sorted(n for n in names if n not in order)


def _students(results: Dict) -> Tuple[List[str], List[str]]:
    """(methods, heads) of the student runs, in the paper's order."""
    runs = [r for r in results["models"] if r not in ("specialists", "bayes")]
    return (_ordered({_split(r)[0] for r in runs}, METHOD_ORDER),
            _ordered({_split(r)[1] for r in runs}, HEAD_ORDER))


def colours(methods: List[str]) -> Dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


def _values(model: Dict) -> np.ndarray:
    """mAP per vertical then overall, in percent (NaN where a vertical has no test positive)."""
    v = list(model["map_per_vertical"]) + [model["map"]]
    return np.array([np.nan if x is None else 100 * float(x) for x in v])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _reference_handles(results: Dict, names: Names):
    from matplotlib.lines import Line2D

    return [Line2D([], [], label=names.run(r), **REFERENCE_STYLE[r]) for r in REFERENCE_STYLE
            if r in results["models"]]


def _group_axis(ax, names: List[str]) -> None:
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=45 if len(names) > 10 else 0, ha="right" if len(names) > 10 else "center",
                       fontsize=8)
    ax.axvline(len(names) - 1.5, color="#bbbbbb", linewidth=0.8)  # the overall group stands apart
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)


def map_per_vertical(results: Dict, path: str, names: Names) -> str:
    """One panel per head; in each, a bar per method for every vertical and overall; the specialists (solid
    black) and the Bayes posterior (grey dashes) as marks across each group."""
    plt = _pyplot()
    models = results["models"]
    methods, heads = _students(results)
    col = colours(methods)
    groups = list(results["verticals"]) + ["overall"]
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(methods))
    everything = [_values(m) for m in models.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in everything]) if everything else np.zeros(0)
    # the differences are a few points: the axis starts a little below the lowest bar, and says so
    low = max(0.0, float(finite.min()) - 5) if len(finite) else 0.0
    high = min(100.0, float(finite.max()) + 2) if len(finite) else 100.0
    fig, axes = plt.subplots(max(1, len(heads)), 1, figsize=(max(7.0, 0.75 * len(groups) + 2.5),
                                                             1.0 + 2.9 * max(1, len(heads))),
                             sharex=True, squeeze=False)
    for ax, head in zip(axes[:, 0], heads or [""]):
        for i, m in enumerate(methods):
            run = f"{m}-{head}"
            if run not in models:
                continue
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, _values(models[run]) - low, width, bottom=low,
                   color=col[m], label=names.of_method(m))
        for ref, style in REFERENCE_STYLE.items():
            if ref in models:
                ax.hlines(_values(models[ref]), x - 0.45, x + 0.45, **style)
        ax.set_ylim(low, high)
        ax.set_ylabel("mAP (%)")
        ax.set_title(f"{names.of_head(head)} head", fontsize=10, loc="left")
        _group_axis(ax, groups)
    axes[-1, 0].set_xlabel("vertical")
    handles = [plt.Rectangle((0, 0), 1, 1, color=col[m]) for m in methods]
    labels = [names.of_method(m) for m in methods]
    refs = _reference_handles(results, names)
    fig.legend(handles + refs, labels + [h.get_label() for h in refs], loc="center left",
               bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    fig.suptitle(f"{results.get('name', '')}: test mAP per vertical (axis from {low:.0f}%)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


MIN_GAP = 1.0  # mAP points: below this the gap is test noise, and a share of it would be a large random number
SHARE_LIMITS = (-100.0, 200.0)  # the gap figure's axis at most; a bar beyond it is cut there and labelled


def gap_closed(results: Dict) -> Dict[str, np.ndarray]:
    """Per student run other than the generalists: the share (%) of the gap between its head's generalist and the
    specialists that it closes, per vertical then overall; NaN where the specialists are less than MIN_GAP points
    ahead of the generalist (no gap to speak of)."""
    models = results["models"]
    if "specialists" not in models:
        return {}
    spec = _values(models["specialists"])
    out = {}
    for run in models:
        method, head = _split(run)
        base = models.get(f"generalist-{head}")
        if run in ("specialists", "bayes") or method == "generalist" or base is None:
            continue
        gen = _values(base)
        gap = spec - gen
        with np.errstate(invalid="ignore", divide="ignore"):
            out[run] = np.where(gap >= MIN_GAP, 100 * (_values(models[run]) - gen) / gap, np.nan)
    return out


def gap_figure(results: Dict, path: str, names: Names) -> Optional[str]:
    """Bars of gap_closed: one panel per head, a bar per method (colours as in map_per_vertical); 0% is the
    generalist, 100% the specialists. None when there is nothing to draw (no specialists or no generalist)."""
    shares = gap_closed(results)
    if not shares:
        return None
    plt = _pyplot()
    methods, heads = _students(results)
    col = colours(methods)
    shown = [m for m in methods if any(f"{m}-{h}" in shares for h in heads)]
    heads = [h for h in heads if any(f"{m}-{h}" in shares for m in shown)]
    groups = list(results["verticals"]) + ["overall"]
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(shown))
    fig, axes = plt.subplots(len(heads), 1, figsize=(max(7.0, 0.75 * len(groups) + 2.5), 1.0 + 2.6 * len(heads)),
                             sharex=True, squeeze=False)
    finite = np.concatenate([v[np.isfinite(v)] for v in shares.values()] + [np.array([0.0, 100.0])])
    lo, hi = max(SHARE_LIMITS[0], float(finite.min()) - 10), min(SHARE_LIMITS[1], float(finite.max()) + 10)
    for ax, head in zip(axes[:, 0], heads):
        for i, m in enumerate(shown):
            s = shares.get(f"{m}-{head}")
            if s is None:
                continue
            xs = x + (i - (len(shown) - 1) / 2) * width
            ax.bar(xs, np.clip(s, lo, hi), width, color=col[m], label=names.of_method(m))
            for xi, si in zip(xs, s):
                if np.isfinite(si) and not lo <= si <= hi:  # cut at the axis: its value in words
                    ax.annotate(f"{si:.0f}%", (xi, hi if si > hi else lo), ha="center", fontsize=7,
                                va="top" if si > hi else "bottom", rotation=90)
        missing = [g for g in range(len(groups))
                   if not any(np.isfinite(shares[f"{m}-{head}"][g]) for m in shown if f"{m}-{head}" in shares)]
        for g in missing:
            ax.text(g, (lo + hi) / 2, f"gap < {MIN_GAP:g} point", ha="center", va="center", fontsize=7,
                    color="#555555", rotation=90)
        ax.set_ylim(lo, hi)
        ax.axhline(0, color="#555555", linewidth=0.8)
        ax.axhline(100, **REFERENCE_STYLE["specialists"])
        ax.set_ylabel("gap closed (%)")
        ax.set_title(f"{names.of_head(head)} head: 0% = its generalist, 100% = the specialists",
                     fontsize=10, loc="left")
        _group_axis(ax, groups)
    axes[-1, 0].set_xlabel("vertical")
    handles = [plt.Rectangle((0, 0), 1, 1, color=col[m]) for m in shown]
    from matplotlib.lines import Line2D

    fig.legend(handles + [Line2D([], [], label="Specialists", **REFERENCE_STYLE["specialists"])],
               [names.of_method(m) for m in shown] + ["Specialists"], loc="center left",
               bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    fig.suptitle(f"{results.get('name', '')}: share of the generalist-to-specialists gap each student closes",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_curves(results: Dict, histories: Dict[str, Dict], path: str, names: Names) -> str:
    """Training loss against step, a colour per method and a line style per head."""
    plt = _pyplot()
    methods, heads = _students(results)
    col = colours(methods)
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run, h in histories.items():
        if not h.get("step"):
            continue
        method, head = _split(run)
        ax.plot(h["step"], h["loss"], label=names.run(run), color=col.get(method, "#000000"),
                linestyle=styles[heads.index(head) % len(styles)] if head in heads else "-", linewidth=1.3)
    batch = (results.get("config") or {}).get("student", {}).get("batch_size")
    ax.set_xlabel("training step" + (f" (one batch of {batch} rows)" if batch else ""))
    ax.set_ylabel("loss per row (nats, log scale)")
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    if hi / lo < 100:  # under two decades a log axis shows one or two labels: label its minor ticks too
        from matplotlib.ticker import FormatStrFormatter

        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.grid(color="#e5e5e5", linewidth=0.6)
    ax.set_title("student training loss: sigmoid cross-entropy summed over all classes, mean over the batch",
                 fontsize=10, loc="left")
    if ax.lines:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_all(results: Dict, histories: Dict[str, Dict], directory: str, names: Names) -> Dict[str, str]:
    """Every figure into directory; {name: path}."""
    files = {"loss_curves": loss_curves(results, histories, os.path.join(directory, "loss_curves.png"), names),
             "map_bars": map_per_vertical(results, os.path.join(directory, "map_per_vertical.png"), names)}
    gap = gap_figure(results, os.path.join(directory, "gap_closed.png"), names)
    if gap:
        files["gap_closed"] = gap
    return files
