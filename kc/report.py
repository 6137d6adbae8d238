"""Report: a markdown table like the paper's per-vertical table (verticals as rows, models as columns), a JSON
file of every number, and PNG figures (kc/figures.py: mAP per vertical, the share of the generalist-to-specialists
gap each student closes, loss curves)."""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from kc import checkpoint

METHOD_LABELS = {"generalist": "Generalist", "distilled": "+D", "self_paced": "+D+S",
                 "bayes_distilled": "+D(Bayes)", "bayes_self_paced": "+D+S(Bayes)",
                 "scaled": "+S", "fixed_scale": "+D+S(fixed)", "self_paced_class": "+D+S(class)"}
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
    lines += _training_rows(results, runs)
    lines += ["", "Generalist: the student trained on hard labels only. +D: distilled from the specialists' cached "
              "top-K soft targets. +D+S: distilled with the self-paced scale "
              f"({results.get('scale', 'vertical')} level, initialised by rule {results.get('scale_init', 'sqrt')!r})."
              " (Bayes): distilled from the generator's Bayes-optimal posterior instead (the ceiling of what a "
              "teacher can add). FC-FC(=): FC-FC with as many weights as FC-SC. Specialists: one network per "
              "vertical (parameters summed over verticals). Bayes posterior: the best possible scores. Overall mAP "
              "weighs every class alike, the vertical average every vertical alike. Every method of a head starts "
              "from the same weights. Best student per vertical in bold.", ""]
    return "\n".join(lines)


def _training_rows(results: Dict, runs: List[str]) -> List[str]:
    """Epochs run (best epoch, maximum), validation mAP of the kept epoch, training wall time, and the method's
    total (a distilled student adds the specialists and the teacher cache); absent for results written before."""
    models, compute = results["models"], results.get("compute")
    if not compute:
        return []

    def epochs(r):
        t = models[r].get("training") or {}
        if r == "specialists":
            per = [p for p in t.get("per_vertical", []) if p]
            return f"{min(p['epochs'] for p in per)}-{max(p['epochs'] for p in per)}" if per else "n/a"
        return f"{t['epochs']} (best {t.get('best_epoch', t['epochs'])}) of {t.get('max_epochs', t['epochs'])}" \
            if "epochs" in t else "n/a"

    def val(r):
        t = models[r].get("training") or {}
        if r == "specialists":
            per = [p.get("val_map") for p in t.get("per_vertical", []) if p]
            return _pct(float(np.mean(per))) if per and None not in per else "n/a"
        return _pct(t.get("val_map"))

    def seconds(r, key):
        if r == "specialists":
            return f"{compute['specialists_seconds']:.1f}" if key == "train_seconds" else ""
        s = compute["students"].get(r, {}).get(key)
        return "" if s is None else f"{s:.1f}"

    return ["| epochs (best, max) | | " + " | ".join(epochs(r) if r != "bayes" else "" for r in runs) + " |",
            "| validation mAP | | " + " | ".join(val(r) if r != "bayes" else "" for r in runs) + " |",
            "| training s | | " + " | ".join(seconds(r, "train_seconds") for r in runs) + " |",
            "| method s (+ specialists, cache) | | " + " | ".join(seconds(r, "method_seconds") for r in runs)
            + " |",
            "", ("Every model stops on its validation mAP and keeps its best epoch's weights; test mAP steers "
                 "nothing." if results.get("num_val") else "No validation split: every model ran its maximum "
                 "epochs.") + " Specialists: epochs per teacher (range), validation mAP averaged over teachers, "
            f"training seconds summed; the teacher cache took {compute['cache_seconds']:.1f} s."]


def plots(results: Dict, histories: Dict[str, Dict], directory: str) -> Dict[str, str]:
    """The figures (kc/figures.py) under the report's names for methods, heads and runs: {name: path}."""
    from kc import figures

    return figures.write_all(results, histories, directory, figures.Names(METHOD_LABELS, HEAD_LABELS, label))


def write(results: Dict, histories: Dict[str, Dict], directory: str) -> Dict[str, str]:
    os.makedirs(directory, exist_ok=True)
    md = markdown(results)
    files = {"table": os.path.join(directory, "results.md"), "json": os.path.join(directory, "results.json")}
    checkpoint.write_text(files["table"], md)
    checkpoint.write_json(files["json"], dict(results, histories=histories))
    files.update(plots(results, histories, directory))
    return files
