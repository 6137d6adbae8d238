"""The GPU check's dry run: benchmarks/gpu.sh --dry-run drives benchmarks/gpu_check.py through every step on the
CPU at tiny shapes, so that the prepared GPU run cannot rot between the occasions a GPU is at hand. Also the pieces
of the run that only a GPU would exercise: the split of a profile's kernels and the byte model's predictions."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks import gpu_model, gpu_profile

ROOT = Path(__file__).resolve().parent.parent
DONE = ("pass", "skipped (time cap)")  # a loaded machine may cut a step's tail at its cap; nothing may fail
STEPS = ("headline", "correctness", "bench", "syncs", "determinism")


def test_gpu_check_dry_run_writes_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path))
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out-dir", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "ratio" in run.stdout and "correctness" in run.stdout
    # everything under the one folder, as the device brings back: the report, the log, the steps' records
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check-work.tar.gz", "gpu-check.json", "gpu-check.log"]
    assert "wrote" in (out / "gpu-check.log").read_text()
    with tarfile.open(out / "gpu-check-work.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {f"{s}.json" for s in STEPS} | {"steps.tsv", "build.json"} <= names, names
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["meta"]["dry_run"] and report["build"]["status"].startswith("skipped")
    steps = report["steps"]
    assert list(steps) == list(STEPS)
    for name in STEPS:
        assert steps[name]["process"]["rc"] == 0, (name, steps[name].get("log_tail"))
        assert steps[name]["result"]["complete"], name

    corr = steps["correctness"]["result"]
    assert corr["backends"]["cuda"]["available"] is False and corr["backends"]["cuda"]["reason"]
    cpu = [c for c in corr["cases"] if c["backend"] == "cpu"]
    assert cpu[0]["status"] == "pass" and all(c["status"] in DONE for c in cpu), cpu
    assert {c["dtype"] for c in cpu if c["status"] == "pass"} >= {"bf16", "fp32"}
    for c in corr["cases"]:  # every case of every backend under check has a verdict
        assert c["status"] in DONE + ("fail", "error", "unavailable"), c
    assert not [c for c in corr["cases"] if c["status"] in ("fail", "error") and c["backend"] == "cpu"]

    # the headline first, whole: kc and the floor timed in every round although one peer raises mid-case
    head = steps["headline"]["result"]["rows"]
    assert {r["case"] for r in head} == {"softmax-ce-hard"}
    impls = {r["impl"]: r for r in head}
    peer = impls["raising-peer"]  # timed in the first of the two rounds, raising in the second
    assert peer["note"].startswith("RuntimeError") and "1 of 2 rounds" in peer["note"] and peer["ratio"] > 0, peer
    assert impls["cce"]["note"] and impls["liger-flce"]["note"] and impls["cce-exact"]["note"]  # absent on CPU
    for name in ("kc-cpu", "gemm-floor"):
        assert impls[name]["median_ms"] > 0 and impls[name]["ratio"] > 0, impls[name]
        assert impls[name]["note"] == "2 rounds" and len(impls[name]["rounds_ms"]) == 2, impls[name]
    rows = report["table"]["rows"]
    assert rows[0]["case"] == "softmax-ce-hard" and len(rows) > len(head)
    assert ("sampled-softmax", "kc-cpu") in {(r["case"], r["impl"]) for r in rows}  # the bench step's first case

    # one profiled call of kc and of the floor per case, split into GEMM roles; each kc row against the model
    profs = {(p["case"], p["impl"]): p["profile"] for p in report["table"]["profiles"]}
    split = profs[("softmax-ce-hard", "kc-cpu")]["ms"]
    assert {"gemm logits", "gemm dx", "gemm dW"} <= set(split), split
    pred = [r for r in report["table"]["predictions"] if r["case"] == "softmax-ce-hard"][0]
    assert pred["predicted"]["ratio"] > 1 and pred["measured"]["ratio"] == impls["kc-cpu"]["ratio"]
    assert {p["case"] for p in report["model"]["predictions"]} >= {c.label for c in gpu_model.CASES}

    syncs = steps["syncs"]["result"]["results"]
    assert syncs and all(r["status"] in ("not counted", "skipped (time cap)") for r in syncs), syncs
    det = [r for r in steps["determinism"]["result"]["results"] if r["backend"] == "cpu"]
    assert det[0]["status"] == "pass" and all(r["status"] in DONE for r in det), det


def test_kernel_split_tells_gemm_roles_apart():
    """A GPU profile's kernels (Hopper cuBLAS names, kc's Triton and CUDA epilogues, torch's elementwise kernels)
    in launch order: a row block's logits GEMM, then dx = G W and dW = G^T x, as the driver issues them."""
    R, V, H = 1861, 128_256, 4096
    recs = [("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNT", 900.0, "aten::mm", [[R, H], [H, V], [R, V]]),
            ("_row_stats_kernel", 100.0, "", []), ("_final_kernel", 200.0, "kc_kernels::chunked_soft_target", []),
            ("void kc_cuda::final_kernel<__nv_bfloat16, float>(kc_cuda::FinalParams)", 50.0, "", []),
            ("void at::native::reduce_kernel<512, 1>", 5.0, "aten::sum", []),
            ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 800.0, "aten::mm", [[R, V], [V, H]]),
            ("void at::native::vectorized_elementwise_kernel<4>", 30.0, "aten::add_", [[8192, H], [R, H]]),
            ("nvjet_tst_128x256", 850.0, "aten::addmm_", [[V, H], [V, R], [R, H], [], []]),
            ("void at::native::vectorized_elementwise_kernel<4>", 70.0, "aten::add_", [[V, H], [V, H], []])]
    s = gpu_profile.split_kernels(recs, H)
    assert s["ms"] == {"epilogue": 0.35, "gemm dW": 0.85, "gemm dx": 0.8, "gemm logits": 0.9, "torch": 0.005,
                       "torch dW": 0.07, "torch dx": 0.03}
    assert (s["gemm_ms"], s["torch_ms"], s["dw_ms"]) == (2.55, 0.105, 0.92)
    assert s["kernels"][0]["name"].startswith("nvjet_tst_256")


