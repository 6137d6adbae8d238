"""kc under torchrun: the student's backbone data-parallel, its output layer sharded by verticals.

``torchrun --nproc-per-node W -m kc run ...`` starts W processes; ``init`` joins them into the default process
group (gloo on CPU, NCCL on GPUs) when WORLD_SIZE > 1. Without torchrun (or with one process) nothing here is
active and every stage runs the single-process code. docs/distributed.md describes the design; in short:

- Stages: data, cache, eval and report run on rank 0 while the others wait; the specialists are split by
  vertical (rank r trains the teachers of the verticals its head shard holds); the students are trained by all
  ranks together. Only rank 0 writes state.json, config.yaml, the logs and the report.
- A student step: the global batch (``student.batch_size`` rows, the same batch order as one process) is split
  into W contiguous row blocks; each rank runs backbone and hidden head layers on its block, the hidden units are
  all-gathered ([B, s2] or grouped [B, M, s2]), and each rank computes the loss of its classes with
  ``kc_kernels.vocab_parallel_linear_soft_target_loss`` (whole verticals per rank, so no cross-rank statistic).
  The op sums dx over ranks; each rank back-propagates its own rows through the backbone, and one all-reduce
  sums the replicated parameters' gradients. Loss and every gradient are those of one process on the same batch.
- Checkpoints have the single-process format: the sharded tensors (output weight, bias, a per-class scale and
  their Adam moments) are gathered to rank 0, which writes the file atomically; a process count, old or new,
  loads the full file and keeps its own rows. So a run resumes on any number of processes, and evaluation reads
  the same file as ever.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import kc_kernels
from kc_kernels.distributed import shard_classes, vocab_parallel_linear_soft_target_loss
from kc_kernels.distributed.accounting import record

# seconds a rank may wait for the others (rank 0 alone runs data, cache, eval and report meanwhile): the config's
# dist_timeout
DEFAULT_TIMEOUT_SECONDS = 6 * 3600


# ---------------------------------------------------------------------------------------------- process group

def launched_world() -> int:
    """The process count torchrun asked for (WORLD_SIZE; 1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer, got {os.environ['WORLD_SIZE']!r}") from None


def init(device: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
    """Joins the default process group when started by torchrun with more than one process; else does nothing.
    CPU runs use gloo, CUDA runs NCCL with one GPU per process (that of LOCAL_RANK)."""
    if launched_world() <= 1 or dist.is_initialized():
        return
    if device.startswith("cuda"):
        if ":" in device:
            raise ValueError(f"device: under torchrun give 'cuda', not {device!r}: each process uses the GPU of "
                             "its LOCAL_RANK")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local}: this host has {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def _device() -> torch.device:
    """Where the collectives' small tensors live (NCCL needs them on the GPU)."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(flag: bool) -> bool:
    """Rank 0's value of a decision every rank must take alike (e.g. whether to checkpoint now)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device=_device())
    dist.broadcast(t, 0)
    return bool(t.item())


# ---------------------------------------------------------------------------------------------- sharding plan

def vertical_shards(segments: Sequence[int], world_size: int) -> List[Tuple[int, int]]:
    """Class ranges of whole verticals, one contiguous range per rank, balanced by class count
    (``kc_kernels.shard_classes`` with aligned cuts). A ConfigError (a ValueError) when there are fewer verticals
    than ranks."""
    from kc.config import ConfigError

    bounds = [int(b) for b in segments]
    if world_size > len(bounds) - 1:
        raise ConfigError(f"world_size: kc shards the student's output layer by whole verticals and the taxonomy "
                         f"has {len(bounds) - 1} verticals for {world_size} processes; use at most "
                         f"{len(bounds) - 1} processes")
    ranges = shard_classes(bounds, world_size, align=True)
    assert all(lo in bounds for lo, _ in ranges), ranges
    return ranges


def row_counts(batch: int, world_size: int) -> List[int]:
    """Rows of a global batch per rank: contiguous blocks, the first batch % W ranks one row more."""
    return [batch // world_size + (r < batch % world_size) for r in range(world_size)]


def verticals_of(segments: Sequence[int], class_range: Tuple[int, int]) -> range:
    bounds = [int(b) for b in segments]
    return range(bounds.index(class_range[0]), bounds.index(class_range[1]))


# ---------------------------------------------------------------------------------------------- collectives

def _gather_dim0_to_main(t: torch.Tensor, counts: List[int]) -> Optional[torch.Tensor]:
    """The ranks' shards of a tensor (rows along dim 0, ``counts`` per rank) concatenated on rank 0; None
    elsewhere."""
    m = max(counts)
    pad = t.new_zeros((m,) + tuple(t.shape[1:]))
    pad[:t.shape[0]] = t.detach()
    dev = _device()
    pad = pad.to(dev)
    parts = [torch.empty_like(pad) for _ in counts] if is_main() else None
    dist.gather(pad, parts, dst=0)
    if not is_main():
        return None
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


# ---------------------------------------------------------------------------------------------- the student

@dataclass
class StudentShards:
    """How a student is split over the ranks: class ranges of whole verticals, the parameters sharded along their
    first dimension (the output layer's weight and bias, a per-class scale) and the replicated rest."""

    ranges: List[Tuple[int, int]]
    rank: int
    num_classes: int
    sharded: Tuple[str, ...]
    replicated: Tuple[str, ...]  # data-parallel: their gradients are summed over ranks after backward
    segments: List[int]

    @property
    def class_range(self) -> Tuple[int, int]:
        return self.ranges[self.rank]

    @property
    def class_counts(self) -> List[int]:
        return [hi - lo for lo, hi in self.ranges]

    @property
    def verticals(self) -> range:
        return verticals_of(self.segments, self.class_range)

    # ------------------------------------------------------------------ model and optimizer
    @classmethod
    def shard(cls, model: nn.Module) -> "StudentShards":
        """Cuts this rank's rows out of the full (identically initialised) student's output layer, in place."""
        segments = model.segments.tolist()
        plan = cls(ranges=vertical_shards(segments, world()), rank=rank(), num_classes=model.num_classes,
                   sharded=("head.weight", "head.bias") + (("log_scale",) if model.scale_kind == "class" else ()),
                   replicated=(), segments=segments)
        # a per-vertical scale is replicated, but the op already sums its gradient over ranks
        plan.replicated = tuple(n for n, _ in model.named_parameters() if n not in plan.sharded and n != "log_scale")
        lo, hi = plan.class_range
        with torch.no_grad():
            model.head.weight = nn.Parameter(model.head.weight[lo:hi].clone())
            model.head.bias = nn.Parameter(model.head.bias[lo:hi].clone())
            if model.scale_kind == "class":
                model.log_scale = nn.Parameter(model.log_scale[lo:hi].clone())
        return plan

    def _param_names(self, model: nn.Module, opt: torch.optim.Optimizer) -> Dict[int, str]:
        """Optimizer state index -> parameter name (the optimizer numbers parameters in group order)."""
        names = {id(p): n for n, p in model.named_parameters()}
        out, i = {}, 0
        for g in opt.param_groups:
            for p in g["params"]:
                out[i] = names[id(p)]
                i += 1
        return out

    def full_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> Optional[Tuple[Dict, Dict]]:
        """The unsharded model and optimizer state dicts on rank 0 (None elsewhere); every rank must call it."""
        sd = model.state_dict()
        counts = self.class_counts
        for name in self.sharded:
            sd[name] = _gather_dim0_to_main(sd[name], counts)
        osd = opt.state_dict()
        for i, name in self._param_names(model, opt).items():
            if name in self.sharded and i in osd["state"]:
                st = dict(osd["state"][i])
                for k, v in st.items():
                    if torch.is_tensor(v) and v.dim() >= 1:
                        st[k] = _gather_dim0_to_main(v, counts)
                osd["state"][i] = st
        return (sd, osd) if is_main() else None

    def load_full_state(self, model: nn.Module, opt: torch.optim.Optimizer, model_sd: Dict, opt_sd: Dict) -> None:
        """Loads an unsharded checkpoint (written by any process count) into this rank's shard."""
        lo, hi = self.class_range
        sd = dict(model_sd)
        for name in self.sharded:
            if sd[name].shape[0] != self.num_classes:
                raise ValueError(f"checkpoint: {name} has {sd[name].shape[0]} rows, the student {self.num_classes}")
            sd[name] = sd[name][lo:hi]
        model.load_state_dict(sd)
        osd = {"state": dict(opt_sd["state"]), "param_groups": opt_sd["param_groups"]}
        for i, name in self._param_names(model, opt).items():
            if name in self.sharded and i in osd["state"]:
                osd["state"][i] = {k: (v[lo:hi] if torch.is_tensor(v) and v.dim() >= 1 else v)
                                   for k, v in osd["state"][i].items()}
        opt.load_state_dict(osd)

    # ------------------------------------------------------------------ one step
    def my_rows(self, idx: np.ndarray) -> np.ndarray:
        """This rank's block of a global batch's row ids."""
        counts = row_counts(len(idx), world())
        start = sum(counts[:self.rank])
        return idx[start:start + counts[self.rank]]

    def loss(self, model: nn.Module, x_rows: torch.Tensor, batch: int, target_index: torch.Tensor,
             target_value: torch.Tensor) -> torch.Tensor:
        """The global batch's loss (the same on every rank), from this rank's rows ``x_rows`` and the whole
        batch's targets (global class ids)."""
        return vocab_parallel_linear_soft_target_loss(
            model(x_rows), model.head.weight, model.head.bias, class_range=self.class_range,
            num_classes=self.num_classes,
            target_index=target_index, target_value=target_value, mode="sigmoid", segments=self.segments,
            scale=model.scale, scale_kind=None if model.scale is None else
            ("class" if model.scale_kind == "class" else "segment"), backend=model.backend,
            x_rows=row_counts(batch, world()))

    def reduce_gradients(self, model: nn.Module) -> None:
        """Sums the replicated parameters' gradients over ranks (one flat all-reduce): each rank's backward saw
        only its rows."""
        params = dict(model.named_parameters())
        grads = [params[n].grad for n in self.replicated if params[n].grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        record("grad_replicated", flat)
        dist.all_reduce(flat)
        o = 0
        for g in grads:
            g.copy_(flat[o:o + g.numel()].view_as(g))
            o += g.numel()

    # ------------------------------------------------------------------ scores of this rank's classes
    @torch.no_grad()
    def scores_minus_bias(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits less the bias of this rank's classes [B, hi - lo] (``Student.scores`` restricted to the shard)."""
        h = model(x)
        lo, _ = self.class_range
        v0, v1 = self.verticals.start, self.verticals.stop
        scale = model.scale
        if scale is not None and model.scale_kind == "vertical":
            scale = scale[v0:v1]  # replicated per vertical; a per-class scale is already the shard's
        return kc_kernels.soft_target_logits(h[:, v0:v1] if h.dim() == 3 else h, model.head.weight, None,
                                             [o - lo for o in self.segments[v0:v1 + 1]], scale)

    @torch.no_grad()
    def health(self, model: nn.Module, x: torch.Tensor) -> Dict[str, float]:
        """``kc.train.health`` of the whole student: every rank scores the probe rows on its classes and the
        per-class sums are all-reduced, so every rank gets the same numbers."""
        was = model.training
        model.eval()
        f = model.backbone(x)
        dead = float((f.reshape(f.shape[0], -1) <= 0).all(0).float().mean())
        y = self.scores_minus_bias(model, x).double()
        rows = y.shape[0]
        sums = torch.stack([y.std(0).sum() if rows > 1 else y.new_zeros(()), (y * y).sum()]).to(_device())
        dist.all_reduce(sums)
        rms = float(torch.sqrt(sums[1] / (rows * self.num_classes))) + 1e-12
        spread = float(sums[0]) / self.num_classes / rms if rows > 1 else 1.0
        model.train(was)
        return {"dead": dead, "spread": spread}


def step_bytes(model: nn.Module, batch: int, world_size: int, dtype: torch.dtype = torch.float32) -> Dict[str, int]:
    """Bytes of the collectives of one student step, per rank, for a student (unsharded or sharded) on
    ``world_size`` ranks: the op's own (``kc_kernels.distributed.communication_bytes`` with the hidden units
    sharded by rows: their all-gather and the reduce-scatter of their gradient, both padded to the largest row
    block; class ranges, per-row loss, a per-vertical scale's gradient) and the replicated parameters' gradient
    all-reduce. ``logits_avoided``: the [B, N] logits and their
    gradient that one process would otherwise hold."""
    from kc_kernels.distributed import communication_bytes

    segments = model.segments.tolist()
    N = segments[-1]
    grouped = getattr(model.head, "grouped", False)
    width = model.head.width
    scale = {"vertical": "segment", "class": "class"}.get(model.scale_kind)
    op = communication_bytes(batch, width, N, world_size, segments=segments,
                             class_ranges=vertical_shards(segments, world_size), scale=scale,
                             grouped=grouped, dtype=dtype, x_rows=row_counts(batch, world_size))
    elem = torch.empty((), dtype=dtype).element_size()
    out = {k: v for k, v in op.items() if k not in ("total", "logits_avoided")}
    sharded = {"head.weight", "head.bias"} | ({"log_scale"} if model.scale_kind == "class" else set())
    out["grad_replicated"] = sum(p.numel() for n, p in model.named_parameters()
                                 if n not in sharded and n != "log_scale") * elem
    out["total"] = sum(out.values())
    out["logits_avoided"] = op["logits_avoided"]
    return out


# ---------------------------------------------------------------------------------------------- specialists

def my_verticals(segments: Sequence[int]) -> range:
    """The verticals whose specialists this rank trains: those of its head shard."""
    return verticals_of(segments, vertical_shards(segments, world())[rank()])
