"""The report's figures from a small made-up results dict: every file is written, the gap shares are right, and a
legend never overlaps the data. KC_FIGURES_DIR=<folder> keeps the PNGs there to look at."""
import os

import numpy as np
import pytest

from kc import figures, report

VERTICALS = ["birds", "cars", "dishes", "plants", "tools"]


def make_results(heads=("fc_fc", "fc_sc"), methods=("generalist", "distilled", "self_paced"), seed=0):
    rng = np.random.default_rng(seed)
    gen = rng.uniform(0.40, 0.55, len(VERTICALS))
    spec = gen + rng.uniform(0.05, 0.15, len(VERTICALS))
    step = {"generalist": 0.0, "distilled": 0.4, "self_paced": 0.7, "bayes_distilled": 0.9}
    models, histories = {}, {}
    for h, head in enumerate(heads):
        for method in methods:
            v = gen + step[method] * (spec - gen) + 0.01 * h
            run = f"{method}-{head}"
            models[run] = {"map_per_vertical": v.tolist(), "map": float(v.mean()), "top1": 0.5, "top5": 0.8,
                           "parameters": 1_000_000, "ms_per_sample": 0.01}
            steps = np.arange(10, 410, 10)
            histories[run] = {"step": steps.tolist(), "loss": (3.0 * steps ** -0.2 * (1 - step[method] / 5)).tolist()}
    models["specialists"] = {"map_per_vertical": spec.tolist(), "map": float(spec.mean()), "top1": 0.6, "top5": 0.9,
                             "parameters": 5_000_000, "ms_per_sample": 0.05}
    bayes = np.minimum(spec + 0.08, 0.99)
    models["bayes"] = {"map_per_vertical": bayes.tolist(), "map": float(bayes.mean()), "top1": 0.7, "top5": 0.95,
                       "parameters": 0, "ms_per_sample": float("nan")}
    results = {"name": "synthetic", "seed": 0, "num_classes": 500, "verticals": VERTICALS,
               "vertical_sizes": [100] * len(VERTICALS), "num_train": 1000, "num_test": 500,
               "config": {"student": {"batch_size": 128}}, "models": models}
    return results, histories


@pytest.fixture
def out_dir(tmp_path):
    keep = os.environ.get("KC_FIGURES_DIR")
    if keep:
        os.makedirs(keep, exist_ok=True)
        return keep
    return str(tmp_path)


@pytest.mark.parametrize("case", ["default", "diagnostics", "one_head"])
def test_figures_are_written(case, out_dir):
    kw = {"default": {}, "one_head": {"heads": ("fc_sc",)},
          "diagnostics": {"heads": ("fc_fc", "fc_fc_matched", "fc_sc"),
                          "methods": ("generalist", "distilled", "self_paced", "bayes_distilled")}}[case]
    results, histories = make_results(**kw)
    d = os.path.join(out_dir, case)
    os.makedirs(d, exist_ok=True)
    files = report.plots(results, histories, d)
    assert set(files) == {"loss_curves", "map_bars", "gap_closed"}
    for p in files.values():
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_gap_closed_shares():
    results, _ = make_results()
    shares = figures.gap_closed(results)
    assert set(shares) == {"distilled-fc_fc", "self_paced-fc_fc", "distilled-fc_sc", "self_paced-fc_sc"}
    np.testing.assert_allclose(shares["distilled-fc_fc"][:-1], 40.0)  # per vertical (the overall is a mean of maps)
    np.testing.assert_allclose(shares["self_paced-fc_fc"][:-1], 70.0)
    # no gap to close (the generalist at or above the specialists): no share
    results["models"]["specialists"]["map_per_vertical"][0] = results["models"]["generalist-fc_fc"][
        "map_per_vertical"][0]
    assert np.isnan(figures.gap_closed(results)["distilled-fc_fc"][0])


def test_one_colour_per_method_and_colour_blind_safe_palette():
    methods = list(figures.METHOD_ORDER)
    col = figures.colours(methods)
    assert len(set(col.values())) == len(methods)
    assert set(col.values()) <= set(figures.PALETTE)


def test_legend_is_outside_the_axes(tmp_path):
    """The legend's box lies right of every panel, so it covers no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, _ = make_results()
    seen = []
    real_savefig = plt.Figure.savefig

    def check(fig, *a, **k):
        fig.canvas.draw()
        legend = fig.legends[0].get_window_extent()
        right = max(ax.get_window_extent().x1 for ax in fig.axes)
        seen.append(legend.x0 >= right)
        return real_savefig(fig, *a, **k)

    plt.Figure.savefig = check
    try:
        figures.map_per_vertical(results, str(tmp_path / "m.png"), figures.Names(report.METHOD_LABELS,
                                                                                 report.HEAD_LABELS, report.label))
        figures.gap_figure(results, str(tmp_path / "g.png"), figures.Names(report.METHOD_LABELS,
                                                                           report.HEAD_LABELS, report.label))
    finally:
        plt.Figure.savefig = real_savefig
    assert seen == [True, True]
