"""What the GPU path should cost, from the bytes its kernels move: a prediction to read the first GPU run against
(docs/performance.md, "GPU: predicted from the bytes moved").

    python -m benchmarks.gpu_model            # the prediction table of docs/performance.md, for H100 and H200

Per call of the op (forward and backward, as the benchmark times it) the model counts, from what the code reads and
writes (kc_kernels/driver.py, kc_kernels/gpu_epilogue.py, kc_kernels/triton/epilogue.py, csrc/cuda/soft_target.cu,
kc_kernels/{cuda,triton}/sampled_softmax.py):

- the *floor*: the three GEMMs over all classes (benchmarks/common.py: floor_fn), each at the larger of its FLOPs
  over the matrix rate and its bytes (each operand read once, the output written once) over the memory bandwidth;
- the *epilogue*: kc's own kernels (row_stats and final; the sampled softmax's), in bytes of device memory;
- *torch passes*: the elementwise torch work the driver adds around them (the partial sums of the final kernel,
  dx summed in fp32 over the chunks, dW summed over the row blocks of a long segment), in bytes.

kc's GEMMs are taken to run at the floor's rate (the same FLOPs, in [B, chunk] or [rows, V] pieces), so the
predicted ratio is (floor + (epilogue + torch passes) / bandwidth) / floor. Bytes that the caches should keep (the
per-row constants, the bias, a tile's sorted targets, the segment of every class) are not counted; a row of scores
that a kernel reads twice is counted twice when the rows in flight exceed the L2 (every case here).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Rates:
    """A GPU's memory bandwidth (bytes/s) and dense bf16 matrix rate (FLOP/s)."""

    name: str
    bandwidth: float
    bf16_flops: float
    fp32_flops: float = 67e12  # plain fp32 (no TF32): the CUDA sampled softmax's GEMMs


# the vendors' datasheet figures (SXM parts): the prediction's assumption
DATASHEET = {"H100": Rates("H100 SXM (datasheet)", 3.35e12, 990e12),
             "H200": Rates("H200 (datasheet)", 4.8e12, 990e12)}
# what a large device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul reached on these GPUs
# through PyTorch: the same model at these rates is the second prediction
MEASURED = {"H100": Rates("H100 (copy 3.0 TB/s, matmul 800 TFLOP/s)", 3.0e12, 800e12),
            "H200": Rates("H200 (copy 4.3 TB/s, matmul 790 TFLOP/s)", 4.3e12, 790e12)}


def gpu_of(device_name: str) -> Optional[str]:
    """"H100" / "H200" from a CUDA device name, else None."""
    for key in ("H200", "H100"):
        if key in device_name.upper():
            return key
    return None


# The code's constants the counts depend on (as read in the sources; a change there moves the prediction).
MEMORY_BUDGET = 512 << 20  # kc_kernels/gpu_epilogue.py: DeviceEpilogue.default_memory_budget
MIN_CHUNK = 256  # kc_kernels/layout.py
HALF_ADD_BLOCKS = 4  # kc_kernels/layout.py: row blocks whose half dW is summed in place
FINAL_TILE = {"triton": (32, 128), "cuda": (32, 256)}  # (rows, columns) of a final kernel's tile on the GPU
ROW_ALIGN_BYTES = 64


