"""Validation: the mAP of a model on the validation split after each epoch, and the early-stopping rule that reads
it. Every model (each specialist, each student) stops on its own validation mAP and keeps its best epoch's weights;
the test split is scored once, at the end (kc/evaluate.py), and steers nothing.

Why mAP and not the validation loss: the students are trained on different targets (hard labels, teacher soft
targets, either under a learned scale), so their losses are not one quantity, while mAP is the metric the report
compares them on. AP is kc.evaluate's (ties counted as in the test evaluation).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch

from kc import evaluate
from kc.data import SampleSet


def block_ap(S: torch.Tensor, P: torch.Tensor) -> np.ndarray:
    """AP of each column of scores S [N, C] with positives P [N, C] (bool): the mean over a class's positives of
    (positives scoring at least as high) / (rows scoring at least as high), ties counted as kc.evaluate counts
    them; NaN for a column without positives.

    Without sorting the N scores: each column's m positives are sorted (padded with +inf), every row finds by
    binary search how many of them it reaches, and a suffix sum of those counts gives, for each positive, the rows
    scoring at least as high. A validation split has few positives a class, so this is O(N C log m)."""
    St, Pt = S.t().contiguous(), P.t()
    npos = Pt.sum(1)
    m = int(npos.max()) if Pt.numel() else 0
    if m == 0:
        return np.full(S.shape[1], np.nan)
    inf = torch.tensor(float("inf"), dtype=St.dtype)
    p = torch.where(Pt, St, inf).topk(m, dim=1, largest=False).values  # ascending, +inf after the positives
    reached = torch.searchsorted(p, St, right=True)  # [C, N]: positives at or below each row's score
    hist = torch.zeros(p.shape[0], m + 1, dtype=torch.float64).scatter_add_(
        1, reached, torch.ones(reached.shape, dtype=torch.float64))
    at_least = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # [C, m]: rows scoring >= the k-th positive
    pos_at_least = npos[:, None] - torch.searchsorted(p, p, right=False)
    real = torch.arange(m)[None, :] < npos[:, None]
    prec = torch.where(real, pos_at_least / at_least.clamp_min(1), torch.zeros((), dtype=torch.float64))
    return (prec.sum(1) / npos).numpy()  # 0 / 0 = NaN without positives


@torch.no_grad()
def specialist_map(teacher, val: SampleSet, first: int, size: int, row_chunk: int, class_chunk: int,
                   device="cpu") -> float:
    """mAP of one teacher over its vertical's classes on every validation row (rows of other verticals are its
    negatives, as in the test evaluation)."""
    was = teacher.training
    teacher.eval()
    # the hidden units of every row ([N, H], small), then the logits a chunk of classes at a time
    h = torch.cat([teacher.backbone(val.inputs(np.arange(r, min(r + row_chunk, len(val)))).to(device)).float()
                   for r in range(0, len(val), row_chunk)])
    teacher.train(was)
    lab = val.labels
    keep = (lab.indices >= first) & (lab.indices < first + size)
    row = np.repeat(np.arange(len(lab)), np.diff(lab.indptr))[keep]
    col = lab.indices[keep].astype(np.int64) - first
    ap = []
    for c0 in range(0, size, class_chunk):
        c1 = min(size, c0 + class_chunk)
        S = (h @ teacher.out.weight[c0:c1].float().t() + teacher.out.bias[c0:c1].float()).cpu()
        P = torch.zeros(S.shape, dtype=torch.bool)
        m = (col >= c0) & (col < c1)
        P[torch.from_numpy(row[m]), torch.from_numpy(col[m] - c0)] = True
        ap.append(block_ap(S, P))
    return _mean(np.concatenate(ap))


def _mean(ap: np.ndarray) -> float:
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


@torch.no_grad()
def student_map(model, taxonomy, val: SampleSet, row_chunk: int, class_chunk: int, device="cpu") -> float:
    """mAP of a student over all classes on the validation rows."""
    was = model.training
    model.eval()
    scorer = evaluate.StudentScorer(model, val, row_chunk, device)
    ap = evaluate.ap_per_class(scorer, taxonomy, val, class_chunk)
    model.train(was)
    return _mean(ap)


def new_state() -> Dict:
    """Early-stopping state (JSON-able, so a student's checkpoint carries it through a kill and resume)."""
    return {"val_map": [], "best_map": None, "best_epoch": 0, "since_best": 0, "stopped_early": False}


def update(state: Dict, epoch: int, value: float, patience: int, min_delta: float) -> bool:
    """Records the validation mAP after `epoch` (1-based); True when it is the best so far (the first epoch always
    is; a gain must exceed min_delta; NaN never gains). Sets state['stopped_early'] when the model has gone
    `patience` epochs without a gain (patience 0: never)."""
    state["val_map"].append(None if not math.isfinite(value) else float(value))
    best = state["best_map"]
    gained = state["best_epoch"] == 0 or (math.isfinite(value) and (best is None or value > best + min_delta))
    if gained:
        state.update(best_map=None if not math.isfinite(value) else float(value), best_epoch=epoch, since_best=0)
    else:
        state["since_best"] += 1
        state["stopped_early"] = patience > 0 and state["since_best"] >= patience
    return gained


def copy_state(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def summary(state: Optional[Dict], epochs_run: int, max_epochs: int) -> Dict:
    """What the report gives of a model's training (its wall time is kept apart, as every timing is): epochs
    run, the maximum, the best epoch and its validation mAP, the curve, whether it stopped early. Without a
    validation split the best epoch is the last."""
    s = state or new_state()
    return {"epochs": epochs_run, "max_epochs": max_epochs, "best_epoch": s["best_epoch"] or epochs_run,
            "val_map": s["best_map"], "val_curve": list(s["val_map"]), "stopped_early": bool(s["stopped_early"])}