def test_byte_model_follows_the_driver():
    """The plan the model derives is the driver's (the issue's numbers: 5 row blocks of the LLM CE, sigmoid chunks
    of 58,254 and 41,746), and the prediction is finite and above the floor for every case, backend and GPU."""
    ce, sig = gpu_model.CASES[0], gpu_model.CASES[1]
    w = gpu_model.walk(ce, "triton")
    assert (w.row_blocks, w.dw_in_place) == (5, False)
    assert gpu_model.walk(sig, "triton").chunks == [58_254, 41_746]
    # bf16 CE epilogue: scores read by row_stats (once in Triton, twice in CUDA), read and written by final
    assert 6.0 < gpu_model.predict(ce, "triton", gpu_model.DATASHEET["H100"])["epilogue_bytes_per_logit"] < 6.5
    assert 8.0 < gpu_model.predict(ce, "cuda", gpu_model.DATASHEET["H100"])["epilogue_bytes_per_logit"] < 8.5
    for p in gpu_model.predictions(None):
        assert 1.0 < p["ratio"] < 100 and p["epilogue_ms"] > 0, p
    assert gpu_model.gpu_of("NVIDIA H200") == "H200" and gpu_model.gpu_of("NVIDIA H100 80GB HBM3") == "H100"


def test_profile_records_link_kernels_to_their_ops():
    """On a GPU, torch.profiler lists each device kernel as an event of its own and under the aten op that launched
    it (FunctionEvent.kernels): the records pair them by name and duration, in launch order; a kernel no op lists
    (a Triton launch) has no op."""
    from collections import namedtuple

    TimeRange = namedtuple("TimeRange", "start end")
    Kernel = namedtuple("Kernel", "name device duration")

    class Event:
        def __init__(self, name, device, start, end, kernels=(), shapes=()):
            self.name, self.device_type, self.time_range = name, f"DeviceType.{device}", TimeRange(start, end)
            self.kernels, self.input_shapes = list(kernels), list(shapes)

    R, V, H = 64, 1000, 32
    events = [
        Event("aten::mm", "CPU", 0, 5, [Kernel("nvjet_logits", 0, 90.0)], [[R, H], [H, V], [R, V]]),
        Event("nvjet_logits", "CUDA", 10, 100),
        Event("_final_kernel", "CUDA", 100, 130),
        Event("aten::mm", "CPU", 6, 8, [Kernel("nvjet_dw", 0, 80.0)], [[V, R], [R, H]]),
        Event("nvjet_dw", "CUDA", 130, 210),
        Event("aten::add_", "CPU", 9, 10, [Kernel("elementwise", 0, 5.0)], [[V, H], [V, H], []]),
        Event("elementwise", "CUDA", 210, 215),
    ]
    prof = type("Prof", (), {"events": lambda self: events})()
    recs = gpu_profile._records(prof)
    assert [(r[0], r[2]) for r in recs] == [("nvjet_logits", "aten::mm"), ("_final_kernel", ""),
                                            ("nvjet_dw", "aten::mm"), ("elementwise", "aten::add_")]
    s = gpu_profile.split_kernels(recs, H)
    assert s["ms"] == {"epilogue": 0.03, "gemm dW": 0.08, "gemm logits": 0.09, "torch dW": 0.005}
