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
