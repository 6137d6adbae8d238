"""Command line: `kc run` performs the whole method; `kc data|specialists|cache|student|eval|report` one stage.

    kc run                          # the default preset into ./kc-out
    kc run --preset eft-100k --out runs/eft
    kc run --resume --out kc-out    # after an interruption: the saved config, finished stages and work kept
    kc run --seeds 0,1,2 --out runs/s   # one run per seed in runs/s/seed-N, then runs/s/summary.md
    kc student --config my.yaml --seed 3 --out kc-out
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional

from kc import checkpoint, config, pipeline, runfolder, seeds
from kc import distributed as kcdist
from kc.cache import CacheMismatch
from kc.data import DataError
from kc.taxonomy import TaxonomyError
from kc.train import TrainingCollapsed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kc", description="Knowledge Concentration: specialists distilled into one "
                                                       "student over many classes.")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"run": "all stages: data, specialists, cache, student, eval, report",
             "data": "taxonomy and data (synthetic shards, or checks real data)",
             "specialists": "train one teacher per vertical",
             "cache": "run each teacher once over its vertical's training samples; keep top-K",
             "student": "train the student runs (generalist, +D, +D+S per head)",
             "eval": "per-vertical mAP, top-1/top-5, parameters and time per sample of every model",
             "report": "markdown table, JSON and plots",
             "config": "print the resolved config as YAML"}
    for name, h in helps.items():
        s = sub.add_parser(name, help=h, description=h)
        s.add_argument("--preset", default=None,
                       help="default | diagnostics | eft-100k | wordnet-small | tiny (default: the config saved in "
                            "--out when there is one, else default)")
        s.add_argument("--config", default=None, help="YAML file overriding the preset's keys")
        s.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
        s.add_argument("--out", default="kc-out", help="output directory (default: kc-out)")
        s.add_argument("--threads", type=int, default=None,
                       help="torch threads (default: the config's threads; 0, its default, means one per core "
                            "this process may run on that other work is not using, at least one)")
        s.add_argument("--progress", dest="progress", action="store_true", default=None,
                       help="always show progress bars (default: only on a terminal)")
        s.add_argument("--no-progress", dest="progress", action="store_false")
        if name in ("run", "report"):
            s.add_argument("--seeds", default=None,
                           help="several seeds, e.g. 0,1,2 or 0-4: one run per seed in OUT/seed-N, then "
                                "OUT/summary.md with means, SDs and paired differences with 95%% intervals")
        if name != "config":
            s.add_argument("--resume", action="store_true",
                           help="continue an interrupted run: skip finished stages, keep finished work")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides = {}
        if args.seed is not None:
            overrides["seed"] = args.seed
        if args.threads is not None:
            overrides["threads"] = args.threads
        seed_list = None
        if getattr(args, "seeds", None):
            if args.seed is not None:
                raise config.ConfigError("--seed and --seeds: give one of them")
            try:
                seed_list = seeds.parse_seeds(args.seeds)
            except ValueError as e:
                raise config.ConfigError(str(e)) from None
        if seed_list:
            _join(_config(args, overrides, seeds.seed_dir(args.out, seed_list[0])))
            return _multi_seed(args, overrides, seed_list)
        cfg = _config(args, overrides, args.out)
        if args.command == "config":
            print(cfg.to_yaml(), end="")
            return 0
        _join(cfg)
        pipeline.configure_torch(cfg)
        ws = pipeline.Workspace(args.out, cfg, _progress(args))
        ws.open()
        if args.command == "run":
            pipeline.run_all(ws, resume=args.resume)
        else:
            pipeline.run_stage(ws, args.command, resume=args.resume)
        return 0
    except (config.ConfigError, TaxonomyError, DataError, CacheMismatch, pipeline.StageError,
            runfolder.RunFolderError, FileNotFoundError, TrainingCollapsed, checkpoint.DamagedFile, OSError) as e:
        _error(e)
        return 2
    except KeyboardInterrupt:
        print(f"kc: interrupted; continue with: {resume_command(args)}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the command line reports every failure in one line
        _error(f"{type(e).__name__}: {e}")
        return 2
    finally:
        runfolder.release()
        kcdist.shutdown()


def _join(cfg: config.RunConfig) -> None:
    """Under torchrun with W > 1: joins the process group (kc/distributed.py); else nothing."""
    try:
        kcdist.init(cfg.device, cfg.dist_timeout)
    except ValueError as e:
        raise config.ConfigError(str(e)) from None


def _error(e) -> None:
    print("kc: error: " + " ".join(str(e).split()), file=sys.stderr)


def _config(args, overrides, out: str) -> config.RunConfig:
    """--preset and --config when given; else the config saved in a run folder of kc's at out (so that
    `kc run --resume --out DIR` continues DIR's run as it was started); else the default preset."""
    saved = os.path.join(out, "config.yaml")
    if (args.preset is None and args.config is None and os.path.isfile(saved)
            and os.path.isfile(os.path.join(out, runfolder.MARKER))):
        return config.load_saved(saved, overrides)
    return config.load(args.preset or "default", args.config, overrides)


def resume_command(args) -> str:
    """The command that continues an interrupted one: the saved config is read from --out, so --out (and
    --seeds) suffice once config.yaml is there; before that, the original config arguments are kept."""
    cmd = ["kc", args.command, "--resume", "--out", os.path.abspath(args.out)]
    if getattr(args, "seeds", None):
        cmd += ["--seeds", args.seeds]
        saved = os.path.join(seeds.seed_dir(args.out, seeds.parse_seeds(args.seeds)[0]), "config.yaml")
    else:
        saved = os.path.join(args.out, "config.yaml")
    if not os.path.isfile(saved):
        for flag, value in (("--preset", args.preset), ("--config", args.config), ("--seed", args.seed)):
            if value is not None:
                cmd += [flag, os.path.abspath(value) if flag == "--config" else str(value)]
    return " ".join(shlex.quote(c) for c in cmd)


def _progress(args):
    """Progress bars on rank 0 only."""
    return pipeline.progress_factory(args.progress) if kcdist.is_main() else None


def _multi_seed(args, overrides, seed_list) -> int:
    """Every seed's run (or report) in OUT/seed-N, then the summary over seeds."""
    if kcdist.is_main():  # OUT holds the seeds' folders and the summary: kc's folder too
        runfolder.claim(args.out)
        runfolder.lock(args.out)
    for s in seed_list:
        out = seeds.seed_dir(args.out, s)
        cfg = _config(args, dict(overrides, seed=s), out)
        pipeline.configure_torch(cfg)
        ws = pipeline.Workspace(out, cfg, _progress(args))
        ws.open()
        pipeline.log(f"seed {s} ({seed_list.index(s) + 1} of {len(seed_list)}) in {ws.out}")
        if args.command == "run":
            pipeline.run_all(ws, resume=args.resume)
        else:
            pipeline.run_stage(ws, "report", resume=args.resume)
        ws.close()
    if not kcdist.is_main():
        return 0
    files = seeds.write_summary(args.out, seed_list)
    with open(files["table"]) as f:
        print(f.read())
    pipeline.log("summary over seeds: " + ", ".join(os.path.abspath(p) for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
