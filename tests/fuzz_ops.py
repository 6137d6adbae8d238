"""Fuzz of the kc_kernels ops: random calls on every backend asked for, each judged against the float64 reference.

    python -m tests.fuzz_ops --cases 10000 --seed 0 --backends cpu,reference      # counts as JSON on stdout
    python -m tests.fuzz_ops --seed 0 --case 123 --backends cpu,reference         # one case, in this process

Case ``n`` of seed ``s`` is a pure function of (s, n, backends), so the case number reproduces it; every failure
is printed with that one-line command. The cases run in a worker subprocess: a crash (segfault, abort) of the
worker is recorded against the case it was running, and a fresh worker resumes at the next case.

A case is a call of linear_soft_target_loss, soft_target_loss or sampled_softmax_loss with random shapes (B, H, V,
K, G down to 1, odd sizes), dtypes, layouts (transposed, strided, expanded, grouped x), targets (padding,
duplicates, zero mass, dense teachers), extremes (|logits| up to 1e4, tiny and huge scales, temperatures from
0.02 to 50), sample weights, reductions, memory budgets, int16/int32/int64 indices, value checks on or off; about a
quarter of the cases carry one bad argument (wrong shape, dtype, device, value, option). Outcomes:

- ``match``: the loss and every requested gradient agree with the reference in float64 on the same dtype-rounded
  inputs, within the bound below, with the right shapes and dtypes, and are finite.
- ``expected_error``: a case with a bad argument raised ValueError whose message starts with that argument's name
  (a call with every tensor on ``meta`` may name x/logits or return a ``meta`` result of the right shape).
- failures: ``mismatch``, ``nan_inf`` (non-finite output where the reference is finite), ``missed_error`` (a bad
  argument went through), ``wrong_error`` (a ValueError naming another argument), ``unexpected_error`` (a valid
  call raised, or any exception other than ValueError), ``crash`` (the worker process died).

What "agree" means. The reference sees exactly the backend's inputs, so the only differences are the backend's own
roundings: the raw scores u = x.w come from a GEMM accumulating in the work precision and, on triton, are stored in
the input dtype, so each is off by at most dU = (e_store + 2 sqrt(H) e_acc) |x|.|w|, and each logit y by the
propagated dy (the self-paced norm included); dense targets z computed from t / T in the work precision are off by
dz (softmax: z (e^(2d) - 1), d = 4 e_acc max|t| / T). The loss is Lipschitz in y and z (sigmoid: (1 + z) dy + dz |y|
per class; softmax: T^2 (m max dy + sum z dy + sum dz (|lse| + |y|)) per segment), so a row may differ by twice
that plus rtol times the magnitude of its terms (their fp32 sums); rows are weighted and reduced like the loss. A
gradient element may differ by 4 x the gradient computed with absolute values throughout from an error of dL/dy of
(rtol + max dy + the output dtype's unit) x the magnitude of the terms of dL/dy (s + z for sigmoid, T^2 (m p + z)
for softmax, p growing by at most e^(2 dy)) plus the error the targets' dz causes, plus the output dtype's rounding
and, near underflow, the spacing of its subnormals. rtol is tests.helpers.TOLERANCES of the precision the backend
computes in (cpu: fp32 for every input dtype of the soft-target ops, except bf16 x and weight where the CPU has
native bf16: bf16 scores, as triton; triton: the input dtype; reference and sampled softmax: fp32, or fp64 for fp64
inputs). For ordinary inputs this is the usual dtype tolerance; at |logits| ~ 1e4
in half precision the rounding of u alone moves the logits by several units, and the bound says so instead of the
fuzz avoiding such cases.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit: triton runs on CPU tensors

import kc_kernels  # noqa: E402
from kc_kernels import reference, samplers  # noqa: E402
from tests.helpers import TOLERANCES  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
OUTCOMES = ("match", "expected_error", "mismatch", "nan_inf", "missed_error", "wrong_error", "unexpected_error",
            "crash")
FAILURES = OUTCOMES[2:]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CRASH_ENV = "KC_FUZZ_CRASH_AT"  # a case number at which the worker kills itself (tests the crash report)


# ------------------------------------------------------------------------------------------------ case generation

SOFT_BAD = ["x_int", "x_1d", "weight_dtype", "weight_features", "weight_empty", "bias_shape", "bias_dtype",
            "index_high", "index_low", "index_float", "index_rows", "value_nan", "value_negative", "value_inf",
            "value_shape", "teacher_shape", "teacher_nan", "both_targets", "no_targets", "segments_unsorted",
            "segments_end", "segments_start", "segments_float", "grouped_no_segments", "grouped_groups",
            "scale_length", "scale_int", "sample_weight_shape", "sample_weight_nan", "temperature", "mode",
            "reduction", "memory_budget", "device", "all_meta"]
SAMPLED_BAD = ["x_3d", "weight_dtype", "weight_features", "bias_shape", "labels_high", "labels_low", "labels_float",
               "labels_rows", "labels_all_pad", "sampled_ids_high", "sampled_count_zero", "sampled_shape",
               "sampled_tuple", "num_sampled_zero", "num_sampled_too_many", "num_sampled_mismatch", "sampler",
               "unigram_no_counts", "counts_negative", "reduction", "sample_weight_shape", "device"]
SOFT_DEVICE_ARGS = ["weight", "bias", "target_index", "target_value", "teacher_logits", "scale", "sample_weight"]
SAMPLED_DEVICE_ARGS = ["weight", "bias", "labels", "sample_weight"]


def make_case(seed: int, n: int, backends: List[str]) -> dict:
    """The JSON-able description of case n: every random choice, and a seed for the tensor values."""
    r = random.Random(f"{seed}/{n}")
    c = dict(n=n, seed=seed, backend=r.choice(backends), tseed=r.getrandbits(62))
    c["op"] = r.choices(["linear", "logits", "sampled"], weights=[5, 2, 3])[0]
    dts = ["fp32", "fp32", "fp16", "bf16", "fp64"]
    c["dtype"] = r.choice(dts if c["backend"] != "triton" or r.random() < 0.05 else dts[:4])
    if c["backend"] == "triton" and c["op"] == "sampled" and c["dtype"] == "bf16" and INTERPRETED:
        c["dtype"] = "fp16"  # the interpreter's bf16 tl.dot is wrong (tests/test_sampled_softmax.py): GPU only
    c["B"] = r.choice([1, 1, 2, 3, 5, 8, 13, 32])
    c["H"] = r.choice([1, 2, 3, 7, 16, 33])
    c["V"] = r.choice([1, 2, 3, 5, 17, 64, 100, 257, 600] if c["op"] != "sampled" else [2, 3, 5, 17, 64, 100, 257])
    c["bias"] = r.random() < 0.7
    c["reduction"] = r.choice(["none", "sum", "mean"])
    c["sample_weight"] = r.choice([None, None, "rand", "zeros"])
    c["logit_scale"] = r.choice([1.0, 1.0, 1.0, 3.0, 30.0, 1e-4, 1e4])  # target max |u|
    c["check_values"] = r.choice([None, None, None, "1", "0"])
    c["grad"] = [a for a in ("x", "weight", "bias", "scale", "logits") if r.random() < 0.6]
    c["layout"] = {a: r.choice(["contig", "contig", "transposed", "strided", "expanded"])
                   for a in ("x", "weight", "bias", "logits", "target_index", "target_value", "teacher_logits",
                             "labels", "scale", "sample_weight")}
    if c["op"] == "sampled":
        _sampled_choices(r, c)
    else:
        _soft_choices(r, c)
    c["bad"] = None
    if r.random() < 0.25:
        c["bad"] = r.choice(SAMPLED_BAD if c["op"] == "sampled" else SOFT_BAD)
        c["bad_arg"] = r.choice(SAMPLED_DEVICE_ARGS if c["op"] == "sampled" else SOFT_DEVICE_ARGS)
        c["bad_pick"] = r.randrange(6)
    return c


def _soft_choices(r: random.Random, c: dict):
    V = c["V"]
    G = min(V, r.choice([1, 1, 2, 3, 6, V if V <= 8 else 4]))  # V <= 8 may get one class per segment
    c["bounds"] = [0, *sorted(r.sample(range(1, V), G - 1)), V] if G > 1 else None
    c["segments_as"] = r.choice(["list", "int64", "int32"])
    c["grouped"] = c["op"] == "linear" and c["bounds"] is not None and r.random() < 0.4
    c["mode"] = r.choice(["sigmoid", "softmax"])
    c["targets"] = r.choice(["sparse", "sparse", "sparse", "dense"])
    c["K"] = r.choice([0, 1, 2, 3, 8, V + 3])
    c["index_dtype"] = r.choice(["int64", "int32", "int16"] if V < 30000 else ["int64"])
    c["pad"] = r.choice([0.0, 0.0, 0.2, 0.5, 1.0])  # fraction of -1 entries (1.0: no target mass at all)
    c["dup_range"] = r.choice([None, None, 2])  # draw indices from the first classes only: many duplicates
    c["values"] = r.choice(["rand", "rand", "rand", "zeros", "ones", "large"])
    c["teacher_scale"] = r.choice([1.0, 3.0, 1e4])
    c["scale"] = r.choice([None, None, "segment", "class"])
    c["scale_mag"] = r.choice([1.0, 1.0, 1e-3, 1e3])
    c["temperature"] = r.choice([1.0, 1.0, round(r.uniform(0.5, 3.0), 3), 0.02, 50.0])
    c["memory_budget"] = r.choice([None, None, 1024, 4096, 40000])
    c["out_of_range"] = c["check_values"] == "0" and c["targets"] == "sparse" and r.random() < 0.5


def _sampled_choices(r: random.Random, c: dict):
    V = c["V"]
    c["num_true"] = r.choice([None, 1, 2, 3])  # None: labels [B]
    c["labels_dtype"] = r.choice(["int64", "int32"])
    c["given"] = r.random() < 0.5  # sampled=(ids, true_expected, sampled_expected) or drawn by a sampler
    c["unique"] = r.random() < 0.7
    c["S"] = r.randint(1, V if c["unique"] else 2 * V) if V < 40 else r.choice([1, 5, 33, V // 2])
    c["sampler"] = r.choice(list(samplers.SAMPLERS))
    c["remove_hits"] = r.random() < 0.8
    c["subtract_log_q"] = r.random() < 0.8
    # sparse gradients reach a leaf only through views autograd can take sparse (not as_strided or transpose)
    c["sparse_grad"] = (r.random() < 0.3 and c["layout"]["weight"] in ("contig", "expanded")
                        and c["layout"]["bias"] in ("contig", "expanded"))


# ------------------------------------------------------------------------------------------------- tensor building

def _layout(base: torch.Tensor, kind: str, g: torch.Generator) -> Tuple[torch.Tensor, callable]:
    """(leaf, view): the view has base's values (rows all equal to base's first for "expanded") in the layout."""
    if kind == "transposed" and base.dim() >= 2:
        leaf = base.transpose(0, 1).contiguous()
        return leaf, lambda t: t.transpose(0, 1)
    if kind == "strided" and base.numel():
        # garbage between the used elements: a backend reading them would show it
        shape = (*base.shape[:-1], 2 * base.shape[-1])
        fill = float("nan") if base.is_floating_point() else 7
        leaf = torch.full(shape, fill, dtype=base.dtype)
        leaf[..., ::2] = base
        return leaf, lambda t: t[..., ::2]
    if kind == "expanded" and base.dim() >= 1 and base.shape[0] > 0:
        leaf = base[:1].clone()
        return leaf, lambda t: t.expand(base.shape)
    return base.clone(), lambda t: t


class Args:
    """Keyword arguments of one call: the backend's (in the case dtype) and the oracle's (float64, same values),
    plus the leaves whose gradients are compared."""

    def __init__(self):
        self.low: Dict[str, object] = {}
        self.high: Dict[str, object] = {}
        self.leaves: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (low leaf, high leaf)
        self.views: Dict[str, callable] = {}  # name -> the layout's view of its leaf

    def tensor(self, c: dict, name: str, base: torch.Tensor, g, grad: bool = False, floating: bool = True):
        dtype = DTYPES[c["dtype"]] if floating else base.dtype
        leaf, view = _layout(base.to(dtype), c["layout"].get(name, "contig"), g)
        high = leaf.double() if floating else leaf
        if grad and name in c["grad"]:
            leaf, high = leaf.requires_grad_(), high.requires_grad_()
            self.leaves[name] = (leaf, high)
        self.low[name], self.high[name] = view(leaf), view(high)
        self.views[name] = view

    def same(self, name: str, value):
        self.low[name] = self.high[name] = value


def build(c: dict) -> Args:
    g = torch.Generator().manual_seed(c["tseed"])
    a = Args()
    B, H, V = c["B"], c["H"], c["V"]
    if c["op"] == "sampled":
        _build_sampled(c, a, g)
        return a
    G = 1 if c["bounds"] is None else len(c["bounds"]) - 1
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H)
    if c["op"] == "linear":
        xs = (B, G, H) if c["grouped"] else (B, H)
        x = torch.randn(*xs, generator=g, dtype=torch.float64) * (c["logit_scale"] / 3.0)
        a.tensor(c, "x", x, g, grad=True)
        a.tensor(c, "weight", w, g, grad=True)
        if c["bias"]:
            a.tensor(c, "bias", torch.randn(V, generator=g, dtype=torch.float64) * 0.5, g, grad=True)
        else:
            a.same("bias", None)
    else:
        u = torch.randn(B, V, generator=g, dtype=torch.float64) * (c["logit_scale"] / 3.0)
        a.tensor(c, "logits", u, g, grad=True)
    if c["bounds"] is not None:
        seg = c["bounds"]
        if c["segments_as"] != "list":
            seg = torch.tensor(seg, dtype=getattr(torch, c["segments_as"]))
        a.same("segments", seg)
    if c["targets"] == "sparse":
        K = c["K"]
        hi = V if c["dup_range"] is None else min(V, c["dup_range"])
        idx = torch.randint(0, hi, (B, K), generator=g)
        idx[torch.rand(B, K, generator=g) < c["pad"]] = -1
        if c["out_of_range"] and idx.numel():
            idx.view(-1)[0] = V + 5  # unchecked: must be ignored like padding
            idx.view(-1)[-1] = -7
        a.tensor(c, "target_index", idx.to(getattr(torch, c["index_dtype"])), g, floating=False)
        kind = c["values"]
        if kind in ("zeros", "ones"):  # (drawing nothing, so later tensors are those of every other kind)
            val = torch.full((B, K), float(kind == "ones"), dtype=torch.float64)
        else:
            val = torch.rand(B, K, generator=g, dtype=torch.float64) * (5 if kind == "large" else 1)
        a.tensor(c, "target_value", val, g)
    else:
        a.tensor(c, "teacher_logits", torch.randn(B, V, generator=g, dtype=torch.float64) * c["teacher_scale"], g)
    if c["scale"] is not None:
        n = G if c["scale"] == "segment" else V
        a.tensor(c, "scale", (torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.5) * c["scale_mag"], g, grad=True)
    _sample_weight(c, a, g)
    a.same("mode", c["mode"])
    a.same("temperature", c["temperature"])
    a.same("reduction", c["reduction"])
    if c["memory_budget"] is not None:
        a.low["memory_budget"] = c["memory_budget"]
    if c["targets"] == "sparse":
        a.high["target_index"] = _clean_index(a.high["target_index"], V)  # the oracle only knows padding
    return a


def _sample_weight(c: dict, a: Args, g):
    if c["sample_weight"] is None:
        return
    sw = torch.rand(c["B"], generator=g, dtype=torch.float64) * 2
    if c["sample_weight"] == "zeros":
        sw[1::2] = 0  # (row 0 keeps its weight: a single row still has a gradient)
    a.tensor(c, "sample_weight", sw, g)


def _build_sampled(c: dict, a: Args, g):
    B, H, V = c["B"], c["H"], c["V"]
    x = torch.randn(B, H, generator=g, dtype=torch.float64) * (c["logit_scale"] / 3.0)
    a.tensor(c, "x", x, g, grad=True)
    a.tensor(c, "weight", torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H), g, grad=True)
    if c["bias"]:
        a.tensor(c, "bias", torch.randn(V, generator=g, dtype=torch.float64) * 0.5, g, grad=True)
    else:
        a.same("bias", None)
    T = c["num_true"] or 1
    labels = torch.randint(0, V, (B, T), generator=g)
    if T > 1:
        labels[torch.rand(B, T, generator=g) < 0.3] = -1
        labels[:, 0] = labels[:, 0].abs()  # every row keeps a label
        labels[0, -1] = labels[0, 0]  # a repeated label
    if c["num_true"] is None:
        labels = labels[:, 0]
    a.tensor(c, "labels", labels.to(getattr(torch, c["labels_dtype"])), g, floating=False)
    S = c["S"]
    if c["given"]:
        ids = torch.randperm(V, generator=g)[:S] if c["unique"] else torch.randint(0, V, (S,), generator=g)
        ids[0] = int(labels.reshape(-1)[0])  # an accidental hit
        te = torch.rand(labels.shape, generator=g, dtype=torch.float64) + 0.05
        se = torch.rand(S, generator=g, dtype=torch.float64) + 0.05
        a.same("sampled", (ids, te, se))
    else:
        a.same("num_sampled", S)
        a.same("sampler", c["sampler"])
        a.same("unique", c["unique"])
        if c["sampler"] == "unigram":
            a.same("class_counts", torch.randint(1, 50, (V,), generator=g).double())
        a.same("generator_seed", c["tseed"] % (1 << 31))
    a.same("remove_accidental_hits", c["remove_hits"])
    a.same("subtract_log_q", c["subtract_log_q"])
    a.same("reduction", c["reduction"])
    _sample_weight(c, a, g)
    a.low["sparse_grad"] = c["sparse_grad"]


# ----------------------------------------------------------------------------------------------- bad arguments

def _poke(t: torch.Tensor, i: int, value) -> torch.Tensor:
    """A contiguous copy of t with its flat element i % numel set to value."""
    t = t.detach().contiguous().clone()
    t.view(-1)[i % t.numel()] = value
    return t


def apply_bad(c: dict, a: Args) -> Tuple[str, ...]:
    """Spoil one argument of the backend's call; the names the ValueError may start with ("" when it does not
    apply to this case: the case then runs as a valid one)."""
    bad, kw, V, B = c["bad"], a.low, c["V"], c["B"]
    main = "logits" if c["op"] == "logits" else "x"
    values_on = c["check_values"] != "0"
    sparse = c["op"] != "sampled" and c["targets"] == "sparse"
    ti, tv = kw.get("target_index"), kw.get("target_value")
    if bad == "x_int":
        kw[main] = kw[main].detach().long()
        return (main,)
    if bad in ("x_1d", "x_3d"):
        kw[main] = kw[main].detach().flatten() if bad == "x_1d" else kw[main].detach()[None]
        return (main,)
    if bad == "weight_dtype" and "weight" in kw:
        other = torch.float32 if kw["weight"].dtype != torch.float32 else torch.float64
        kw["weight"] = kw["weight"].detach().to(other)
        return ("weight",)
    if bad == "weight_features" and "weight" in kw:
        kw["weight"] = torch.zeros(V, c["H"] + 1, dtype=kw["weight"].dtype)
        return ("weight",)
    if bad == "weight_empty" and "weight" in kw:
        kw["weight"] = kw["weight"].detach()[:0]
        kw["bias"] = None
        return ("weight",)
    if bad in ("bias_shape", "bias_dtype") and kw.get("bias") is not None:
        b = kw["bias"].detach()
        wrong = torch.int32 if b.dtype != torch.float64 else torch.float32
        kw["bias"] = torch.cat([b, b[:1]]) if bad == "bias_shape" else b.to(wrong)
        return ("bias",)
    if bad in ("index_high", "index_low") and sparse and ti.numel() and values_on:
        kw["target_index"] = _poke(ti, c["bad_pick"], V if bad == "index_high" else -2)
        return ("target_index",)
    if bad == "index_float" and sparse:
        kw["target_index"] = ti.float()
        return ("target_index",)
    if bad == "index_rows" and sparse:
        kw["target_index"] = torch.cat([ti, ti[:1]]) if B else ti
        return ("target_index",)
    if bad in ("value_nan", "value_negative", "value_inf") and sparse and tv.numel() and values_on:
        kw["target_value"] = _poke(tv, c["bad_pick"], {"value_nan": math.nan, "value_negative": -0.5,
                                                       "value_inf": math.inf}[bad])
        return ("target_value",)
    if bad == "value_shape" and sparse:
        kw["target_value"] = torch.zeros(B, ti.shape[1] + 1, dtype=tv.dtype)
        return ("target_value",)
    if bad in ("teacher_shape", "teacher_nan") and "teacher_logits" in kw:
        t = kw["teacher_logits"]
        if bad == "teacher_shape":
            kw["teacher_logits"] = torch.zeros(B, V + 1, dtype=t.dtype)
            return ("teacher_logits",)
        if values_on and t.numel():
            kw["teacher_logits"] = _poke(t, c["bad_pick"], math.nan)
            return ("teacher_logits",)
    if bad == "both_targets" and c["op"] != "sampled":
        kw["teacher_logits"] = torch.zeros(B, V, dtype=DTYPES[c["dtype"]])
        kw["target_index"] = torch.zeros(B, 1, dtype=torch.long)
        kw["target_value"] = torch.zeros(B, 1, dtype=DTYPES[c["dtype"]])
        return ("teacher_logits",)
    if bad == "no_targets" and c["op"] != "sampled":
        for k in ("teacher_logits", "target_index", "target_value"):
            kw.pop(k, None)
        return ("target_index",)
    if bad.startswith("segments_") and c["op"] != "sampled":
        bounds = c["bounds"] or [0, V]
        kw["segments"] = {"segments_unsorted": [0, *bounds[1:-1], bounds[-2], V] if len(bounds) > 2 else [0, 0, V],
                          "segments_end": [*bounds[:-1], V + 1],
                          "segments_start": [1, *bounds[1:]] if V > 1 else [1, 2],
                          "segments_float": torch.tensor(bounds, dtype=torch.float32)}[bad]
        return ("segments",)
    if bad == "grouped_no_segments" and c["op"] == "linear" and c["grouped"]:
        kw.pop("segments", None)
        return ("segments",)
    if bad == "grouped_groups" and c["op"] == "linear" and c["grouped"]:
        x = kw["x"].detach()
        kw["x"] = torch.cat([x, x[:, :1]], dim=1)
        return ("x", "segments")
    if bad in ("scale_length", "scale_int") and c["op"] != "sampled":
        G = 1 if c["bounds"] is None else len(c["bounds"]) - 1
        n = next(k for k in range(2, V + G + 3) if k not in (G, V))
        kw["scale"] = (torch.ones(n, dtype=DTYPES[c["dtype"]]) if bad == "scale_length"
                       else torch.ones(G, dtype=torch.long))
        return ("scale",)
    if bad == "sample_weight_shape":
        kw["sample_weight"] = torch.ones(B + 1, dtype=DTYPES[c["dtype"]])
        return ("sample_weight",)
    if bad == "sample_weight_nan" and values_on and B:
        sw = torch.ones(B, dtype=DTYPES[c["dtype"]])
        sw[c["bad_pick"] % B] = math.nan
        kw["sample_weight"] = sw
        return ("sample_weight",)
    if bad == "temperature":
        kw["temperature"] = [0.0, -1.0, math.nan, math.inf, "warm", None][c["bad_pick"]]
        return ("temperature",)
    if bad == "mode":
        kw["mode"] = ["softmax2", "", None, "SIGMOID", 1, "kl2"][c["bad_pick"]]
        return ("mode",)
    if bad == "reduction":
        kw["reduction"] = ["avg", "", None, "MEAN", 0, "batchmean"][c["bad_pick"]]
        return ("reduction",)
    if bad == "memory_budget":
        kw["memory_budget"] = [0, -5, 1.5, True, "1M", 2.0][c["bad_pick"]]
        return ("memory_budget",)
    if bad == "device":
        name = c["bad_arg"]
        if isinstance(kw.get(name), torch.Tensor):
            kw[name] = kw[name].detach().to("meta")
            return (name, main)
    if bad == "all_meta" and c["backend"] != "reference":  # the oracle's plain torch is not meant for meta
        for k, v in kw.items():
            if isinstance(v, torch.Tensor) and k != "segments":  # offsets are host metadata
                kw[k] = v.detach().to("meta")
        kw.pop("memory_budget", None)
        return (main, "meta")
    return _apply_bad_sampled(c, a)


def _apply_bad_sampled(c: dict, a: Args) -> Tuple[str, ...]:
    bad, kw, V = c["bad"], a.low, c["V"]
    if c["op"] != "sampled":
        return ("",)
    lab = kw["labels"]
    if bad in ("labels_high", "labels_low"):
        kw["labels"] = _poke(lab, c["bad_pick"], V if bad == "labels_high" else -2)
        return ("labels",)
    if bad == "labels_float":
        kw["labels"] = lab.float()
        return ("labels",)
    if bad == "labels_rows":
        kw["labels"] = torch.cat([lab, lab[:1]])
        return ("labels",)
    if bad == "labels_all_pad":
        kw["labels"] = torch.full_like(lab, -1)
        return ("labels",)
    given = "sampled" in kw
    if given and bad in ("sampled_ids_high", "sampled_count_zero", "sampled_shape", "sampled_tuple",
                         "num_sampled_mismatch"):
        ids, te, se = kw["sampled"]
        if bad == "sampled_ids_high":
            ids = ids.clone()
            ids[-1] = V
        elif bad == "sampled_count_zero":
            se = se.clone()
            se[0] = 0.0
        elif bad == "sampled_shape":
            se = torch.cat([se, se[:1]])
        elif bad == "num_sampled_mismatch":
            kw["num_sampled"] = len(ids) + 1
            return ("num_sampled",)
        kw["sampled"] = [ids, te] if bad == "sampled_tuple" else (ids, te, se)
        return ("sampled",)
    if not given:
        if bad == "num_sampled_zero":
            kw["num_sampled"] = [0, -3, 1.5, None, True, "8"][c["bad_pick"]]
            return ("num_sampled",)
        if bad == "num_sampled_too_many":
            kw["num_sampled"], kw["unique"] = V + 1, True
            return ("num_sampled",)
        if bad == "sampler":
            kw["sampler"] = "zipf"
            return ("sampler",)
        if bad in ("unigram_no_counts", "counts_negative"):
            kw["sampler"] = "unigram"
            kw["class_counts"] = None if bad == "unigram_no_counts" else -torch.ones(V)
            return ("class_counts",)
    return ("",)


# ------------------------------------------------------------------------------------------------------ calling

def call(c: dict, kw: dict, backend: str):
    kw = dict(kw)
    if c["op"] == "sampled":
        seed = kw.pop("generator_seed", None)
        if seed is not None:
            kw["generator"] = torch.Generator().manual_seed(seed)
        return kc_kernels.sampled_softmax_loss(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), kw.pop("labels"),
                                               backend=backend, **kw)
    if c["op"] == "linear":
        return kc_kernels.linear_soft_target_loss(kw.pop("x"), kw.pop("weight"), kw.pop("bias", None),
                                                  backend=backend, **kw)
    return kc_kernels.soft_target_loss(kw.pop("logits"), backend=backend, **kw)


def _row_weights(loss: torch.Tensor) -> torch.Tensor:
    """Weights of the per-row losses in the scalar that is differentiated (distinct, so rows are not summed)."""
    if loss.dim() == 0:
        return torch.ones((), dtype=torch.float64)
    return torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64)


def gradients(loss: torch.Tensor, leaves: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    if not leaves or not loss.requires_grad:
        return [None] * len(leaves)
    total = (loss * _row_weights(loss).to(loss.dtype)).sum()
    gs = torch.autograd.grad(total, leaves, allow_unused=True)
    return [None if gr is None else (gr.to_dense() if gr.is_sparse else gr) for gr in gs]


# --------------------------------------------------------------------------------------------- error bounds

def precision(c: dict) -> Tuple[float, float, float]:
    """(unit roundoff of the stored scores, unit roundoff of the accumulation, rtol) of the backend's arithmetic."""
    dt = DTYPES[c["dtype"]]
    if c["backend"] == "triton" and c["op"] != "sampled":
        return UNIT[dt], UNIT[torch.float32], TOLERANCES[dt][0]
    if c["backend"] == "cpu" and c["op"] == "linear" and _cpu_work_dtype(dt) == dt:
        return UNIT[dt], UNIT[torch.float32], TOLERANCES[dt][0]  # the bf16 CPU path: bf16 GEMMs and scores
    if dt == torch.float64 and (c["backend"] == "reference" or c["op"] == "sampled"):
        return UNIT[dt], UNIT[dt], TOLERANCES[dt][0]
    return UNIT[torch.float32], UNIT[torch.float32], TOLERANCES[torch.float32][0]


