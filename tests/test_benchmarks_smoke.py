"""One tiny run of the benchmark table, so that a broken benchmark script is noticed (timings are not checked)."""
import json

from benchmarks.__main__ import main


def test_benchmark_table_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--device", "cpu", "--shapes", "16x8x300", "--rounds", "2", "--peers", "eager", "--num-sampled", "32",
          "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    impls = {(r["case"], r["impl"]) for r in rows}
    assert ("sigmoid-k100", "gemm-floor") in impls and ("sigmoid-k100", "kc-cpu") in impls
    assert ("sampled-softmax", "kc-cpu") in impls and ("student-step", "kc") in impls
    assert all(r["median_ms"] > 0 for r in rows if r["impl"] in ("kc-cpu", "gemm-floor"))
    assert "ratio" in capsys.readouterr().out


def test_distill_part_runs_with_its_floor_and_peers(tmp_path):
    out = tmp_path / "distill.json"
    main(["--device", "cpu", "--parts", "distill", "--distill-shape", "16,8,300,12", "--rounds", "1",
          "--peers", "eager", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    impls = {(r["case"], r["impl"]) for r in rows}
    for case in ("head-kl", "head-jsd"):
        want = {(case, "gemm-floor(4)"), (case, "kc-cpu"), (case, "kc-cpu-given-logits"), (case, "torch-eager")}
        assert want <= impls
    assert {("hard-ce-options", "kc-cpu-ce"), ("hard-ce-options", "kc-cpu-ce+extras")} <= impls
    assert all(r["median_ms"] > 0 for r in rows if not r["note"])


def test_bad_options_are_one_line_errors_naming_the_option(monkeypatch):
    import pytest
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, option in ((["--device", "cuda"], "--device"), (["--dtype", "fp33"], "--dtype"),
                         (["--parts", "soft-target,foo"], "--parts"), (["--peers", "tf"], "--peers"),
                         (["--losses", "mse"], "--losses"), (["--rounds", "0"], "--rounds"),
                         (["--memory-budgets", "a,b"], "--memory-budgets")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        msg = str(e.value)
        assert msg.startswith(f"python -m benchmarks: {option}: ") and "\n" not in msg


def test_default_results_go_outside_the_source_tree(monkeypatch, tmp_path):
    from benchmarks.__main__ import default_out_dir

    monkeypatch.delenv("KC_BENCH_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_out_dir() == tmp_path / "kc" / "benchmarks"
    monkeypatch.setenv("KC_BENCH_DIR", str(tmp_path / "mine"))
    assert default_out_dir() == tmp_path / "mine"
