import math

import numpy as np
import pytest

from kc import seeds


def test_parse_seeds():
    assert seeds.parse_seeds("0,1,2") == [0, 1, 2]
    assert seeds.parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("", "3-1", "1,1"):
        with pytest.raises(ValueError):
            seeds.parse_seeds(bad)


def test_t_interval_known_values():
    mean, sd, lo, hi = seeds.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and sd == 1.0
    assert hi - mean == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(seeds.t_interval([1.0])[2])


def _res(maps):
    return {"name": "x", "stage_seconds": {"data": 1.0}, "models": {
        r: {"map": m, "map_vertical_avg": m / 2, "top1": 0.5} for r, m in maps.items()}}


def test_summary_pairs_and_verdicts():
    results = {s: _res({"generalist-fc_sc": 0.50 + 0.05 * s, "distilled-fc_sc": 0.52 + 0.05 * s + 0.001 * s,
                        "self_paced-fc_sc": 0.51 + 0.05 * s, "distilled-fc_fc_matched": 0.40, "specialists": 0.7})
               for s in (0, 1, 2)}
    summary = seeds.summarize(results)
    d = {x["name"]: x for x in summary["differences"]}
    assert d["+D FC-SC - Generalist FC-SC"]["map"]["verdict"] == "holds"
    assert d["+D+S FC-SC - +D FC-SC"]["map"]["verdict"] == "reversed"
    assert d["+D FC-SC - +D FC-FC(=)"]["map"]["mean"] == pytest.approx(np.mean([0.12, 0.171, 0.222]))
    assert summary["models"]["generalist-fc_sc"]["map"]["sd"] == pytest.approx(0.05)
    md = seeds.markdown(summary)
    assert "holds" in md and "reversed" in md


def test_the_controls_are_paired():
    runs = ["generalist-fc_sc", "distilled-fc_sc", "self_paced-fc_sc", "scaled-fc_sc", "fixed_scale-fc_sc",
            "self_paced_class-fc_sc"]
    pairs = {(a, b) for _, a, b in seeds.comparisons(runs)}
    for a, b in (("scaled", "generalist"), ("self_paced", "scaled"), ("fixed_scale", "distilled"),
                 ("self_paced", "fixed_scale"), ("self_paced", "self_paced_class")):
        assert (f"{a}-fc_sc", f"{b}-fc_sc") in pairs
