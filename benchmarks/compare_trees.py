"""Interleaved before/after timing of two source trees of kc (e.g. two commits, each built in place).

    python -m benchmarks.compare_trees --before /path/to/old/tree --after . [--shapes 1024x512x100000] [--rounds 9]

One worker process per tree imports that tree's kc_kernels (and its compiled extension) and times one call of
forward + backward of linear_soft_target_loss on the cpu backend when asked; the coordinator asks them in turn,
the order alternating from round to round, so that only one runs at a time and the machine's drift lands on both
alike. A case's ratio is the median of the per-round ratios after / before. Inputs are drawn the same way in both
(benchmarks.common.make_problem of the after tree, passed as tensors through a file). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import common

_WORKER = r"""
import sys, time, json, torch
sys.path.insert(0, sys.argv[1])
import kc_kernels
cases = torch.load(sys.argv[2], weights_only=True)
fns = {}
for name, c in cases.items():
    x, w, b = (c[k].clone().requires_grad_() for k in ("x", "weight", "bias"))
    kw = {k[3:]: v for k, v in c.items() if k.startswith("kw_")}
    kw.update(json.loads(c["plain"].numpy().tobytes().decode()) if "plain" in c else {})
    def run(x=x, w=w, b=b, kw=kw):
        x.grad = w.grad = b.grad = None
        kc_kernels.linear_soft_target_loss(x, w, b, backend="cpu", **kw).backward()
    run(); run()
    fns[name] = run
print("ready", flush=True)
for line in sys.stdin:
    name = line.strip()
    t0 = time.perf_counter(); fns[name](); ms = (time.perf_counter() - t0) * 1e3
    print(f"{ms:.4f}", flush=True)
"""


def _case_file(shapes, losses, path: Path) -> list:
    cases, names = {}, []
    for B, H, V in shapes:
        for loss in losses:
            p = common.make_problem(loss, B, H, V, torch.device("cpu"))
            name = f"{loss} B={B} H={H} V={V}"
            c = {"x": p.x.detach(), "weight": p.weight.detach(), "bias": p.bias.detach()}
            plain = {}
            for k, v in p.kwargs.items():
                if isinstance(v, torch.Tensor):
                    c["kw_" + k] = v
                else:
                    plain[k] = v
            c["plain"] = torch.frombuffer(bytearray(json.dumps(plain).encode()), dtype=torch.uint8)
            cases[name] = c
            names.append(name)
    torch.save(cases, path)
    return names


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare_trees", description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", default=".")
    ap.add_argument("--shapes", default="1024x512x100000")
    ap.add_argument("--losses", default=",".join(common.LOSSES))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cases.pt"
        names = _case_file(shapes, args.losses.split(","), path)
        env = dict(os.environ, PYTHONPATH="")
        workers = {}
        for tag, tree in (("before", args.before), ("after", args.after)):
            tree = str(Path(tree).resolve())
            workers[tag] = subprocess.Popen([sys.executable, "-c", _WORKER, tree, str(path)], cwd=tmp, env=env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert workers[tag].stdout.readline().strip() == "ready", f"{tag} worker failed to start"
        times = {(n, t): [] for n in names for t in workers}
        for r in range(args.rounds):
            for name in names:
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for tag in order:
                    w = workers[tag]
                    w.stdin.write(name + "\n")
                    w.stdin.flush()
                    times[(name, tag)].append(float(w.stdout.readline()))
        for w in workers.values():
            w.stdin.close()
            w.wait()
    rows = []
    print(f"{'case':<44} {'before ms':>10} {'after ms':>10} {'after/before':>13} {'q25-q75':>12}")
    for name in names:
        b, a = times[(name, "before")], times[(name, "after")]
        ratios = sorted(x / y for x, y in zip(a, b))
        q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]  # noqa: E731
        row = {"case": name, "before_ms": statistics.median(b), "after_ms": statistics.median(a),
               "ratio": statistics.median(ratios), "ratio_q25": q(0.25), "ratio_q75": q(0.75),
               "before_rounds_ms": b, "after_rounds_ms": a}
        rows.append(row)
        print(f"{name:<44} {row['before_ms']:>10.1f} {row['after_ms']:>10.1f} {row['ratio']:>13.3f} "
              f"{row['ratio_q25']:>5.3f}-{row['ratio_q75']:<5.3f}")
    if args.out:
        meta = {"before": args.before, "after": args.after, "rounds": args.rounds, "threads": torch.get_num_threads(),
                "load_avg_end": os.getloadavg()}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
