"""The default preset runs the paper's comparison only; the diagnostic students are one preset away; threads
follow the cores this process may use unless the config names a number."""
import os

import torch

from kc import config, pipeline


def test_default_holds_the_paper_table_and_diagnostics_adds_the_checks():
    default, diag = config.load("default"), config.load("diagnostics")
    assert default.runs() == [f"{m}-{h}" for m in ("generalist", "distilled", "self_paced") for h in ("fc_fc", "fc_sc")]
    extra = set(diag.runs()) - set(default.runs())
    assert extra and all(r.startswith("bayes_") or r.endswith("-fc_fc_matched") for r in extra)
    assert set(default.runs()) < set(diag.runs())
    a, b = default.to_dict(), diag.to_dict()  # nothing else differs
    a.pop("student"), b.pop("student"), a.pop("name"), b.pop("name")
    assert a == b


def test_threads_follow_the_idle_cores_unless_given(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # a quiet machine: every core
        pipeline.configure_torch(config.load("tiny"))
        assert torch.get_num_threads() == len(os.sched_getaffinity(0)) == pipeline.cores()
        monkeypatch.setattr(os, "getloadavg", lambda: (10.0, 9.0, 8.0))  # busy cores: one thread
        pipeline.configure_torch(config.load("tiny"))
        assert torch.get_num_threads() == 1
        pipeline.configure_torch(config.load("tiny", overrides={"threads": 3}))  # a number given is kept
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_small_training_steps_run_on_one_thread_unless_threads_are_given():
    cfg = config.load("default")
    assert pipeline.step_threads(cfg, pipeline.SMALL_STEP_MACS - 1) == 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert pipeline.step_threads(cfg, pipeline.SMALL_STEP_MACS) == 2  # large steps: the run's count
        given = config.load("default", overrides={"threads": 2})
        assert pipeline.step_threads(given, 1) == 2
    finally:
        torch.set_num_threads(before)
