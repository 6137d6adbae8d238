"""Several seeds in one command: one full run per seed (out/seed-N/), then a summary over seeds.

The summary gives each model's mean and standard deviation over seeds and the paired differences that the method
claims (+D over the generalist, +D+S over +D, FC-SC over its size-matched baseline), each with a 95% t-interval
over seeds. The difference is paired: both models of a pair come from the same seed (same data, same teachers and,
for two methods of one head, the same initial weights), so the seed-to-seed variation they share cancels.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from kc import checkpoint
from kc.report import label

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (no scipy dependency)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
METRICS = ("map", "map_vertical_avg")
MAX_SEEDS = 1000


def parse_seeds(text: str) -> List[int]:
    """'0,1,2' or '0-4' (inclusive) or a mix: '0-2,7'."""
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        a, dash, b = part.partition("-")
        if not (a.isascii() and a.isdigit()) or (dash and not (b.isascii() and b.isdigit())):
            raise ValueError(f"--seeds: {part!r} is not a seed or a range of seeds >= 0 (e.g. 0,1,2 or 0-4)")
        if dash:
            lo, hi = int(a), int(b)
            if hi < lo:
                raise ValueError(f"--seeds: empty range {part!r}")
            if hi - lo >= MAX_SEEDS:
                raise ValueError(f"--seeds: {part!r} is more than {MAX_SEEDS} seeds")
            out += list(range(lo, hi + 1))
        else:
            out.append(int(part))
    if not out:
        raise ValueError("--seeds: give at least one seed, e.g. 0,1,2")
    if len(set(out)) != len(out):
        raise ValueError(f"--seeds: a seed appears twice in {text!r}")
    return out


def seed_dir(out: str, seed: int) -> str:
    return os.path.join(out, f"seed-{seed}")


def t_interval(diffs: Sequence[float]) -> Tuple[float, float, float, float]:
    """(mean, sd, low, high): the 95% t-interval of the mean of paired differences (NaN bounds for one seed)."""
    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sd = float(d.std(ddof=1))
    df = len(d) - 1
    t = T975[df - 1] if df <= len(T975) else 1.96
    half = t * sd / math.sqrt(len(d))
    return mean, sd, mean - half, mean + half


def comparisons(runs: Sequence[str]) -> List[Tuple[str, str, str]]:
    """(name, a, b) for every claimed ordering a > b whose two runs exist."""
    have = set(runs)
    heads = list(dict.fromkeys(r.partition("-")[2] for r in runs if "-" in r))
    methods = list(dict.fromkeys(r.partition("-")[0] for r in runs if "-" in r))
    out = []
    for h in heads:
        for a, b in (("distilled", "generalist"), ("self_paced", "distilled"), ("self_paced", "generalist"),
                     ("bayes_distilled", "distilled"), ("bayes_self_paced", "self_paced"),
                     # the controls: S without a teacher, D on top of S, the normalisation alone, learning gamma,
                     # a gamma per vertical against one per class
                     ("scaled", "generalist"), ("self_paced", "scaled"), ("fixed_scale", "distilled"),
                     ("self_paced", "fixed_scale"), ("self_paced", "self_paced_class")):
            if f"{a}-{h}" in have and f"{b}-{h}" in have:
                out.append((f"{label(f'{a}-{h}')} - {label(f'{b}-{h}')}", f"{a}-{h}", f"{b}-{h}"))
    for m in methods:
        for a, b in (("fc_sc", "fc_fc_matched"), ("fc_sc", "fc_fc"), ("sc_sc", "fc_fc_matched")):
            if f"{m}-{a}" in have and f"{m}-{b}" in have:
                out.append((f"{label(f'{m}-{a}')} - {label(f'{m}-{b}')}", f"{m}-{a}", f"{m}-{b}"))
    return out


def summarize(results: Dict[int, Dict]) -> Dict:
    """results: seed -> a run's results.json. Means, SDs and paired differences over the seeds."""
    seeds = sorted(results)
    runs = list(results[seeds[0]]["models"])
    for s in seeds:
        if list(results[s]["models"]) != runs:
            raise ValueError(f"seed {s} evaluated other models ({list(results[s]['models'])}) than seed {seeds[0]}")
    models = {}
    for r in runs:
        m = {}
        for k in METRICS + ("top1",):
            vals = [results[s]["models"][r].get(k, float("nan")) for s in seeds]
            m[k] = {"values": vals, "mean": float(np.mean(vals)),
                    "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")}
        models[r] = m
    diffs = []
    for name, a, b in comparisons(runs):
        row = {"name": name, "a": a, "b": b}
        for k in METRICS:
            d = [results[s]["models"][a][k] - results[s]["models"][b][k] for s in seeds]
            mean, sd, lo, hi = t_interval(d)
            verdict = ("holds" if lo > 0 else "reversed" if hi < 0 else "not resolved") if len(d) > 1 else "one seed"
            row[k] = {"values": d, "mean": mean, "sd": sd, "low": lo, "high": hi, "verdict": verdict}
        diffs.append(row)
    seconds = {s: sum(v or 0 for v in results[s].get("stage_seconds", {}).values()) for s in seeds}
    return {"name": results[seeds[0]]["name"], "seeds": seeds, "models": models, "differences": diffs,
            "seconds_per_seed": seconds}


def _p(x: Optional[float]) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def markdown(summary: Dict) -> str:
    seeds = summary["seeds"]
    lines = [f"# {summary['name']}: {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
             "mAP (%) over seeds: mean and standard deviation.", "",
             "| model | mAP mean | mAP sd | vertical-avg mAP mean | sd | top-1 mean |",
             "|---|---:|---:|---:|---:|---:|"]
    for r, m in summary["models"].items():
        lines.append(f"| {label(r)} | {_p(m['map']['mean'])} | {_p(m['map']['sd'])} | "
                     f"{_p(m['map_vertical_avg']['mean'])} | {_p(m['map_vertical_avg']['sd'])} | "
                     f"{_p(m['top1']['mean'])} |")
    lines += ["", "Paired differences (mAP points, same seed; 95% t-interval over seeds). *holds*: the interval is "
              "above 0; *reversed*: below 0; *not resolved*: it contains 0.", "",
              "| difference | mAP mean | sd | 95% CI | | vertical-avg mean | 95% CI | |",
              "|---|---:|---:|---|---|---:|---|---|"]
    for d in summary["differences"]:
        a, v = d["map"], d["map_vertical_avg"]
        lines.append(f"| {d['name']} | {_p(a['mean'])} | {_p(a['sd'])} | [{_p(a['low'])}, {_p(a['high'])}] | "
                     f"{a['verdict']} | {_p(v['mean'])} | [{_p(v['low'])}, {_p(v['high'])}] | {v['verdict']} |")
    secs = summary["seconds_per_seed"]
    lines += ["", "Seconds per seed (all stages): " + ", ".join(f"seed {s}: {secs[s]:.0f}" for s in seeds), ""]
    return "\n".join(lines)


def write_summary(out: str, seeds: Sequence[int]) -> Dict[str, str]:
    results = {s: checkpoint.read_json(os.path.join(seed_dir(out, s), "report", "results.json")) for s in seeds}
    summary = summarize(results)
    files = {"table": os.path.join(out, "summary.md"), "json": os.path.join(out, "summary.json")}
    checkpoint.write_text(files["table"], markdown(summary))
    checkpoint.write_json(files["json"], summary)
    return files
