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
