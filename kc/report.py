"""Report: a markdown table like the paper's per-vertical table (verticals as rows, models as columns), a JSON
file of every number, and PNG plots (loss curves, per-vertical mAP bars)."""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from kc import checkpoint

METHOD_LABELS = {"generalist": "Generalist", "distilled": "+D", "self_paced": "+D+S",
                 "bayes_distilled": "+D(Bayes)", "bayes_self_paced": "+D+S(Bayes)"}
HEAD_LABELS = {"fc_fc": "FC-FC", "fc_sc": "FC-SC", "sc_sc": "SC-SC", "fc_sc_shared": "FC-SC(shared)",
               "fc_fc_matched": "FC-FC(=)"}
REFERENCES = ("specialists", "bayes")  # not students: never marked best


def label(run: str) -> str:
    if run == "specialists":
        return "Specialists"
    if run == "bayes":
        return "Bayes posterior"
    method, _, head = run.partition("-")
    return f"{METHOD_LABELS.get(method, method)} {HEAD_LABELS.get(head, head)}"


def _pct(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown(results: Dict) -> str:
    runs: List[str] = list(results["models"])
    models = results["models"]
    names = results["verticals"]
    head = "| vertical | classes | " + " | ".join(label(r) for r in runs) + " |"
    sep = "|---|---:|" + "---:|" * len(runs)
    lines = [f"# {results['name']}: mAP (%) per vertical", "",
             f"{results['num_classes']} classes in {len(names)} verticals; {results['num_train']} training and "
             f"{results['num_test']} test samples; seed {results['seed']}.", "", head, sep]
    for v, name in enumerate(names):
        cells = [_pct(models[r]["map_per_vertical"][v]) for r in runs]
        best = max((models[r]["map_per_vertical"][v] for r in runs if r not in REFERENCES), default=None)
        cells = [f"**{c}**" if r not in REFERENCES and best is not None and models[r]["map_per_vertical"][v] == best
                 else c for r, c in zip(runs, cells)]
        lines.append(f"| {name} | {results['vertical_sizes'][v]} | " + " | ".join(cells) + " |")
    lines.append(f"| **overall mAP** | {results['num_classes']} | "
                 + " | ".join(_pct(models[r]["map"]) for r in runs) + " |")
    lines.append("| mAP, verticals averaged | | "
                 + " | ".join(_pct(models[r].get("map_vertical_avg")) for r in runs) + " |")
    lines.append("| top-1 (%) | | " + " | ".join(_pct(models[r]["top1"]) for r in runs) + " |")
    lines.append("| top-5 (%) | | " + " | ".join(_pct(models[r]["top5"]) for r in runs) + " |")
    lines.append("| parameters | | " + " | ".join(_params(models[r]["parameters"]) for r in runs) + " |")
    lines.append("| ms / sample | | " + " | ".join(f"{models[r]['ms_per_sample']:.4f}" for r in runs) + " |")
    lines += ["", "Generalist: the student trained on hard labels only. +D: distilled from the specialists' cached "
              "top-K soft targets. +D+S: distilled with the self-paced scale "
              f"({results.get('scale', 'vertical')} level, initialised by rule {results.get('scale_init', 'sqrt')!r})."
              " (Bayes): distilled from the generator's Bayes-optimal posterior instead (the ceiling of what a "
              "teacher can add). FC-FC(=): FC-FC with as many weights as FC-SC. Specialists: one network per "
              "vertical (parameters summed over verticals). Bayes posterior: the best possible scores. Overall mAP "
              "weighs every class alike, the vertical average every vertical alike. Every method of a head starts "
              "from the same weights. Best student per vertical in bold.", ""]
    return "\n".join(lines)


def plots(results: Dict, histories: Dict[str, Dict], directory: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, h in histories.items():
        if h.get("step"):
            ax.plot(h["step"], h["loss"], label=label(run))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (sigmoid CE summed over classes)")
    ax.set_yscale("log")
    ax.set_title("student loss curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = os.path.join(directory, "loss_curves.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    runs = list(results["models"])
    names = results["verticals"]
    x = np.arange(len(names) + 1)
    w = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(names) * len(runs) / 3), 4.5))
    for i, run in enumerate(runs):
        m = results["models"][run]
        vals = [100 * (v if v is not None and np.isfinite(v) else 0) for v in m["map_per_vertical"] + [m["map"]]]
        ax.bar(x + (i - (len(runs) - 1) / 2) * w, vals, w, label=label(run))
    finite = [100 * v for r in runs for v in results["models"][r]["map_per_vertical"]
              if v is not None and np.isfinite(v)]
    if finite:  # the differences are a few points: start the axis near the lowest bar
        ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 2))
    ax.set_xticks(x)
    ax.set_xticklabels(list(names) + ["overall"], rotation=45 if len(names) > 10 else 0, fontsize=8)
    ax.set_ylabel("mAP (%)")
    ax.set_title("mAP per vertical")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = os.path.join(directory, "map_per_vertical.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def write(results: Dict, histories: Dict[str, Dict], directory: str) -> Dict[str, str]:
    os.makedirs(directory, exist_ok=True)
    md = markdown(results)
    files = {"table": os.path.join(directory, "results.md"), "json": os.path.join(directory, "results.json")}
    checkpoint.write_text(files["table"], md)
    checkpoint.write_json(files["json"], dict(results, histories=histories))
    loss_png, map_png = plots(results, histories, directory)
    files.update(loss_curves=loss_png, map_bars=map_png)
    return files
