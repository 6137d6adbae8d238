"""The stages of a run and the output directory they share.

    out/.kc-run, .kc-lock  kc's marker and the one-run-at-a-time lock (kc/runfolder.py)
    out/config.yaml        the run's config (a resumed run must match it; `--resume` alone reads it)
    out/state.json         which stages are finished
    out/taxonomy.csv       the label space
    out/data/{train,val,test}  feature shards (synthetic data; real data is read where data.path points, its
                           val/ folder or a seeded hold-out of its train/)
    out/specialists/       one teacher checkpoint per vertical
    out/cache/             the teacher cache (index.npy, value.npy, manifest.json)
    out/cache-bayes/       the same from the generator's Bayes posterior (bayes_* methods, synthetic data)
    out/students/          one checkpoint per student run
    out/eval/              one JSON of metrics per model
    out/report/            results.md, results.json, map_per_vertical.png, gap_closed.png, loss_curves.png

Every stage reuses the finished part of an interrupted run of itself when asked to resume: teachers, cache
verticals, student epochs (and the position inside an epoch), evaluated models. A stage writes into
`<its folder>.kc-build/` and swaps it in by rename once complete, so its previous results stay whole until then.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from kc import cache as cache_mod
from kc import (
    checkpoint,
    config,
    data,
    evaluate,
    label_space,
    models,
    progress,
    report,
    runfolder,
    synthetic,
    taxonomy,
    teachers,
    train,
)
from kc import distributed as kcdist

STAGES = ("data", "specialists", "cache", "student", "eval", "report")
# under torchrun: stages every rank runs its part of; the others run on rank 0 while the rest wait
PARALLEL_STAGES = ("specialists", "student")
STAGE_DIRS = ("data", "specialists", "cache", "cache-bayes", "students", "eval", "report")


class StageError(RuntimeError):
    """A stage cannot run: an earlier stage is missing, or the output directory belongs to another run."""


def progress_factory(enabled: Optional[bool] = None) -> Callable:
    from tqdm.auto import tqdm

    def make(iterable=None, **kw):
        kw.setdefault("disable", None if enabled is None else not enabled)
        kw.setdefault("mininterval", 0.5)
        kw.setdefault("dynamic_ncols", True)
        return tqdm(iterable, **kw)

    return make


def log(msg: str) -> None:
    if kcdist.is_main():  # one log for a multi-process run
        from tqdm import tqdm

        tqdm.write(f"[kc] {msg}")  # above a stage's progress bar, which is drawn again below it
        sys.stdout.flush()


class Workspace:
    def __init__(self, out: str, cfg: config.RunConfig, progress: Optional[Callable] = None):
        self.out, self.cfg = os.path.abspath(out), cfg
        self.progress = progress
        self.data_dir = os.path.join(self.out, "data")
        self.specialists_dir = os.path.join(self.out, "specialists")
        self.cache_dir = os.path.join(self.out, "cache")
        self.bayes_cache_dir = os.path.join(self.out, "cache-bayes")
        self.students_dir = os.path.join(self.out, "students")
        self.eval_dir = os.path.join(self.out, "eval")
        self.report_dir = os.path.join(self.out, "report")
        self.state_path = os.path.join(self.out, "state.json")
        self._tax = None
        self._splits = {}

    # ------------------------------------------------------------------ state
    def open(self) -> None:
        """Claims and locks the folder (kc/runfolder.py), finishes what a killed run left half done, and creates
        it for this run or checks that it holds this same run (same config)."""
        main = kcdist.is_main()
        if main:  # under torchrun rank 0 claims the folder and writes config.yaml while the others wait
            runfolder.claim(self.out)
            runfolder.lock(self.out)
            if runfolder.recover(self.out, STAGE_DIRS):
                log(f"removed the temporary files of an interrupted write in {self.out}")
        else:
            kcdist.barrier()
        cpath = os.path.join(self.out, "config.yaml")
        if os.path.exists(cpath):
            saved = config.read_saved(cpath)
            try:  # keys added to the config since that run was made take their defaults, as that run did
                saved = config.from_dict(saved).to_dict()
            except (config.ConfigError, TypeError, ValueError):
                pass  # compared as written: the difference is reported below
            mine = self.cfg.to_dict()
            diff = sorted(k for k in set(saved) | set(mine)
                          if k not in config.RUNTIME_KEYS and saved.get(k) != mine.get(k))
            if diff:
                raise StageError(f"{self.out} holds a run with another config (differs in: {', '.join(diff)}); "
                                 "use another --out, or the same preset/config/seed as that run")
        elif main:
            checkpoint.write_text(cpath, self.cfg.to_yaml())
        if main:
            kcdist.barrier()

    def close(self) -> None:
        runfolder.release(self.out)

    def state(self) -> Dict:
        if os.path.exists(self.state_path):
            return checkpoint.read_json(self.state_path)
        return {"stages": {}}

    def done(self, stage: str) -> bool:
        return bool(self.state()["stages"].get(stage, {}).get("done"))

    def mark(self, stage: str, seconds: float, **info) -> None:
        st = self.state()
        st["stages"][stage] = dict(info, done=True, seconds=round(seconds, 2))
        for later in STAGES[STAGES.index(stage) + 1:]:  # a redone stage makes later results stale
            if later in st["stages"]:
                st["stages"][later]["done"] = False
        checkpoint.write_json(self.state_path, st)

    def require(self, stage: str) -> None:
        if not self.done(stage):
            raise StageError(f"stage {stage!r} has not finished in {self.out}; run `kc {stage} --out {self.out}` "
                             f"(or `kc run --resume --out {self.out}`) first")

    # ------------------------------------------------------------------ shared inputs
    def taxonomy(self) -> taxonomy.Taxonomy:
        if self._tax is None:
            self.require("data")
            self._tax = taxonomy.load(os.path.join(self.out, "taxonomy.csv"))
        return self._tax

    def split(self, name: str) -> Optional[data.SampleSet]:
        """train, val or test; val is None where there is none (data.val_per_class or data.val_fraction 0)."""
        if name not in self._splits:
            d = self.cfg.data
            if d.kind == "synthetic":
                path = os.path.join(self.data_dir, name)
                self._splits[name] = (None if name == "val" and not os.path.isdir(path) else
                                      data.open_split(d.kind, path, self.taxonomy(), d.image_size))
            else:
                self._splits[name] = data.open_real_split(d.kind, d.path, name, self.taxonomy(), d.image_size,
                                                          d.val_fraction, self.cfg.seed)
        return self._splits[name]

    def student_path(self, run: str, directory: Optional[str] = None) -> str:
        return os.path.join(directory or self.students_dir, f"{run}.pt")

    def expected_cache(self, bayes: bool = False) -> Dict:
        tax, tr = self.taxonomy(), self.split("train")
        sums = (teachers.bayes_checksums(self.cfg.seed, tax.num_verticals) if bayes
                else teachers.checksums(self.specialists_dir, tax.num_verticals))
        return cache_mod.expected_manifest(tax, tr, self.cfg.cache.top_k, sums, data.fingerprint(tr))

    def generator(self) -> synthetic.SyntheticGenerator:
        return synthetic.SyntheticGenerator(self.taxonomy(), self.cfg.data, self.cfg.seed)

    def uses_bayes(self) -> bool:
        return any(m.startswith("bayes_") for m in self.cfg.student.methods)


# ---------------------------------------------------------------------------------------------- stages

def stage_data(ws: Workspace, resume: bool) -> Dict:
    cfg = ws.cfg
    tax = label_space.from_config(cfg.taxonomy, cfg.seed)  # a file, WordNet subtrees or a generated taxonomy
    tax.save(os.path.join(ws.out, "taxonomy.csv"))
    ws._tax, ws._splits = tax, {}
    log(f"taxonomy: {tax.summary()}")
    if cfg.data.kind == "synthetic":
        sizes = synthetic.write_synthetic(runfolder.begin(ws.data_dir, resume=False), tax, cfg.data, cfg.seed,
                                     ws.progress)
        runfolder.commit(ws.data_dir)
    else:
        sizes = {}
        for split in ("train", "val", "test"):
            s = ws.split(split)
            sizes[split] = len(s) if s is not None else 0
    sizes.setdefault("val", 0)
    log(f"data: {sizes['train']} training, {sizes['val']} validation and {sizes['test']} test samples "
        f"({cfg.data.kind})")
    return {"train": sizes["train"], "val": sizes["val"], "test": sizes["test"]}


def stage_specialists(ws: Workspace, resume: bool) -> Dict:
    tax, tr = ws.taxonomy(), ws.split("train")
    if kcdist.active():
        return _specialists_split(ws, resume)
    d = runfolder.begin(ws.specialists_dir, resume)
    teachers.train_specialists(ws.cfg, tax, tr, d, ws.cfg.seed, ws.progress, resume=resume, val=ws.split("val"))
    runfolder.commit(ws.specialists_dir)
    return {"teachers": tax.num_verticals}


def _specialists_split(ws: Workspace, resume: bool) -> Dict:
    """Under torchrun: each rank trains the teachers of its head shard's verticals (a teacher depends only on
    the seed and its vertical, so they are the single-process teachers)."""
    tax, tr = ws.taxonomy(), ws.split("train")
    if kcdist.is_main():
        runfolder.begin(ws.specialists_dir, resume)
    kcdist.barrier()
    d = ws.specialists_dir + runfolder.BUILD
    mine = kcdist.my_verticals(tax.segments.tolist())
    for v in mine:
        path = teachers.teacher_path(d, v)
        if not (resume and os.path.exists(path)):
            model = teachers.train_specialist(ws.cfg, tax, tr, v, ws.cfg.seed, ws.progress, ws.split("val"))
            teachers.save_specialist(path, model, v, len(tax.classes_of(v)))
    log(f"specialists: rank 0 trained verticals {mine.start}-{mine.stop - 1}, {kcdist.world()} ranks in all")
    kcdist.barrier()  # every teacher written before the folder is swapped in
    if kcdist.is_main():
        runfolder.commit(ws.specialists_dir)
    return {"teachers": tax.num_verticals}


def stage_cache(ws: Workspace, resume: bool) -> Dict:
    ws.require("specialists")
    tax, tr = ws.taxonomy(), ws.split("train")
    ts = teachers.load_specialists(ws.cfg, tax, tr.input_shape, ws.specialists_dir)
    d = runfolder.begin(ws.cache_dir, resume, adopt="copy")  # the arrays are memmaps written in place
    m = cache_mod.build(d, ts, tax, tr, ws.expected_cache(), ws.cfg.cache.batch_size, ws.cfg.device, ws.progress)
    size = sum(os.path.getsize(os.path.join(d, f)) for f in (cache_mod.INDEX_FILE, cache_mod.VALUE_FILE))
    log(f"teacher cache: top-{m['top_k']} of {m['num_samples']} samples, {size / 2**20:.1f} MiB")
    info = {"top_k": m["top_k"], "bytes": size, "teacher_recall": teacher_recall(d, tr)}
    log(f"teacher cache: the true class is in the top-{m['top_k']} of {100 * info['teacher_recall']:.1f}% of rows")
    if ws.uses_bayes():
        b = runfolder.begin(ws.bayes_cache_dir, resume, adopt="copy")
        cache_mod.build(b, teachers.bayes_teachers(ws.generator(), tax.num_verticals), tax, tr,
                        ws.expected_cache(bayes=True), ws.cfg.cache.batch_size, "cpu", ws.progress)
        info["bayes_teacher_recall"] = teacher_recall(b, tr)
        log(f"Bayes teacher cache: true class in the top-{m['top_k']} of "
            f"{100 * info['bayes_teacher_recall']:.1f}% of rows")
        runfolder.commit(ws.bayes_cache_dir)
    runfolder.commit(ws.cache_dir)
    return info


def teacher_recall(directory: str, train_set: data.SampleSet, rows: int = 20000) -> float:
    """Share of (a sample of) training rows whose fine class is among the cached top-K: distillation from a
    cache that mostly misses the true class distils noise."""
    c = cache_mod.TeacherCache(directory)
    idx = np.random.default_rng(0).choice(len(train_set), min(rows, len(train_set)), replace=False)
    ti, _ = c.batch(idx)
    fine = torch.from_numpy(train_set.labels.fine()[idx])
    return float((ti == fine[:, None]).any(1).float().mean())


def stage_student(ws: Workspace, resume: bool) -> Dict:
    cfg = ws.cfg
    tax, tr = ws.taxonomy(), ws.split("train")
    runs = cfg.runs()
    caches = {}
    if any(train.distils(train.parse_run(r)[0]) for r in runs):
        ws.require("cache")
        caches["specialists"] = cache_mod.TeacherCache(ws.cache_dir, ws.expected_cache())
    if ws.uses_bayes():
        caches["bayes"] = cache_mod.TeacherCache(ws.bayes_cache_dir, ws.expected_cache(bayes=True))
    if kcdist.is_main():
        runfolder.begin(ws.students_dir, resume)
    kcdist.barrier()  # no rank may read a stale checkpoint
    d = ws.students_dir + runfolder.BUILD
    out = {}
    for run in runs:
        cache = caches.get("bayes" if run.startswith("bayes_") else "specialists")
        res = train.train_student(cfg, tax, tr, run, ws.student_path(run, d), cfg.seed, cache, ws.progress,
                                  val=ws.split("val"))
        rec = res.get("record") or {}
        out[run] = {"seconds": round(res["seconds"], 2), "final_loss": res["history"]["epoch_loss"][-1],
                    "epochs": res["epoch"], "best_epoch": rec.get("best_epoch", res["epoch"])}
        log(f"student {run}: {res['epoch']} epochs (best {out[run]['best_epoch']}), final epoch loss "
            f"{out[run]['final_loss']:.4f} ({res['seconds']:.1f}s)")
    kcdist.barrier()  # rank 0 has written every checkpoint
    if kcdist.is_main():
        runfolder.commit(ws.students_dir)
    return out


def _eval_student(ws: Workspace, run: str) -> Dict:
    cfg, tax, te = ws.cfg, ws.taxonomy(), ws.split("test")
    model, state = train.load_student(cfg, tax, te.input_shape, run, ws.student_path(run))
    scorer = evaluate.StudentScorer(model, te, cfg.eval.row_chunk, cfg.device)
    res = evaluate.evaluate(scorer, tax, te, cfg.eval.class_chunk, ws.progress)
    method, head = train.parse_run(run)
    st = cfg.student
    res.update(parameters=models.count_parameters(model),
               head_weights=models.head_weight_count(head, sb=st.sb, N=tax.num_classes, M=tax.num_verticals,
                                                     s1=st.s1, s2=st.s2, s1s=st.s1s, s1i=st.s1i, s2_fc=st.s2_fc,
                                                     shared=st.shared),
               ms_per_sample=evaluate.time_per_sample(model.scores, te, cfg.eval.timing_batch, cfg.device),
               train_seconds=state["seconds"], history=state["history"], method=method, head=head,
               scale=train.run_scale(cfg, method),
               training=state.get("record") or {"epochs": state["epoch"]},
               gamma=state.get("gamma"))
    return res


def _eval_specialists(ws: Workspace) -> Dict:
    cfg, tax, te = ws.cfg, ws.taxonomy(), ws.split("test")
    ts = teachers.load_specialists(cfg, tax, te.input_shape, ws.specialists_dir)
    scorer = evaluate.SpecialistScorer(ts, tax, te, cfg.eval.row_chunk, cfg.device)
    res = evaluate.evaluate(scorer, tax, te, cfg.eval.class_chunk, ws.progress)

    def all_teachers(x):
        return [t(x) for t in ts]

    recs = teachers.records(ws.specialists_dir, tax.num_verticals)
    res.update(parameters=sum(models.count_parameters(t) for t in ts),
               ms_per_sample=evaluate.time_per_sample(all_teachers, te, cfg.eval.timing_batch, cfg.device),
               history={}, method="specialists", head="", scale="none",
               train_seconds=sum((r or {}).get("train_seconds", 0.0) for r in recs),
               # wall time apart from the rest, as for every model (train_seconds)
               training={"per_vertical": [{k: v for k, v in (r or {}).items() if k != "train_seconds"}
                                          for r in recs]})
    return res


def _eval_bayes(ws: Workspace) -> Dict:
    cfg, tax, te = ws.cfg, ws.taxonomy(), ws.split("test")
    scorer = evaluate.BayesScorer(ws.generator(), te, cfg.eval.row_chunk)
    res = evaluate.evaluate(scorer, tax, te, cfg.eval.class_chunk, ws.progress)
    res.update(parameters=0, ms_per_sample=float("nan"), history={}, method="bayes", head="", scale="none")
    return res


def evaluated_models(ws: Workspace) -> List[str]:
    """Student runs, the specialists, and (synthetic data of a size where it is cheap) the Bayes posterior."""
    cfg = ws.cfg
    extra = ["specialists"]
    # the posterior models one object a row: rows spanning verticals (data.multi_vertical) are beyond it
    if (cfg.data.kind == "synthetic" and cfg.eval.bayes and cfg.data.multi_vertical == 0
            and len(ws.split("test")) * ws.taxonomy().num_classes <= 1e9):
        extra.append("bayes")
    return cfg.runs() + extra


def stage_eval(ws: Workspace, resume: bool) -> Dict:
    ws.require("student")
    d = runfolder.begin(ws.eval_dir, resume)
    out = {}
    for run in evaluated_models(ws):
        path = os.path.join(d, f"{run}.json")
        if resume and os.path.exists(path):
            res = checkpoint.read_json(path)
        else:
            t0 = time.time()
            res = (_eval_specialists(ws) if run == "specialists" else _eval_bayes(ws) if run == "bayes"
                   else _eval_student(ws, run))
            res["eval_seconds"] = round(time.time() - t0, 2)
            checkpoint.write_json(path, res)
        out[run] = res["map"]
        log(f"eval {report.label(run)}: mAP {100 * res['map']:.2f}%, top-1 {100 * res['top1']:.2f}%, "
            f"top-5 {100 * res['top5']:.2f}% ({res['eval_seconds']:.1f}s)")
    runfolder.commit(ws.eval_dir)
    return {"map": out}


def stage_report(ws: Workspace, resume: bool) -> Dict:
    ws.require("eval")
    cfg, tax = ws.cfg, ws.taxonomy()
    runs = evaluated_models(ws)
    evals = {r: checkpoint.read_json(os.path.join(ws.eval_dir, f"{r}.json")) for r in runs}
    histories = {r: evals[r].pop("history", {}) for r in runs}
    results = {"name": cfg.name, "seed": cfg.seed, "num_classes": tax.num_classes, "verticals": tax.vertical_names,
               "vertical_sizes": tax.vertical_sizes().tolist(), "num_train": len(ws.split("train")),
               "num_test": len(ws.split("test")), "scale": cfg.student.scale, "scale_init": cfg.student.scale_init,
               "config": cfg.to_dict(),
               "stage_seconds": {k: v.get("seconds") for k, v in ws.state()["stages"].items()},
               "num_val": len(ws.split("val")) if ws.split("val") is not None else 0,
               "compute": compute(evals, ws.state()["stages"]),
               "models": evals}
    written = report.write(results, {r: h for r, h in histories.items() if h}, runfolder.begin(ws.report_dir, False))
    runfolder.commit(ws.report_dir)
    files = {k: os.path.join(ws.report_dir, os.path.basename(p)) for k, p in written.items()}
    print(report.markdown(results))
    log("report files: " + ", ".join(files.values()))  # absolute: a path the reader can open from anywhere
    return {"files": files}


def compute(evals: Dict, stages: Dict) -> Dict:
    """Wall seconds of training each model (validation included), and the method's total beside the generalist's:
    a distilled student costs the specialists, the teacher cache and its own training."""
    spec = evals.get("specialists", {}).get("train_seconds") or 0.0
    cache = (stages.get("cache") or {}).get("seconds") or 0.0
    out = {"specialists_seconds": round(spec, 2), "cache_seconds": round(cache, 2), "students": {}}
    for run, res in evals.items():
        if run in ("specialists", "bayes") or "train_seconds" not in res:
            continue
        own = res["train_seconds"]
        total = own + (spec + cache if train.distils(res.get("method", "generalist")) else 0.0)
        out["students"][run] = {"train_seconds": round(own, 2), "method_seconds": round(total, 2)}
    return out


STAGE_FUNCS = {"data": stage_data, "specialists": stage_specialists, "cache": stage_cache,
               "student": stage_student, "eval": stage_eval, "report": stage_report}


def run_stage(ws: Workspace, stage: str, resume: bool = False) -> Dict:
    if stage != "data":
        ws.require(STAGES[STAGES.index(stage) - 1])
    t0, c0 = time.time(), time.process_time()
    log(f"stage {stage} ...")
    checkpoint.enter_stage(stage)
    # training stages: one thread for small steps where kc chooses the threads (step_threads)
    threads = step_threads(ws.cfg, step_macs(ws, stage)) if stage in PARALLEL_STAGES else torch.get_num_threads()
    # the stage's parts (teachers, students, evaluated models) draw one bar with the time left for all of them
    bar = _stage_bar(ws, stage, resume)
    factory = ws.progress
    ws.progress = bar.part if bar is not None else factory
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if not kcdist.active():
            info = STAGE_FUNCS[stage](ws, resume)
        else:  # torchrun: rank 0 alone runs data, cache, eval and report; every rank waits for the stage's end
            info = STAGE_FUNCS[stage](ws, resume) if stage in PARALLEL_STAGES or kcdist.is_main() else {}
            kcdist.barrier()
            if stage in PARALLEL_STAGES:
                info["processes"] = kcdist.world()
    finally:
        torch.set_num_threads(before)
        ws.progress = factory
        if bar is not None:
            bar.close()
    dt, cpu = time.time() - t0, time.process_time() - c0
    if kcdist.is_main():
        ws.mark(stage, dt, peak_rss_mib=round(peak_rss_mib()), cpu_seconds=round(cpu, 2), threads=threads,
                load=load_average(), **{k: v for k, v in info.items() if k != "files"})
    kcdist.barrier()  # state.json is written before any rank reads it
    what = progress.summary(stage, info)
    log(f"stage {stage} done in {dt:.1f}s ({machine_line(cpu, threads)}){': ' + what if what else ''} (peak "
        f"memory so far {peak_rss_mib():.0f} MiB)")
    return info


def _stage_bar(ws: Workspace, stage: str, resume: bool) -> Optional[progress.Stage]:
    """A bar over the items of the stage still to do (a resumed stage's finished items are not counted)."""
    if ws.progress is None or stage not in ("specialists", "student", "eval"):
        return None
    if stage == "specialists":
        tax = ws.taxonomy()
        mine = kcdist.my_verticals(tax.segments.tolist()) if kcdist.active() else range(tax.num_verticals)
        build = ws.specialists_dir + runfolder.BUILD
        todo = [v for v in mine if not (resume and os.path.exists(teachers.teacher_path(build, v)))]
        return progress.Stage(ws.progress, "specialists", len(todo), unit="step")
    if stage == "student":
        build = ws.students_dir + runfolder.BUILD
        todo = [r for r in ws.cfg.runs() if not (resume and _finished_student(ws.student_path(r, build)))]
        return progress.Stage(ws.progress, "students", len(todo), unit="step")
    build = ws.eval_dir + runfolder.BUILD
    todo = [m for m in evaluated_models(ws) if not (resume and os.path.exists(os.path.join(build, f"{m}.json")))]
    return progress.Stage(ws.progress, "evaluation", len(todo), unit="chunk")


def _finished_student(path: str) -> bool:
    try:
        return bool(checkpoint.load(path)["state"]["done"])
    except Exception:  # noqa: BLE001 - missing or damaged: the stage trains it (and reports a damaged file)
        return False


def run_all(ws: Workspace, resume: bool = False) -> None:
    st = ws.state()["stages"]
    if not resume and any(v.get("done") for v in st.values()):
        raise StageError(f"{ws.out} already holds (part of) a run; pass --resume to continue it, or use another --out")
    t0, c0 = time.time(), time.process_time()
    for stage in STAGES:
        if resume and ws.done(stage):
            log(f"stage {stage}: already done, skipped")
            continue
        run_stage(ws, stage, resume=resume)
    log(f"all stages done in {time.time() - t0:.1f}s ({machine_line(time.process_time() - c0)}; peak memory "
        f"{peak_rss_mib():.0f} MiB)")
    log(f"report: {os.path.join(ws.report_dir, 'results.md')} (figures and results.json beside it)")


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the system has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return None


def machine_line(cpu_seconds: float, threads: Optional[int] = None) -> str:
    """CPU seconds of this process (all its threads), its threads and the machine's load: a wall time measured
    next to other work reads against them (on one thread, CPU seconds are about the wall time of a quiet core)."""
    n = torch.get_num_threads() if threads is None else threads
    load = load_average()
    return (f"CPU {cpu_seconds:.1f}s, {n} thread{'s' if n != 1 else ''}"
            + (f", load average {load:.1f}" if load is not None else ""))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def cores() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS has no affinity masks
        return os.cpu_count() or 1


def auto_threads() -> int:
    """Threads when the config leaves them to kc: one per core this process may run on that other work is not
    already using (the 1-minute load average), at least one. On busy cores torch's threads wait on each other at
    every parallel step: a 2,000-class teacher's training step took 20 ms on one thread and 200-570 ms on two,
    on 2 cores under a load of 10."""
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this system
        busy = 0.0
    return max(1, min(cores(), int(cores() - busy + 0.5)))


# A training step whose output layer takes fewer multiply-adds than this (batch x classes x the width feeding
# them) runs on one thread where kc chooses the threads (config `threads: 0`). Such a step is a few milliseconds
# of small GEMMs and kernel calls: on a quiet 2-core machine a second thread made the default job's training 17%
# faster (teachers and students 109 -> 90 s), while on cores that other jobs share (load 3-5) every parallel
# region waits for a preempted thread: a student's step (128 x 2,000 x 32) took 188 ms instead of 6.5 ms, a
# teacher's (128 x 481 x 128) 38 ms instead of 5.4 ms. One count also keeps a run's models the same whatever the
# load at its start (a thread count changes the order of a GEMM's sums).
SMALL_STEP_MACS = 1 << 25


def step_macs(ws: "Workspace", stage: str) -> int:
    """Multiply-adds of the output layer in one training step of the stage (the largest of its models)."""
    cfg, tax = ws.cfg, ws.taxonomy()
    if stage == "specialists":
        hidden = cfg.specialists.hidden[-1] if cfg.student.backbone == "mlp" else cfg.student.sb
        return cfg.specialists.batch_size * int(tax.vertical_sizes().max()) * hidden
    st = cfg.student
    widths = [st.s2, st.s2_fc]
    if "fc_fc_matched" in st.heads:
        widths.append(models.matched_width(sb=st.sb, N=tax.num_classes, M=tax.num_verticals, s1=st.s1, s2=st.s2,
                                           s1s=st.s1s))
    return st.batch_size * tax.num_classes * max(widths)


def step_threads(cfg: config.RunConfig, macs: int) -> int:
    """Threads of a training loop: the config's when it gives them; else one for small steps (SMALL_STEP_MACS)
    and the count chosen for the run (auto_threads) for larger ones."""
    if cfg.threads:
        return cfg.threads
    return 1 if macs < SMALL_STEP_MACS else torch.get_num_threads()


def configure_torch(cfg: config.RunConfig) -> None:
    torch.set_num_threads(cfg.threads or auto_threads())
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise config.ConfigError(f"device: {cfg.device!r} requested but no CUDA device is available")
    if cfg.backend != "auto":
        import kc_kernels

        found = kc_kernels.backends()
        if found.get(cfg.backend) is not True:
            usable = ", ".join(["auto"] + [b for b, ok in found.items() if ok is True])
            why = getattr(found.get(cfg.backend), "reason", "unknown backend")
            raise config.ConfigError(f"backend: {cfg.backend!r} cannot run here ({why}); usable here: {usable}")
    np.seterr(invalid="ignore")
    if sys.version_info < (3, 9):  # pragma: no cover
        raise RuntimeError("kc needs Python 3.9+")
