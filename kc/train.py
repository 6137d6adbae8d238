"""Student training: the generalist (hard labels only) and the distilled students (+D, and +D+S with the
self-paced scale), all through one call of kc_kernels.linear_soft_target_loss per batch.

Distillation targets are the cached teacher top-K concatenated with the hard labels; the op adds duplicates, so
z = (1 - w) * teacher + w * hard stays in [0, 1]. The checkpoint (model, optimizer, position in the epoch, loss
history) is rewritten atomically every epoch and every `CHECKPOINT_SECONDS`, so a killed run resumes mid-stage.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from kc import checkpoint
from kc.cache import TeacherCache
from kc.data import SampleSet
from kc.models import Student, build_student
from kc.taxonomy import Taxonomy

CHECKPOINT_SECONDS = 60.0
CURVE_POINTS_PER_EPOCH = 20


def parse_run(name: str) -> Tuple[str, str]:
    method, _, head = name.partition("-")
    return method, head


def run_scale(cfg, method: str) -> str:
    return cfg.student.scale if method == "self_paced" else "none"


def make_student(cfg, taxonomy: Taxonomy, input_shape, run: str) -> Student:
    method, head = parse_run(run)
    return build_student(cfg, input_shape, taxonomy, head, run_scale(cfg, method), backend=cfg.backend)


def make_targets(method: str, hard: np.ndarray, cache: Optional[TeacherCache], idx: np.ndarray, hard_weight: float):
    """(target_index, target_value) for a batch: hard labels, or teacher top-K + weighted hard labels."""
    hard_t = torch.from_numpy(hard)
    hard_v = (hard_t >= 0).float()
    if method == "generalist":
        return hard_t, hard_v
    t_idx, t_val = cache.batch(idx)
    t_val = torch.where(t_idx >= 0, t_val, torch.zeros_like(t_val))
    return torch.cat([t_idx, hard_t], 1), torch.cat([(1 - hard_weight) * t_val, hard_weight * hard_v], 1)


def _optimizer(cfg, model: Student):
    st = cfg.student
    main = [p for n, p in model.named_parameters() if n != "log_scale"]
    groups = [{"params": main, "lr": st.lr, "weight_decay": st.weight_decay}]
    if model.scale is not None:
        groups.append({"params": [model.log_scale], "lr": st.scale_lr, "weight_decay": 0.0})
    return torch.optim.Adam(groups)


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5%, then cosine decay to 5%."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * t))


def train_student(cfg, taxonomy: Taxonomy, train: SampleSet, run: str, path: str, seed: int,
                  cache: Optional[TeacherCache] = None, progress: Optional[Callable] = None) -> Dict:
    """Trains (or finishes training) one student; returns its checkpoint dict (state, history, seconds)."""
    method, _ = parse_run(run)
    if method != "generalist" and cache is None:
        raise ValueError(f"run {run!r} distils and needs the teacher cache")
    st = cfg.student
    run_seed = seed * 7919 + sum(map(ord, run))
    torch.manual_seed(run_seed)
    model = make_student(cfg, taxonomy, train.input_shape, run).to(cfg.device)
    opt = _optimizer(cfg, model)
    base_lrs = [g["lr"] for g in opt.param_groups]
    n = len(train)
    steps = -(-n // st.batch_size)
    total = st.epochs * steps
    state = {"run": run, "epoch": 0, "step": 0, "history": {"step": [], "loss": [], "epoch_loss": [],
             "scale": []}, "seconds": 0.0, "done": False}
    if os.path.exists(path):
        ck = checkpoint.load(path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        if state["done"]:
            return {"model": model, **state}
    width = max(int(np.diff(train.labels.indptr).max()), 1)
    bar = progress(total=total, initial=state["epoch"] * steps + state["step"], desc=f"student {run}",
                   unit="step") if progress else None
    every = max(1, steps // CURVE_POINTS_PER_EPOCH)
    last_save = time.time()
    model.train()
    while state["epoch"] < st.epochs:
        e = state["epoch"]
        perm = np.random.default_rng([seed, 23, e]).permutation(n)
        run_sum, run_cnt = 0.0, 0
        epoch_sum = state.get("epoch_sum", 0.0)
        t0 = time.time()
        for s in range(state["step"], steps):
            idx = perm[s * st.batch_size:(s + 1) * st.batch_size]
            x = train.inputs(idx).to(cfg.device)
            ti, tv = make_targets(method, train.labels.padded(idx, width), cache, idx, st.hard_weight)
            f = _lr_factor(e * steps + s, total)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * f
            loss = model.loss(x, ti.to(cfg.device), tv.to(cfg.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lv = float(loss.item())
            run_sum, run_cnt = run_sum + lv, run_cnt + 1
            epoch_sum += lv
            if run_cnt == every or s == steps - 1:
                state["history"]["step"].append(e * steps + s + 1)
                state["history"]["loss"].append(run_sum / run_cnt)
                run_sum, run_cnt = 0.0, 0
            state["step"] = s + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=e + 1, loss=f"{lv:.3f}", refresh=False)
            if time.time() - last_save > CHECKPOINT_SECONDS and s + 1 < steps:
                state["epoch_sum"] = epoch_sum
                state["seconds"] += time.time() - t0
                t0 = time.time()
                _save(path, model, opt, state)
                last_save = time.time()
        state["history"]["epoch_loss"].append(epoch_sum / steps)
        if model.scale is not None:
            state["history"]["scale"].append(model.scale.detach().cpu().tolist())
        state.update(epoch=e + 1, step=0, epoch_sum=0.0)
        state["seconds"] += time.time() - t0
        state["done"] = state["epoch"] >= st.epochs
        _save(path, model, opt, state)
        last_save = time.time()
    if bar is not None:
        bar.close()
    model.eval()
    return {"model": model, **state}


def _save(path, model, opt, state):
    checkpoint.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}, path)


def load_student(cfg, taxonomy: Taxonomy, input_shape, run: str, path: str) -> Tuple[Student, Dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no student checkpoint for {run!r}; run `kc student` first")
    ck = checkpoint.load(path)
    if not ck["state"]["done"]:
        raise RuntimeError(f"{path}: student {run!r} is only partly trained; run `kc student --resume`")
    model = make_student(cfg, taxonomy, input_shape, run)
    model.load_state_dict(ck["model"])
    return model.to(cfg.device).eval(), ck["state"]
