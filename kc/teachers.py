"""Specialists: one teacher per vertical, trained with sigmoid cross-entropy over that vertical's classes.

A teacher sees its vertical's samples (every row with a label in the vertical, multi-label: fine class and
ancestors; a row spanning several verticals is a sample of each) plus some samples of other verticals as
all-negative rows, so its scores mean something on any input (the evaluation scores every test sample). It trains
at most specialists.epochs epochs and stops early on its validation mAP (kc/validation.py), keeping its best
epoch's weights. Each finished teacher is saved atomically on its own, so an interrupted stage keeps the finished
ones (an unfinished teacher restarts: it depends only on the seed and its vertical).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

import kc_kernels
from kc import checkpoint, validation
from kc.data import SampleSet
from kc.models import Specialist, build_specialist
from kc.taxonomy import Taxonomy
from kc.train import adam_options


def teacher_path(directory: str, vertical: int) -> str:
    return os.path.join(directory, f"vertical-{vertical:03d}.pt")


def local_targets(labels_padded: np.ndarray, first: int, size: int) -> np.ndarray:
    """Label ids inside [first, first + size) as local ids; every other entry becomes -1 padding."""
    local = labels_padded - first
    return np.where((labels_padded >= 0) & (local >= 0) & (local < size), local, -1)


def one_cycle(opt: torch.optim.Optimizer, max_lr: float, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle schedule, warm-up over the first 20% of the steps. torch's OneCycleLR divides by the length of
    its warm-up phase (0.2 * total - 1 steps): zero at 5 steps, negative below. Runs of 3-5 steps get a longer
    warm-up share (2 steps' worth, at most half); one or two steps run at max_lr."""
    if total < 3:
        for group in opt.param_groups:
            group["lr"] = max_lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    pct = 0.2 if total > 5 else 2.0 / total
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total, pct_start=min(pct, 0.5))


def train_specialist(cfg, taxonomy: Taxonomy, train: SampleSet, vertical: int, seed: int,
                     progress: Optional[Callable] = None, val: Optional[SampleSet] = None) -> Specialist:
    """Trains one teacher; its training record (validation.summary: epochs, best epoch, validation mAP, seconds)
    is left in model.record."""
    sp, stop = cfg.specialists, cfg.stopping
    t0 = time.time()
    torch.manual_seed(seed * 1000 + vertical)
    rng = np.random.default_rng([seed, 11, vertical])
    model = build_specialist(cfg, train.input_shape, taxonomy, vertical).to(cfg.device)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=sp.lr, weight_decay=sp.weight_decay, **adam_options(params))
    own = train.rows_of_vertical(taxonomy, vertical)[0]
    mask = np.ones(len(train), dtype=bool)
    mask[own] = False
    others = np.flatnonzero(mask)
    n_bg = min(len(others), int(round(sp.background_fraction * len(own))))
    first, size = taxonomy.classes_of(vertical).start, len(taxonomy.classes_of(vertical))
    targets = local_targets(train.labels.padded(np.arange(len(train))), first, size)  # every row's, made once
    steps = -(-(len(own) + n_bg) // sp.batch_size)
    sched = one_cycle(opt, sp.lr, sp.epochs * steps)
    bar = (progress(total=sp.epochs * steps, desc=f"specialist {vertical}", unit="step", leave=False)
           if progress else None)
    early = validation.new_state()
    best = None
    model.train()
    epochs = 0
    for _ in range(sp.epochs):
        rows = np.concatenate([own, rng.choice(others, n_bg, replace=False)]) if n_bg else own
        rows = rng.permutation(rows)
        for s in range(steps):
            idx = np.sort(rows[s * sp.batch_size:(s + 1) * sp.batch_size])
            x = train.inputs(idx).to(cfg.device)
            tgt = torch.from_numpy(targets[idx]).to(cfg.device)
            h = model.backbone(x)
            loss = kc_kernels.linear_soft_target_loss(h, model.out.weight, model.out.bias, target_index=tgt,
                                                      target_value=(tgt >= 0).float(), backend=cfg.backend)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        epochs += 1
        if val is not None and len(val):
            m = validation.specialist_map(model, val, first, size, cfg.eval.row_chunk, cfg.eval.class_chunk,
                                          cfg.device)
            if validation.update(early, epochs, m, stop.patience, stop.min_delta):
                best = validation.copy_state(model)
            if early["stopped_early"]:
                break
    if bar is not None:
        bar.close()
    if best is not None:
        model.load_state_dict(best)
    model.eval()
    model.record = dict(validation.summary(early if val is not None and len(val) else None, epochs, sp.epochs),
                        train_seconds=round(time.time() - t0, 2))
    return model


def save_specialist(path: str, model: Specialist, vertical: int, num_classes: int) -> None:
    checkpoint.save({"vertical": vertical, "state": model.state_dict(), "num_classes": num_classes,
                     "record": getattr(model, "record", None)}, path)


def records(directory: str, num_verticals: int) -> List[Optional[Dict]]:
    """Each teacher's training record (None for a checkpoint written before teachers kept one)."""
    return [checkpoint.load(teacher_path(directory, v)).get("record") for v in range(num_verticals)]


def train_specialists(cfg, taxonomy: Taxonomy, train: SampleSet, directory: str, seed: int,
                      progress: Optional[Callable] = None, resume: bool = True,
                      val: Optional[SampleSet] = None) -> List[str]:
    """Trains every missing teacher (all of them when resume is False); returns the checkpoint paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for v in range(taxonomy.num_verticals):
        path = teacher_path(directory, v)
        if not (resume and os.path.exists(path)):
            model = train_specialist(cfg, taxonomy, train, v, seed, progress, val)
            save_specialist(path, model, v, len(taxonomy.classes_of(v)))
        paths.append(path)
    return paths


def load_specialist(cfg, taxonomy: Taxonomy, input_shape, path: str) -> Specialist:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such specialist; run `kc specialists` first")
    ck = checkpoint.load(path)
    model = build_specialist(cfg, input_shape, taxonomy, ck["vertical"])
    model.load_state_dict(ck["state"])
    return model.to(cfg.device).eval()


def load_specialists(cfg, taxonomy: Taxonomy, input_shape, directory: str) -> List[Specialist]:
    return [load_specialist(cfg, taxonomy, input_shape, teacher_path(directory, v))
            for v in range(taxonomy.num_verticals)]


class BayesTeacher(torch.nn.Module):
    """Vertical v's perfect teacher on synthetic data: the generator's posterior P(k | x, row in v) over the
    vertical's classes, as logits (the cache applies the sigmoid), in place of a trained specialist."""

    def __init__(self, generator, vertical: int):
        super().__init__()
        self.gen, self.vertical = generator, vertical

    @torch.no_grad()
    def forward(self, x) -> torch.Tensor:
        logp = self.gen.class_log_posterior(x.detach().cpu().numpy(), self.vertical)
        p = np.clip(np.exp(logp), 1e-7, 1 - 1e-7)
        return torch.from_numpy(np.log(p) - np.log1p(-p)).float().to(x.device)


def bayes_teachers(generator, num_verticals: int) -> List[BayesTeacher]:
    return [BayesTeacher(generator, v) for v in range(num_verticals)]


def bayes_checksums(seed: int, num_verticals: int) -> List[str]:
    """The Bayes cache's teacher identity: the generator is fixed by the data config and the seed."""
    return [f"bayes-posterior-seed-{seed}-vertical-{v}" for v in range(num_verticals)]


def checksums(directory: str, num_verticals: int) -> List[str]:
    return [checkpoint.file_sha256(teacher_path(directory, v)) for v in range(num_verticals)]
