"""Student training: the generalist (hard labels only) and the distilled students (+D, and +D+S with the
self-paced scale), with the controls that separate the effects (the scale on hard labels alone, a normalised head
at a fixed gamma, a gamma per class), all through one call of kc_kernels.linear_soft_target_loss per batch.

Distillation targets are the cached teacher top-K (of every vertical the row has a label in) concatenated with all
the row's hard labels; the op adds duplicates, so z = (1 - w) * teacher + w * hard stays in [0, 1]
(w = student.hard_weight). A student trains at most student.epochs epochs and stops early on its validation mAP
(kc/validation.py), keeping its best epoch's weights. The checkpoint (model, optimizer, position in the epoch, loss
history, early-stopping state and the best weights) is rewritten atomically every epoch and every
`checkpoint_seconds` (config), so a killed run resumes mid-stage with the same result.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from kc import checkpoint, validation
from kc import distributed as kcdist
from kc.cache import TeacherCache
from kc.data import SampleSet
from kc.models import Student, build_student
from kc.taxonomy import Taxonomy

CURVE_POINTS_PER_EPOCH = 20
HEALTH_CHECKS_PER_EPOCH = 4
PROBE_ELEMENTS = 1 << 24  # probe rows x classes scored by a health check


class TrainingCollapsed(RuntimeError):
    """The student stopped depending on its input (or its units died): training further would waste the time."""


def head_seed(seed: int, head: str) -> int:
    """The initialisation seed of a student: one per (seed, head), shared by every method of the head, so that
    generalist, +D and +D+S differ only in what they are trained on."""
    return seed * 7919 + sum(map(ord, head))


def probe_rows(train: SampleSet, num_classes: int, seed: int) -> np.ndarray:
    n = max(16, min(256, PROBE_ELEMENTS // max(num_classes, 1)))
    rng = np.random.default_rng([seed, 29])
    return np.sort(rng.choice(len(train), min(n, len(train)), replace=False))


@torch.no_grad()
def health(model: Student, x: torch.Tensor) -> Dict[str, float]:
    """Two signs of a collapsed student on a fixed probe batch.

    dead: the share of the backbone's last units that are zero on every probe row (dead ReLUs pass no gradient).
    spread: how much the logits, less the bias, vary across inputs: mean over classes of their standard deviation
    over the probe rows, over their root mean square. About 1 for a network that looks at its input; near 0 when
    every row gets the same scores (under the self-paced scale: when u has the same direction for every row, so
    that u / ||u|| no longer depends on the input)."""
    was = model.training
    model.eval()
    f = model.backbone(x)
    dead = float((f.reshape(f.shape[0], -1) <= 0).all(0).float().mean())
    y = model.scores(x) - model.head.bias
    rms = float(torch.sqrt((y * y).mean())) + 1e-12
    spread = float(y.std(0).mean()) / rms if y.shape[0] > 1 else 1.0
    model.train(was)
    return {"dead": dead, "spread": spread}


def check_health(cfg, run: str, h: Dict[str, float], start: Dict[str, float], where: str) -> None:
    """Raises TrainingCollapsed when the dead share reaches collapse_dead, or the spread has fallen below
    collapse_spread times its value at initialisation (inputs that differ little give a small spread from the
    start, which is not a collapse)."""
    st = cfg.student
    rel = h["spread"] / max(start["spread"], 1e-12)
    if h["dead"] >= st.collapse_dead or rel < st.collapse_spread:
        raise TrainingCollapsed(
            f"student {run} collapsed at {where}: {100 * h['dead']:.0f}% of the backbone's last units dead "
            f"(limit {100 * st.collapse_dead:.0f}%), logit spread across inputs {h['spread']:.4f}, "
            f"{rel:.4f} of its initial {start['spread']:.4f} (limit {st.collapse_spread}). The output no longer "
            "depends on the input; training stopped. Try a lower student.lr or student.scale_lr, another "
            "student.scale_init, or student.bias_init: prior.")


def parse_run(name: str) -> Tuple[str, str]:
    method, _, head = name.partition("-")
    return method, head


# methods trained on hard labels alone (no teacher cache)
HARD_ONLY = ("generalist", "scaled")
# methods whose normalised head uses student.scale; self_paced_class always learns a gamma per class
SCALED = ("self_paced", "bayes_self_paced", "scaled", "fixed_scale")


def distils(method: str) -> bool:
    return method not in HARD_ONLY


def run_scale(cfg, method: str) -> str:
    if method == "self_paced_class":
        return "class"
    return cfg.student.scale if method in SCALED else "none"


def learns_scale(method: str) -> bool:
    """fixed_scale keeps gamma at its start (student.scale_init): the normalisation without the self-pacing."""
    return method != "fixed_scale"


def label_counts(labels, num_classes: int) -> np.ndarray:
    return np.bincount(labels.indices, minlength=num_classes)


def make_student(cfg, taxonomy: Taxonomy, input_shape, run: str) -> Student:
    method, head = parse_run(run)
    model = build_student(cfg, input_shape, taxonomy, head, run_scale(cfg, method), backend=cfg.backend)
    if model.log_scale is not None and not learns_scale(method):
        model.log_scale.requires_grad_(False)
    return model


def vertical_gamma(log_scale: Optional[torch.Tensor], segments) -> Optional[list]:
    """gamma per vertical (a class-level scale: the geometric mean over the vertical's classes), or None."""
    if log_scale is None:
        return None
    ls = log_scale.detach().float().cpu()
    seg = list(segments)
    if ls.numel() == len(seg) - 1:
        return ls.exp().tolist()
    return [float(ls[a:b].mean().exp()) for a, b in zip(seg, seg[1:])]


def make_targets(method: str, hard: np.ndarray, cache: Optional[TeacherCache], idx: np.ndarray,
                 hard_weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(target_index, target_value) for a batch: hard labels, or teacher top-K + weighted hard labels."""
    hard_t = torch.from_numpy(hard)
    hard_v = (hard_t >= 0).float()
    if not distils(method):
        return hard_t, hard_v
    t_idx, t_val = cache.batch(idx)
    t_val = torch.where(t_idx >= 0, t_val, torch.zeros_like(t_val))
    return torch.cat([t_idx, hard_t], 1), torch.cat([(1 - hard_weight) * t_val, hard_weight * hard_v], 1)


def _optimizer(cfg, model: Student):
    st = cfg.student
    main = [p for n, p in model.named_parameters() if n != "log_scale"]
    groups = [{"params": main, "lr": st.lr, "weight_decay": st.weight_decay}]
    if model.scale is not None and model.log_scale.requires_grad:
        groups.append({"params": [model.log_scale], "lr": st.scale_lr, "weight_decay": 0.0})
    return torch.optim.Adam(groups, **adam_options(main))


def adam_options(params) -> Dict:
    """Adam's fused implementation (one kernel for every parameter of a step, the same update) where torch has
    one for the parameters' device and dtype: a default student's step spent 0.9 ms of its 6 ms in the loop of
    per-tensor updates on CPU."""
    p = next(iter(params), None)
    ok = p is not None and p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) and \
        p.device.type in ("cpu", "cuda")
    return {"fused": True} if ok else {}


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5%, then cosine decay to 5%."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))  # a float: the optimizer's state is saved


def train_student(cfg, taxonomy: Taxonomy, train: SampleSet, run: str, path: str, seed: int,
                  cache: Optional[TeacherCache] = None, progress: Optional[Callable] = None,
                  val: Optional[SampleSet] = None) -> Dict:
    """Trains (or finishes training) one student; returns its checkpoint dict (state, history, seconds), the
    model holding its best epoch's weights when val is given (early stopping), its last epoch's otherwise.

    Under torchrun (kc.distributed.active()) every rank calls this together: the output layer is sharded by
    verticals, the backbone is data-parallel, rank 0 writes the (whole, unsharded) checkpoint, and the returned
    model is this rank's shard. There rank 0 scores the validation split with the gathered student and every rank
    takes its early-stopping decision."""
    method, _ = parse_run(run)
    if distils(method) and cache is None:
        raise ValueError(f"run {run!r} distils and needs the teacher cache")
    st = cfg.student
    torch.manual_seed(head_seed(seed, parse_run(run)[1]))
    model = make_student(cfg, taxonomy, train.input_shape, run)
    if st.bias_init == "prior":
        model.init_bias(label_counts(train.labels, taxonomy.num_classes), len(train))
    model = model.to(cfg.device)
    # under torchrun: this rank keeps its verticals' rows of the output layer (kc/distributed.py)
    shards = kcdist.StudentShards.shard(model) if kcdist.active() else None
    if val is not None and not len(val):
        val = None
    opt = _optimizer(cfg, model)
    base_lrs = [g["lr"] for g in opt.param_groups]
    n = len(train)
    steps = -(-n // st.batch_size)
    total = st.epochs * steps
    state = {"run": run, "epoch": 0, "step": 0, "history": {"step": [], "loss": [], "epoch_loss": [],
             "scale": [], "health": []}, "seconds": 0.0, "done": False, "early": validation.new_state()}
    best = None  # the best epoch's weights so far (validation mAP): this rank's shard under torchrun
    best_full = None  # the same, whole, for the checkpoint (rank 0)
    if os.path.exists(path):
        ck = checkpoint.load(path)
        if shards is None:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
        else:  # the file holds the whole student, whatever the process count that wrote it
            shards.load_full_state(model, opt, ck["model"], ck["optimizer"])
        state = ck["state"]
        state.setdefault("early", validation.new_state())  # a checkpoint from before early stopping
        best_full = ck.get("best")
        best = best_full if shards is None or best_full is None else _shard_of(shards, best_full)
        if state["done"]:
            return {"model": model, **state}
    width = max(int(np.diff(train.labels.indptr).max()), 1)
    hard_all = train.labels.padded(np.arange(n), width)  # every row's labels, padded, made once
    bar = progress(total=total, initial=state["epoch"] * steps + state["step"], desc=f"student {run}",
                   unit="step") if progress else None
    every = max(1, steps // CURVE_POINTS_PER_EPOCH)
    check_every = max(1, steps // HEALTH_CHECKS_PER_EPOCH)
    probe = train.inputs(probe_rows(train, taxonomy.num_classes, seed)).to(cfg.device)
    check = health if shards is None else shards.health
    if "health_start" not in state:  # measured on the initial weights (kept in the checkpoint for a resume)
        state["health_start"] = check(model, probe)
    last_save = time.time()
    model.train()
    while not state["done"] and state["epoch"] < st.epochs:
        e = state["epoch"]
        perm = np.random.default_rng([seed, 23, e]).permutation(n)
        run_sum, run_cnt = state.get("run_sum", 0.0), state.get("run_cnt", 0)  # a loss-curve point in the making
        epoch_sum = state.get("epoch_sum", 0.0)
        t0 = time.time()
        for s in range(state["step"], steps):
            idx = perm[s * st.batch_size:(s + 1) * st.batch_size]
            x = train.inputs(idx if shards is None else shards.my_rows(idx)).to(cfg.device)
            ti, tv = make_targets(method, hard_all[idx], cache, idx, st.hard_weight)
            f = _lr_factor(e * steps + s, total)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * f
            if shards is None:
                loss = model.loss(x, ti.to(cfg.device), tv.to(cfg.device))
            else:  # x: this rank's rows; targets: the whole batch's
                loss = shards.loss(model, x, len(idx), ti.to(cfg.device), tv.to(cfg.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if shards is not None:
                shards.reduce_gradients(model)
            opt.step()
            lv = float(loss.item())
            run_sum, run_cnt = run_sum + lv, run_cnt + 1
            epoch_sum += lv
            if run_cnt == every or s == steps - 1:
                state["history"]["step"].append(e * steps + s + 1)
                state["history"]["loss"].append(run_sum / run_cnt)
                run_sum, run_cnt = 0.0, 0
            state["step"] = s + 1
            if (s + 1) % check_every == 0 or s == steps - 1:
                h = check(model, probe)
                state["history"].setdefault("health", []).append([e * steps + s + 1, h["dead"], h["spread"]])
                check_health(cfg, run, h, state["health_start"], f"epoch {e + 1}, step {s + 1} of {steps}")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=e + 1, loss=f"{lv:.3f}", refresh=False)
            due = time.time() - last_save > cfg.checkpoint_seconds and s + 1 < steps
            if due if shards is None else kcdist.agree(due):  # every rank joins the gather of a save
                state.update(epoch_sum=epoch_sum, run_sum=run_sum, run_cnt=run_cnt)
                state["seconds"] += time.time() - t0
                t0 = time.time()
                _save(path, model, opt, state, shards, best_full)
                last_save = time.time()
        state["history"]["epoch_loss"].append(epoch_sum / steps)
        if model.scale is not None:
            state["history"]["scale"].append(model.scale.detach().cpu().tolist())
        state.update(epoch=e + 1, step=0, epoch_sum=0.0, run_sum=0.0, run_cnt=0)
        if val is not None:
            gained, full = _validate(cfg, taxonomy, val, run, model, opt, shards, state, train.input_shape)
            if gained:
                best = validation.copy_state(model)
                best_full = best if shards is None else full
        state["seconds"] += time.time() - t0
        state["done"] = state["epoch"] >= st.epochs or state["early"]["stopped_early"]
        if state["done"]:
            if best is not None:  # the model kept is the best epoch's; the optimizer is no longer needed
                model.load_state_dict(best)
            best = best_full = None
            whole = model.state_dict() if shards is None else (shards.full_state(model, opt) or [{}])[0]
            state["gamma"] = vertical_gamma(whole.get("log_scale"), model.segments.tolist())
            state["record"] = validation.summary(state["early"] if val is not None else None, state["epoch"],
                                                 st.epochs)
        _save(path, model, opt, state, shards, best_full)
        last_save = time.time()
    if bar is not None:
        bar.close()
    model.eval()
    return {"model": model, **state}


def _validate(cfg, taxonomy, val, run, model, opt, shards, state, input_shape) -> Tuple[bool, Optional[Dict]]:
    """Scores the validation split after an epoch and updates the early-stopping state; returns (whether the epoch
    is the best so far, the whole student's weights on rank 0 under torchrun). There rank 0 scores the gathered
    student and every rank takes its decisions."""
    def score(m):
        return validation.student_map(m, taxonomy, val, cfg.eval.row_chunk, cfg.eval.class_chunk, cfg.device)

    early, stop = state["early"], cfg.stopping
    if shards is None:
        return validation.update(early, state["epoch"], score(model), stop.patience, stop.min_delta), None
    full = shards.full_state(model, opt)  # every rank joins the gather
    gained = False
    if full is not None:
        whole = make_student(cfg, taxonomy, input_shape, run)
        whole.load_state_dict(full[0])
        gained = validation.update(early, state["epoch"], score(whole.to(cfg.device)), stop.patience,
                                   stop.min_delta)
        full = {k: v.detach().clone() for k, v in full[0].items()}  # the backbone's are the live tensors
    early["stopped_early"] = kcdist.agree(early["stopped_early"])
    return kcdist.agree(gained), full


def _shard_of(shards, full: Dict) -> Dict:
    """This rank's rows of a whole student's state dict."""
    lo, hi = shards.class_range
    return {k: (v[lo:hi] if k in shards.sharded else v) for k, v in full.items()}


def _save(path, model, opt, state, shards=None, best=None):
    if shards is None:
        ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}
        if best is not None:  # early stopping resumes with the best weights it had kept
            ck["best"] = best
        checkpoint.save(ck, path)
        return
    full = shards.full_state(model, opt)  # the whole student, gathered to rank 0, which writes it
    if full is not None:
        ck = {"model": full[0], "optimizer": full[1], "state": state}
        if best is not None:
            ck["best"] = best
        checkpoint.save(ck, path)


def load_student(cfg, taxonomy: Taxonomy, input_shape, run: str, path: str) -> Tuple[Student, Dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no student checkpoint for {run!r}; run `kc student` first")
    ck = checkpoint.load(path)
    if not ck["state"]["done"]:
        raise RuntimeError(f"{path}: student {run!r} is only partly trained; run `kc student --resume`")
    model = make_student(cfg, taxonomy, input_shape, run)
    model.load_state_dict(ck["model"])
    return model.to(cfg.device).eval(), ck["state"]