def _cpu_work_dtype(dt: torch.dtype) -> torch.dtype:
    from kc_kernels.cpu.epilogue import CpuEpilogue

    return CpuEpilogue.work_dtype(dt)


def _seg_sum(v: torch.Tensor, seg: torch.Tensor, G: int) -> torch.Tensor:
    return v.new_zeros(v.shape[0], G).index_add(1, seg, v)


def _seg_max(v: torch.Tensor, bounds: List[int]) -> torch.Tensor:
    return torch.stack([v[:, lo:hi].amax(1) for lo, hi in zip(bounds, bounds[1:])], 1)


def soft_target_bounds(c: dict, hi: dict, loss_ref: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Allowed |loss - reference| (the loss's shape) and the absolute-value gradients of every differentiable
    argument, from the float64 inputs (module docstring)."""
    e_store, e_acc, rtol = precision(c)
    segs = None if c["bounds"] is None else torch.tensor(c["bounds"])
    bounds = c["bounds"] or [0, c["V"]]
    G, T = len(bounds) - 1, c["temperature"]
    seg = reference.segment_ids(segs, c["V"], "cpu")
    if c["op"] == "linear":
        ax = hi["x"].detach().abs().requires_grad_()
        aw = hi["weight"].detach().abs().requires_grad_()
        u = reference.linear_logits(hi["x"].detach(), hi["weight"].detach(), None, segs)
        uabs = reference.linear_logits(ax, aw, None, segs)
        du = (e_store + 2 * math.sqrt(c["H"]) * e_acc) * uabs.detach()
    else:
        u = hi["logits"].detach()
        uabs = u.abs().requires_grad_()
        du = e_acc * uabs.detach()
    scale = hi.get("scale")
    if scale is not None:
        n = torch.sqrt(_seg_sum(u * u, seg, G) + reference.NORM_EPS)[:, seg]
        gam = scale.detach()[seg] if scale.numel() == G and G != c["V"] else scale.detach()
        a = gam.abs() / (n * T)
        yb = gam * u / n
        dn = torch.sqrt(_seg_sum(du * du, seg, G))[:, seg]
        dy = a * du + gam.abs() * u.abs() / (n * n * T) * dn
    else:
        a = torch.full_like(u, 1.0 / T)
        yb, dy = u, du / T
    bias = hi.get("bias")
    y = (yb + (0 if bias is None else bias.detach())) / T
    z = reference.dense_targets(c["V"], batch=c["B"], target_index=_clean_index(hi.get("target_index"), c["V"]),
                                target_value=hi.get("target_value"), teacher_logits=hi.get("teacher_logits"),
                                mode=c["mode"], segments=segs, temperature=T, dtype=torch.float64, device="cpu")
    rw = _reduction_weights(c, hi.get("sample_weight"))
    dymax = float(dy.max()) if dy.numel() else 0.0
    if c["mode"] == "sigmoid":
        s = torch.sigmoid(y)
        # q = s - z cancels: its error is relative to s + z, and s moves by at most s(1 - s) e^dy per unit of dy
        q = s - z
        act = s + z + (s * (1 - s) * torch.exp(dy.clamp(max=30))).clamp(max=0.25)
        dz = _teacher_error(c, hi, z, e_acc)
        dq = dz
        row_lip = ((1 + z) * dy + dz * y.abs()).sum(1)
        row_acc = (F.softplus(y) + z * y.abs()).sum(1)
    else:
        p = torch.cat([torch.softmax(y[:, lo:hi_], 1) for lo, hi_ in zip(bounds, bounds[1:])], 1)
        m = _seg_sum(z, seg, G)
        dyrow = _seg_max(dy, bounds)[:, seg]
        q = T * T * (m[:, seg] * p - z)
        act = T * T * (m[:, seg] * (p * torch.exp((2 * dyrow).clamp(max=30))).clamp(max=1) + z)
        lse = torch.stack([torch.logsumexp(y[:, lo:hi_], 1) for lo, hi_ in zip(bounds, bounds[1:])], 1)
        dz = _teacher_error(c, hi, z, e_acc)
        dq = T * T * (dz + p * _seg_sum(dz, seg, G)[:, seg])
        row_lip = T * T * ((m * _seg_max(dy, bounds)).sum(1) + (z * dy).sum(1)
                           + (dz * (lse[:, seg].abs() + y.abs())).sum(1))
        row_acc = T * T * ((m * lse.abs()).sum(1) + (z * y.abs()).sum(1))
    row_tol = 2 * row_lip + rtol * row_acc
    loss_tol = row_tol * rw.abs() if c["reduction"] == "none" else (row_tol * rw.abs()).sum()
    loss_tol = loss_tol + 4 * UNIT[loss_ref.dtype] * loss_ref.detach().abs()
    # absolute-value gradients: |dL/du| with the norm's second term taken in absolute value, pushed through |x|, |W|
    # error of dL/dy: rounding (relative), the logits' perturbation dy, the teacher's dz, then weighted like the rows
    tiny = torch.finfo(torch.float64 if e_acc == UNIT[torch.float64] else torch.float32).tiny
    # q's own rounding is relative (rtol); the terms it is the difference of are off by a few ulps each (their sums
    # over up to V classes: (16 + V) e_acc) and move with dy; then the targets' dz and the underflow of q
    # (and a floor of e_acc^2 of the largest term: exp underflowing in the work precision is noise below that)
    top = float(act.max()) if act.numel() else 0.0
    act = ((rtol + UNIT[DTYPES[c["dtype"]]]) * q.abs() + ((16 + c["V"]) * e_acc + dymax) * act + dq
           + 1e3 * tiny + e_acc ** 2 * top)
    act = act * (rw * _row_weights(loss_ref) if c["reduction"] == "none" else rw).abs()[:, None]
    gabs = a * act
    if scale is not None:
        gabs = gabs + u.abs() / (n * n) * _seg_sum(act * a * u.abs(), seg, G)[:, seg]
    # dL/du is stored in the scores' dtype (triton: the input dtype), where it may fall below the subnormals
    store = next(dt for dt, unit in UNIT.items() if unit == e_store)
    sub = 2 * torch.finfo(store).tiny * UNIT[store]
    gabs = gabs + sub
    out = {}
    wanted = [k for k in ("x", "weight", "logits") if k in c["grad"] and k in hi]
    if wanted:
        srcs = {"x": ax, "weight": aw} if c["op"] == "linear" else {"logits": uabs}
        gs = torch.autograd.grad((gabs * uabs).sum(), [srcs[k] for k in wanted])
        out.update(zip(wanted, gs))
    out["bias"] = (act / T).sum(0) + c["B"] * sub
    if scale is not None:
        ds = (act * u.abs() / (n * T)).sum(0) + c["B"] * sub
        out["scale"] = ds if scale.numel() == c["V"] else ds.new_zeros(G).index_add(0, seg, ds)
    return loss_tol, {k: (v, tiny) for k, v in out.items()}


def _teacher_error(c: dict, hi: dict, z: torch.Tensor, e_acc: float) -> torch.Tensor:
    """Bound of the error of dense targets z computed from teacher logits t / T in the work precision: t / T is
    off by about e_acc |t| / T, which moves a softmax target by z (e^(2 d) - 1) and a sigmoid one by z (1 - z) e^d d."""
    t = hi.get("teacher_logits")
    if t is None:
        return torch.zeros_like(z)
    d = 4 * e_acc * t.detach().abs().amax(1, keepdim=True) / c["temperature"]
    if c["mode"] == "softmax":
        return (z * torch.expm1((2 * d).clamp(max=30))).clamp(max=1)
    return (z * (1 - z) * torch.exp(d.clamp(max=30)) * d).clamp(max=1)


def _clean_index(idx: Optional[torch.Tensor], V: int) -> Optional[torch.Tensor]:
    """Unchecked out-of-range indices are defined to act as padding."""
    if idx is None:
        return None
    return torch.where((idx >= 0) & (idx < V), idx.long(), torch.full_like(idx.long(), -1))


def _reduction_weights(c: dict, sw: Optional[torch.Tensor]) -> torch.Tensor:
    rw = torch.ones(c["B"], dtype=torch.float64) if sw is None else sw.detach().double()
    return rw / c["B"] if c["reduction"] == "mean" else rw


def sampled_bounds(c: dict, hi: dict, loss_ref: torch.Tensor):
    """The same bounds for sampled softmax: logits are x.w_j + b_j - log q_j over the true and sampled classes."""
    e_store, e_acc, rtol = precision(c)
    sampled = _sampled_triple(c, hi)
    labels = hi["labels"] if hi["labels"].dim() == 2 else hi["labels"][:, None]
    sampled = (sampled[0], sampled[1].reshape(labels.shape), sampled[2])
    ax = hi["x"].detach().abs().requires_grad_()
    aw = hi["weight"].detach().abs().requires_grad_()
    bias = hi.get("bias")
    ab = None if bias is None else bias.detach().abs().requires_grad_()
    kw = dict(remove_accidental_hits=c["remove_hits"], subtract_log_q=c["subtract_log_q"])
    logits, t = reference.sampled_logits(hi["x"].detach(), hi["weight"].detach(),
                                         None if bias is None else bias.detach(), labels, sampled, **kw)
    # -log q taken in absolute value: exp(-|log q|) as the expected count
    absq = tuple(s if i == 0 else torch.exp(-torch.log(s.double()).abs()) for i, s in enumerate(sampled))
    labs, _ = reference.sampled_logits(ax, aw, ab, labels, absq, **kw)
    live = torch.isfinite(logits)
    dl = torch.where(live, (e_store + 2 * math.sqrt(c["H"]) * e_acc) * labs.detach(), torch.zeros_like(logits))
    dmax = dl.max(1).values
    p = torch.softmax(logits, 1)
    rw = _reduction_weights(c, hi.get("sample_weight"))
    lse = torch.logsumexp(logits, 1)
    row_acc = lse.abs() + torch.where(t > 0, t * logits.abs(), torch.zeros_like(t)).sum(1)
    row_tol = 4 * dmax + rtol * row_acc
    loss_tol = row_tol * rw.abs() if c["reduction"] == "none" else (row_tol * rw.abs()).sum()
    loss_tol = loss_tol + 4 * UNIT[loss_ref.dtype] * loss_ref.detach().abs()
    act = t + (p * torch.exp((2 * dmax[:, None]).clamp(max=30))).clamp(max=1)
    tiny = torch.finfo(torch.float64 if e_acc == UNIT[torch.float64] else torch.float32).tiny
    mag = (16 + logits.shape[1]) * e_acc + float(dmax.max())
    top = float(act.max()) if act.numel() else 0.0
    act = (rtol + UNIT[DTYPES[c["dtype"]]]) * (p - t).abs() + mag * act + 1e3 * tiny + e_acc ** 2 * top
    act = act * (rw * _row_weights(loss_ref) if c["reduction"] == "none" else rw).abs()[:, None]
    wanted = [k for k in ("x", "weight", "bias") if k in c["grad"] and hi.get(k) is not None]
    src = {"x": ax, "weight": aw, "bias": ab}
    out = {}
    if wanted:
        gs = torch.autograd.grad(torch.where(live, act * labs, torch.zeros_like(act)).sum(), [src[k] for k in wanted],
                                 allow_unused=True)
        out = {k: (gr if gr is not None else torch.zeros_like(src[k]), tiny)
               for k, gr in zip(wanted, gs)}
    return loss_tol, out


def _sampled_triple(c: dict, hi: dict):
    if "sampled" in hi:
        return hi["sampled"]
    # the op front's draw, replayed with the same generator seed
    V, S = c["V"], hi["num_sampled"]
    cand = samplers.sample_candidates(c["sampler"], S, V, unique=c["unique"], class_counts=hi.get("class_counts"),
                                      generator=torch.Generator().manual_seed(hi["generator_seed"]))
    return cand.ids, cand.expected_count(hi["labels"], S, c["unique"]), cand.expected_count(cand.ids, S, c["unique"])


# ---------------------------------------------------------------------------------------------------- one case

def _grad_leaves(c: dict, a: Args) -> List[str]:
    return [k for k in a.leaves if a.low.get(k) is not None]


def run_case(c: dict) -> Tuple[str, str]:
    """(outcome, detail) of one case."""
    os.environ.pop("KC_CHECK_VALUES", None)
    if c["check_values"] is not None:
        os.environ["KC_CHECK_VALUES"] = c["check_values"]
    a = build(c)
    expect = ("",)
    if c["bad"] is not None:
        expect = apply_bad(c, a)
    if c["backend"] == "triton" and c["dtype"] == "fp64" and c["op"] != "sampled" and expect == ("",):
        expect = ("logits" if c["op"] == "logits" else "x",)
    bad = expect != ("",)
    try:
        out = call(c, a.low, c["backend"])
    except ValueError as e:
        msg = str(e)
        if not bad:
            return "unexpected_error", f"ValueError on a valid call: {msg}"
        if any(msg.startswith(f"{name}:") for name in expect):
            return "expected_error", msg
        return "wrong_error", f"expected a ValueError naming {expect}, got: {msg}"
    except Exception as e:  # noqa: BLE001 - any other exception type is a finding
        return "unexpected_error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
    if "meta" in expect:
        return _judge_meta(c, out)
    if bad:
        return "missed_error", f"no ValueError naming {expect}; returned {tuple(out.shape)}"
    try:
        return compare(c, a, out)
    except Exception as e:  # noqa: BLE001 - the backward of the call failed
        return "unexpected_error", f"in the gradients: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"


def _judge_meta(c: dict, out: torch.Tensor) -> Tuple[str, str]:
    want = (c["B"],) if c["reduction"] == "none" else ()
    if out.device.type == "meta" and tuple(out.shape) == want:
        return "expected_error", "meta in, meta out"
    return "mismatch", f"meta inputs gave {out.device} {tuple(out.shape)}, expected meta {want}"


def compare(c: dict, a: Args, out: torch.Tensor) -> Tuple[str, str]:
    names = _grad_leaves(c, a)
    got = gradients(out, [a.leaves[k][0] for k in names])
    ref = call(c, a.high, "reference")
    both = gradients(ref, [a.leaves[k][1] for k in names] + [a.high[k] for k in names])
    want, views = both[:len(names)], both[len(names):]
    # the op returns gradients of the views (an expanded weight's rows) in the input dtype, where they may overflow
    # even though their sum into the leaf would not
    overflow = {k: _to_leaf((~torch.isfinite(v.to(a.leaves[k][0].dtype))).double(), a.leaves[k][0], a.views[k]) > 0
                for k, v in zip(names, views) if v is not None}
    out_dtype = torch.float64 if c["dtype"] == "fp64" else torch.float32
    if out.dtype != out_dtype or out.shape != ref.shape:
        return "mismatch", f"loss: {out.dtype} {tuple(out.shape)}, expected {out_dtype} {tuple(ref.shape)}"
    if not bool(torch.isfinite(ref).all()) or any(w is not None and not bool(torch.isfinite(w).all()) for w in want):
        return "mismatch", "the float64 reference is not finite (a case outside the ops' range)"
    if c["op"] == "sampled":
        loss_tol, gtol = sampled_bounds(c, a.high, ref)
    else:
        loss_tol, gtol = soft_target_bounds(c, a.high, ref)
    if not bool(torch.isfinite(out).all()):
        return "nan_inf", f"loss {out.detach().flatten()[:4].tolist()} vs reference {ref.flatten()[:4].tolist()}"
    err = (out.detach().double() - ref.detach()).abs()
    if bool((err > loss_tol).any()):
        i = int((err - loss_tol).flatten().argmax())
        got, want = out.detach().flatten()[i].item(), ref.detach().flatten()[i].item()
        return "mismatch", (f"loss: {got:.9g} vs reference {want:.9g}"
                            f" (|err| {err.flatten()[i].item():.3g} > bound {loss_tol.flatten()[i].item():.3g})")
    for k, g, w in zip(names, got, want):
        verdict = _compare_grad(k, g, w, a.leaves[k][0], gtol.get(k), a.views[k], overflow.get(k))
        if verdict is not None:
            return verdict
    return "match", ""


def _compare_grad(k: str, g, w, leaf: torch.Tensor, tol, view, view_over) -> Optional[Tuple[str, str]]:
    if w is None or g is None:
        present = g if w is None else w
        if present is not None and bool(present.any()):  # an absent gradient is fine only where it would be 0
            return "mismatch", f"d{k}: backend {'missing' if g is None else 'present'}, reference not"
        return None
    if g.dtype != leaf.dtype or g.shape != leaf.shape:
        return "mismatch", f"d{k}: {g.dtype} {tuple(g.shape)}, expected {leaf.dtype} {tuple(leaf.shape)}"
    # a true gradient beyond the dtype's range (a huge scale over a tiny norm) must come out as that infinity;
    # where only the view's gradient overflows, any value is right
    over = ~torch.isfinite(w.to(g.dtype))
    if view_over is not None:
        over, g, w = over & ~view_over, torch.where(view_over, 0, g), torch.where(view_over, 0, w)
    if not bool(torch.equal(g[over], w.to(g.dtype)[over])) or not bool(torch.isfinite(g[~over]).all()):
        return "nan_inf", f"d{k} has non-finite values where the reference rounded to {g.dtype} has none"
    if tol is None:
        return None
    gabs, tiny = tol
    # subnormal results: absolute errors of the output dtype's spacing there (summed into an expanded leaf)
    floor = _to_leaf(torch.full_like(gabs, 2 * torch.finfo(g.dtype).tiny * UNIT[g.dtype] + 1e3 * tiny), leaf, view)
    bound = 4 * _to_leaf(gabs, leaf, view) + 2 * UNIT[g.dtype] * w.abs() + floor
    err = torch.where(over, torch.zeros_like(w), (g.double() - w).abs())
    if bool((err > bound).any()):
        i = int((err - bound).flatten().argmax())
        return "mismatch", (f"d{k}[{i}]: {g.flatten()[i].item():.6g} vs reference {w.flatten()[i].item():.6g} "
                            f"(|err| {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g})")
    return None


def _to_leaf(gabs: torch.Tensor, leaf: torch.Tensor, view) -> torch.Tensor:
    """The absolute-value gradient of the view carried to the leaf (transposed, scattered, or summed over the rows
    of an expanded one) by the view's own adjoint."""
    z = torch.zeros(leaf.shape, dtype=torch.float64, requires_grad=True)
    return torch.autograd.grad((view(z) * gabs).sum(), z, allow_unused=True)[0]


# ------------------------------------------------------------------------------------------- worker and driver

def repro(c: dict, backends: List[str]) -> str:
    return f"python -m tests.fuzz_ops --seed {c['seed']} --case {c['n']} --backends {','.join(backends)}"


def worker(seed: int, start: int, stop: int, backends: List[str]):
    """Runs cases [start, stop), one JSON line per case; "begin" is flushed first, so a crash names its case."""
    crash_at = int(os.environ.get(CRASH_ENV, -1))
    for n in range(start, stop):
        print(json.dumps({"begin": n}), flush=True)
        if n == crash_at:
            os.abort()
        c = make_case(seed, n, backends)
        outcome, detail = run_case(c)
        print(json.dumps({"n": n, "outcome": outcome, "detail": detail[:2000] if outcome in FAILURES else ""}),
              flush=True)


def drive(cases: int, seed: int, backends: List[str], start: int = 0, log=sys.stderr) -> dict:
    """Runs the cases in worker subprocesses (restarted after a crash) and returns the counts and failures."""
    counts = {k: 0 for k in OUTCOMES}
    failures = []
    t0 = time.time()
    n, stop = start, start + cases
    while n < stop:
        cmd = [sys.executable, "-m", "tests.fuzz_ops", "--worker", "--seed", str(seed), "--start", str(n),
               "--stop", str(stop), "--backends", ",".join(backends)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=_repo_root())
        running = None
        for line in proc.stdout:
            rec = json.loads(line)
            if "begin" in rec:
                running = rec["begin"]
                continue
            running = None
            n = rec["n"] + 1
            counts[rec["outcome"]] += 1
            if rec["outcome"] in FAILURES:
                failures.append(_failure(seed, rec["n"], backends, rec["outcome"], rec["detail"], log))
        rc = proc.wait()
        if running is None and rc != 0 and n == start:
            raise RuntimeError(f"the fuzz worker failed before its first case (exit {rc}): {' '.join(cmd)}")
        if running is not None or rc != 0:
            crashed = running if running is not None else n
            counts["crash"] += 1
            failures.append(_failure(seed, crashed, backends, "crash", f"worker exited with {rc}", log))
            n = crashed + 1
    calls = sum(counts.values())
    return dict(calls=calls, seed=seed, start=start, backends=backends, seconds=round(time.time() - t0, 1),
                failed=sum(counts[k] for k in FAILURES), **counts, failures=failures[:50])


def _failure(seed: int, n: int, backends: List[str], outcome: str, detail: str, log) -> dict:
    c = make_case(seed, n, backends)
    rec = dict(case=n, outcome=outcome, detail=detail, repro=repro(c, backends), spec=c)
    print(f"[fuzz] case {n}: {outcome}: {detail.splitlines()[0] if detail else ''}\n  repro: {rec['repro']}",
          file=log, flush=True)
    return rec


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=int(os.environ.get("KC_FUZZ", "200")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int)
    ap.add_argument("--backends", default="cpu,reference")
    ap.add_argument("--case", type=int, help="run this one case here and print its spec and outcome")
    ap.add_argument("--spec", help="run this case description (JSON, as printed with a failure; edit it to minimise)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if args.worker:
        worker(args.seed, args.start, args.stop, backends)
        return 0
    if args.case is not None or args.spec:
        c = json.loads(args.spec) if args.spec else make_case(args.seed, args.case, backends)
        print(json.dumps(c))
        outcome, detail = run_case(c)
        print(outcome, detail)
        return 0 if outcome not in FAILURES else 1
    report = drive(args.cases, args.seed, backends, args.start)
    print(json.dumps(report))
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