def padded_row_stride(cols: int, itemsize: int) -> int:
    """kc_kernels/layout.py: rows an odd number of 64-byte lines apart."""
    per_line = max(1, ROW_ALIGN_BYTES // itemsize)
    lines = -(-cols // per_line)
    return (lines + 1 - lines % 2) * per_line


@dataclass(frozen=True)
class Case:
    """One benchmark case: ``loss`` as benchmarks/common.py names it (or "sampled-softmax")."""

    loss: str
    B: int
    H: int
    V: int
    itemsize: int = 2  # bf16
    K: int = 100  # sigmoid-k100's targets a row
    S: int = 0  # sampled softmax's samples

    @property
    def label(self) -> str:
        s = f" S={self.S}" if self.S else ""
        return f"{self.loss} B={self.B} H={self.H} V={self.V}{s}"


# the cases of issue 25 (docs/performance.md)
CASES = (Case("softmax-ce-hard", 8192, 4096, 128_256), Case("sigmoid-k100", 4096, 512, 100_000),
         Case("softmax-kl-dense", 4096, 512, 100_000), Case("sampled-softmax", 4096, 512, 100_000, S=8192))


@dataclass
class Walk:
    """The driver's plan for one case: column chunks of whole rows, or row blocks over a long segment."""

    capacity: int  # classes a column chunk holds
    chunks: List[int]  # columns of each chunk (one per row block when ``row_blocks`` > 1 or the segment is long)
    row_blocks: int  # blocks of rows of a segment longer than a chunk (1: column chunks over all rows)
    block_rows: int
    dw_in_place: bool  # dW summed over the row blocks in its own dtype (else in an fp32 accumulator)


def walk(c: Case, backend: str) -> Walk:
    """kc_kernels/driver.py's Sweep for one segment of V classes and no scale (every case here)."""
    tile_r = FINAL_TILE[backend][0]
    per_col = c.B * c.itemsize + 8 * -(-c.B // tile_r)  # DeviceEpilogue.bytes_per_class
    capacity = min(c.V, max(MIN_CHUNK, MEMORY_BUDGET // per_col))
    if c.V <= capacity:
        return Walk(capacity, [c.V], 1, c.B, True)
    chunks = [min(capacity, c.V - lo) for lo in range(0, c.V, capacity)]
    if c.loss == "sigmoid-k100":  # no segment statistics: column chunks, FINAL only
        return Walk(capacity, chunks, 1, c.B, True)
    # softmax over a segment longer than a chunk: row blocks holding the whole segment (Sweep._row_blocks)
    block_elems = c.B * padded_row_stride(capacity, c.itemsize)
    rows = min(c.B, max(32, block_elems // padded_row_stride(c.V, c.itemsize)))
    blocks = -(-c.B // rows)
    return Walk(capacity, [c.V], blocks, rows, blocks <= HALF_ADD_BLOCKS)


@dataclass
class Count:
    """Bytes of one call, by kernel (the epilogue) and by torch pass, with how each was counted."""

    epilogue: Dict[str, float] = field(default_factory=dict)
    torch: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def add(self, where: Dict[str, float], name: str, nbytes: float) -> None:
        where[name] = where.get(name, 0.0) + nbytes


def floor(c: Case, r: Rates) -> Tuple[float, float, float]:
    """(FLOPs, bytes, seconds) of the three GEMMs over all classes (S for the sampled softmax), each at the larger of
    its compute and memory time."""
    n = c.S or c.V
    s = c.itemsize
    gemms = [  # (flops, bytes): logits = x W^T, dx = G W, dW = G^T x
        (2 * c.B * n * c.H, s * (c.B * c.H + n * c.H + c.B * n)),
        (2 * c.B * n * c.H, s * (c.B * n + n * c.H + c.B * c.H)),
        (2 * c.B * n * c.H, s * (c.B * n + c.B * c.H + n * c.H)),
    ]
    t = sum(max(f / r.bf16_flops, b / r.bandwidth) for f, b in gemms)
    return sum(f for f, _ in gemms), sum(b for _, b in gemms), t


def count(c: Case, backend: str) -> Count:
    """Bytes kc moves beyond the floor's GEMMs in one call (forward + backward) of ``backend``."""
    if c.loss == "sampled-softmax":
        return _count_sampled(c, backend)
    w = walk(c, backend)
    s, t = c.itemsize, c.itemsize  # scores and the dense teacher in the input dtype (bf16)
    E = c.B * c.V  # scores, over all calls
    br, bc = FINAL_TILE[backend]
    out = Count()
    softmax = c.loss.startswith("softmax")
    dense = c.loss == "softmax-kl-dense"
    two_pass = backend == "cuda"  # csrc/cuda: a max pass, then a sum pass over the same row piece
    if dense:
        # TEACHER walk of its own before the scores (DeviceEpilogue.fuses_teacher is False)
        out.add(out.epilogue, "row_stats (teacher)", (2 if two_pass else 1) * t * E)
    if softmax:
        # STATS: u once (Triton, online max) or twice (CUDA); a dense teacher's z in the sum pass
        out.add(out.epilogue, "row_stats", ((2 if two_pass else 1) * s + (t if dense else 0)) * E)
        out.notes.append("row_stats: scores read " + ("twice (max pass, then sums)" if two_pass else "once"))
    # FINAL: u read, gradient written over it, the teacher read again for z
    final = (2 * s + (t if dense else 0)) * E
    # partial sums: col_part holds a column sum per row tile (its dbias plane is written), row_part a row sum per
    # column tile (2 planes: loss terms, z y)
    col_sums = sum(-(-rows // br) * cols for rows, cols in _calls(c, w))
    row_sums = sum(rows * -(-cols // bc) for rows, cols in _calls(c, w))
    final += 4 * col_sums + 8 * row_sums
    out.add(out.epilogue, "final", final)
    # torch passes over the partial sums: dbias = col_part[0].sum(0); the sigmoid's loss = row_part.sum(1)
    out.add(out.torch, "dbias column sums", 4 * col_sums)
    if not softmax:
        out.add(out.torch, "loss row sums", 8 * row_sums)
    # dx: fp32 accumulator, each call's [rows, H] half GEMM output added (write 2, read 2 + 4, write 4), then cast
    calls = _calls(c, w)
    out.add(out.torch, "dx fp32 sum", sum(rows * c.H * (2 + 2 + 4 + 4) for rows, _ in calls) - 2 * c.B * c.H
            + c.B * c.H * (4 + 2))
    VH = c.V * c.H
    if w.row_blocks > 1:
        if w.dw_in_place:  # addmm_ into the half dW: each later block reads and writes it once more
            out.add(out.torch, "dW summed in place", (w.row_blocks - 1) * 2 * s * VH)
        else:  # each block's half dW is a fresh GEMM output, copied / added into fp32, then cast back
            gemm_out = (w.row_blocks - 1) * s * VH
            first = s * VH + 4 * VH
            adds = (w.row_blocks - 1) * (4 * VH + s * VH + 4 * VH)
            back = 4 * VH + s * VH
            out.add(out.torch, "dW via fp32 accumulator", gemm_out + first + adds + back)
            out.notes.append(f"{w.row_blocks} row blocks > {HALF_ADD_BLOCKS}: dW through an fp32 accumulator")
    return out


def _calls(c: Case, w: Walk) -> List[Tuple[int, int]]:
    """(rows, columns) of each epilogue call."""
    if w.row_blocks > 1:
        return [(min(w.block_rows, c.B - r0), c.V) for r0 in range(0, c.B, w.block_rows)]
    return [(c.B, cols) for cols in w.chunks]


def _count_sampled(c: Case, backend: str) -> Count:
    """Sampled softmax, S shared samples, one label a row."""
    out = Count()
    BS = c.B * c.S
    if backend == "cuda":
        # [B, S] fp32 logits from an fp32 GEMM on gathered, upcast rows; bias, -log Q and the mask each a read +
        # write; the kernel reads the row twice in forward, three times and writes it once in backward
        out.add(out.epilogue, "sampled_softmax_kernel", 4 * BS * (2 + 4))
        out.add(out.torch, "[B, S] bias, -log Q, mask, dbias sum", 4 * BS * (2 + 2 + 2 + 1))
        out.add(out.torch, "gathers and fp32 copies of x, W_S", c.S * c.H * (c.itemsize + 4) + c.B * c.H * 6)
        out.notes.append("fp32 GEMMs (inputs upcast after the gather): at the fp32 rate, not bf16")
    else:
        # fused: the forward kernel and the dlogits kernel each recompute the logits tile by tile (a 4th GEMM's
        # FLOPs), dlogits [B, S] fp32 written once and read by the dx and dW kernels, then summed for dbias
        out.add(out.epilogue, "dlogits write + dx/dW reads", 4 * BS * 3)
        out.add(out.torch, "dbias sum", 4 * BS)
        out.notes.append("Triton tiled GEMMs (64x64x64 blocks) in place of cuBLAS, 4 GEMMs' FLOPs")
    # dense dW: [V, H] zeroed, the touched rows added
    out.add(out.torch, "dense dW zero fill", c.V * c.H * c.itemsize)
    return out


def predict(c: Case, backend: str, r: Rates) -> Dict:
    """The prediction of one case on one GPU: bytes, milliseconds and the ratio to the floor."""
    flops, floor_bytes, t_floor = floor(c, r)
    n = count(c, backend)
    ep, tp = sum(n.epilogue.values()), sum(n.torch.values())
    t_gemm = t_floor
    if c.loss == "sampled-softmax":
        g = 2 * c.B * c.S * c.H
        t_gemm = 3 * g / r.fp32_flops if backend == "cuda" else 4 * g / r.bf16_flops
    t_ep, t_tp = ep / r.bandwidth, tp / r.bandwidth
    kc_s = t_gemm + t_ep + t_tp
    return {"case": c.label, "loss": c.loss, "shape": dict(B=c.B, H=c.H, V=c.V, S=c.S), "backend": backend,
            "gpu": r.name, "floor_gflop": flops / 1e9, "floor_gb": floor_bytes / 1e9, "floor_ms": t_floor * 1e3,
            "gemm_ms": t_gemm * 1e3,
            "epilogue_gb": ep / 1e9, "epilogue_ms": t_ep * 1e3, "epilogue_bytes_per_logit": ep / (c.B * (c.S or c.V)),
            "torch_gb": tp / 1e9, "torch_ms": t_tp * 1e3, "kc_ms": kc_s * 1e3, "ratio": kc_s / t_floor,
            "epilogue": {k: v / 1e9 for k, v in n.epilogue.items()}, "torch": {k: v / 1e9 for k, v in n.torch.items()},
            "notes": n.notes, "walk": asdict(walk(c, backend)) if c.loss != "sampled-softmax" else None}


def case_of(loss: str, B: int, H: int, V: int, S: int = 0, itemsize: int = 2) -> Case:
    return Case(loss, B, H, V, itemsize=itemsize, S=S)


def predictions(gpu: Optional[str], cases=CASES, backends=("triton", "cuda")) -> List[Dict]:
    """Every case on every backend at the datasheet and the measured rates of ``gpu`` (both GPUs when None)."""
    out = []
    for key in ([gpu] if gpu else list(DATASHEET)):
        for c in cases:
            for b in backends:
                for rates, basis in ((DATASHEET[key], "datasheet"), (MEASURED[key], "measured")):
                    out.append(dict(predict(c, b, rates), basis=basis, gpu_key=key))
    return out


def markdown() -> str:
    rows = ["| case | backend | epilogue GB (B/logit) | torch passes GB | floor ms H100 / H200 | epilogue ms H100 / "
            "H200 | predicted ratio H100 / H200 (at measured rates) |", "|---|---|---|---|---|---|---|"]
    for c in CASES:
        for b in ("triton", "cuda"):
            p = {k: predict(c, b, DATASHEET[k]) for k in DATASHEET}
            m = {k: predict(c, b, MEASURED[k]) for k in MEASURED}
            h1, h2 = p["H100"], p["H200"]
            rows.append(f"| {c.label} | {b} | {h1['epilogue_gb']:.2f} ({h1['epilogue_bytes_per_logit']:.2f}) | "
                        f"{h1['torch_gb']:.2f} | {h1['floor_ms']:.2f} / {h2['floor_ms']:.2f} | "
                        f"{h1['epilogue_ms']:.2f} / {h2['epilogue_ms']:.2f} | {h1['ratio']:.2f} / {h2['ratio']:.2f} "
                        f"({m['H100']['ratio']:.2f} / {m['H200']['ratio']:.2f}) |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
    for c in CASES:
        for b in ("triton", "cuda"):
            p = predict(c, b, DATASHEET["H100"])
            parts = ", ".join(f"{k} {v:.2f}" for k, v in {**p["epilogue"], **p["torch"]}.items())
            print(f"{c.label} {b}: {parts} GB; walk {p['walk']}; {'; '.join(p['notes'])}")
