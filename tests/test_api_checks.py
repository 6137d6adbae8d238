"""Every bad input of the op (docs/ops.md) raises ValueError naming the argument."""
import pytest
import torch

import kc_kernels
from tests.helpers import make_problem


def base(gen=None):
    p = make_problem(4, 6, 10, G=2, gen=gen or torch.Generator().manual_seed(3), dtype=torch.float32)
    return p


BAD = [
    # (id, mutation of the keyword dict, argument the message must name)
    ("x-1d", lambda p: {**p, "x": p["x"][0]}, "x"),
    ("x-int", lambda p: {**p, "x": p["x"].long()}, "x"),
    ("weight-H", lambda p: {**p, "weight": p["weight"][:, :5]}, "weight"),
    ("weight-dtype", lambda p: {**p, "weight": p["weight"].double()}, "weight"),
    ("weight-device", lambda p: {**p, "weight": p["weight"].to("meta")}, "weight"),
    ("bias-shape", lambda p: {**p, "bias": p["bias"][:9]}, "bias"),
    ("bias-dtype", lambda p: {**p, "bias": p["bias"].half()}, "bias"),
    ("index-too-big",
     lambda p: {**p, "target_index": p["target_index"].clamp(max=9).index_fill(1, torch.tensor([0]), 10)},
     "target_index"),
    ("index-below-pad", lambda p: {**p, "target_index": p["target_index"].index_fill(1, torch.tensor([0]), -2)},
     "target_index"),
    ("index-float", lambda p: {**p, "target_index": p["target_index"].float()}, "target_index"),
    ("index-rows", lambda p: {**p, "target_index": p["target_index"][:3], "target_value": p["target_value"][:3]},
     "target_index"),
    ("value-shape", lambda p: {**p, "target_value": p["target_value"][:, :2]}, "target_value"),
    ("value-nan", lambda p: {**p, "target_value": p["target_value"].index_fill(1, torch.tensor([1]), float("nan"))},
     "target_value"),
    ("value-negative", lambda p: {**p, "target_value": p["target_value"] - 2.0}, "target_value"),
    ("value-without-index", lambda p: {**{k: v for k, v in p.items() if k != "target_index"}}, "target_index"),
    ("index-without-value", lambda p: {**{k: v for k, v in p.items() if k != "target_value"}}, "target_value"),
    ("both-target-forms", lambda p: {**p, "teacher_logits": torch.randn(4, 10)}, "teacher_logits"),
    ("no-targets", lambda p: {k: v for k, v in p.items() if k not in ("target_index", "target_value")},
     "target_index"),
    ("teacher-shape", lambda p: {**{k: v for k, v in p.items() if k not in ("target_index", "target_value")},
                                 "teacher_logits": torch.randn(4, 9)}, "teacher_logits"),
    ("teacher-nan", lambda p: {**{k: v for k, v in p.items() if k not in ("target_index", "target_value")},
                               "teacher_logits": torch.full((4, 10), float("nan"))}, "teacher_logits"),
    ("teacher-device", lambda p: {**{k: v for k, v in p.items() if k not in ("target_index", "target_value")},
                                  "teacher_logits": torch.randn(4, 10, device="meta")}, "teacher_logits"),
    ("segments-start", lambda p: {**p, "segments": torch.tensor([1, 5, 10])}, "segments"),
    ("segments-order", lambda p: {**p, "segments": torch.tensor([0, 5, 5, 10])}, "segments"),
    ("segments-decreasing", lambda p: {**p, "segments": torch.tensor([0, 7, 3, 10])}, "segments"),
    ("segments-end", lambda p: {**p, "segments": torch.tensor([0, 5, 9])}, "segments"),
    ("segments-float", lambda p: {**p, "segments": torch.tensor([0.0, 5.0, 10.0])}, "segments"),
    ("grouped-no-segments", lambda p: {**{k: v for k, v in p.items() if k != "segments"},
                                       "x": torch.randn(4, 2, 6)}, "segments"),
    ("grouped-wrong-G", lambda p: {**p, "x": torch.randn(4, 3, 6)}, "x"),
    ("scale-length", lambda p: {**p, "scale": torch.ones(3)}, "scale"),
    ("scale-2d", lambda p: {**p, "scale": torch.ones(2, 1)}, "scale"),
    ("temperature-zero", lambda p: {**p, "temperature": 0.0}, "temperature"),
    ("temperature-negative", lambda p: {**p, "temperature": -1.0}, "temperature"),
    ("temperature-nan", lambda p: {**p, "temperature": float("nan")}, "temperature"),
    ("mode", lambda p: {**p, "mode": "softplus"}, "mode"),
    ("reduction", lambda p: {**p, "reduction": "avg"}, "reduction"),
    ("sample-weight-shape", lambda p: {**p, "sample_weight": torch.ones(5)}, "sample_weight"),
    ("sample-weight-device", lambda p: {**p, "sample_weight": torch.ones(4, device="meta")}, "sample_weight"),
    ("sample-weight-nan", lambda p: {**p, "sample_weight": torch.full((4,), float("nan"))}, "sample_weight"),
    ("backend", lambda p: {**p, "backend": "fortran"}, "backend"),
]


@pytest.mark.parametrize("case,mutate,arg", BAD, ids=[b[0] for b in BAD])
def test_linear_soft_target_loss_rejects(case, mutate, arg):
    kw = mutate(base())
    x, w, b = kw.pop("x"), kw.pop("weight"), kw.pop("bias")
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        kc_kernels.linear_soft_target_loss(x, w, b, **kw)


def test_soft_target_loss_rejects_bad_logits_and_targets():
    with pytest.raises(ValueError, match="^logits"):
        kc_kernels.soft_target_loss(torch.randn(4), teacher_logits=torch.randn(4))
    with pytest.raises(ValueError, match="^teacher_logits"):
        kc_kernels.soft_target_loss(torch.randn(4, 5), teacher_logits=torch.randn(4, 6))
    with pytest.raises(ValueError, match="^target_index"):
        kc_kernels.soft_target_loss(torch.randn(4, 5), target_index=torch.full((4, 1), 5),
                                    target_value=torch.ones(4, 1))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("where", ["first", "last", "mid-long-segment"])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_one_nan_teacher_logit_is_reported(backend, where, teacher_dtype, mode):
    """The cpu backend finds a NaN teacher logit in its own pass over the teacher (no separate B x V check): one
    NaN anywhere (a chunk's first or last class, inside a segment walked in row blocks) is reported."""
    B, H, V = 5, 7, 1000
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(B, H, generator=g), torch.randn(V, H, generator=g)
    teacher = torch.randn(B, V, generator=g).to(teacher_dtype)
    row, col = {"first": (0, 0), "last": (B - 1, V - 1), "mid-long-segment": (2, 700)}[where]
    teacher[row, col] = float("nan")
    kw = dict(mode=mode, teacher_logits=teacher, segments=[0, 300, 1000], backend=backend,
              memory_budget=B * 256 * 4)  # 256-class chunks: the 700-class segment goes in row blocks
    with pytest.raises(ValueError, match="^teacher_logits: contains NaN"):
        kc_kernels.linear_soft_target_loss(x, w, None, **kw)
    with pytest.raises(ValueError, match="^teacher_logits: contains NaN"):
        kc_kernels.soft_target_loss(x @ w.t(), **kw)
    teacher[row, col] = 0.0
    assert torch.isfinite(kc_kernels.linear_soft_target_loss(x, w, None, **kw))


def test_good_input_passes_every_check():
    kw = base()
    x, w, b = kw.pop("x"), kw.pop("weight"), kw.pop("bias")
    loss = kc_kernels.linear_soft_target_loss(x, w, b, **kw)
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------ sampled softmax

def ss_base():
    g = torch.Generator().manual_seed(5)
    return dict(x=torch.randn(4, 6, generator=g), weight=torch.randn(20, 6, generator=g), bias=torch.zeros(20),
                labels=torch.randint(0, 20, (4,), generator=g), num_sampled=5, generator=g)


SS_BAD = [
    ("x-3d", lambda p: {**p, "x": torch.randn(4, 2, 6)}, "x"),
    ("weight-H", lambda p: {**p, "weight": torch.randn(20, 5)}, "weight"),
    ("bias-shape", lambda p: {**p, "bias": torch.zeros(19)}, "bias"),
    ("labels-float", lambda p: {**p, "labels": p["labels"].float()}, "labels"),
    ("labels-range", lambda p: {**p, "labels": torch.tensor([0, 1, 2, 20])}, "labels"),
    ("labels-rows", lambda p: {**p, "labels": torch.tensor([0, 1, 2])}, "labels"),
    ("labels-all-padding", lambda p: {**p, "labels": torch.tensor([[0, -1], [-1, -1], [1, 2], [3, -1]])}, "labels"),
    ("num-sampled-zero", lambda p: {**p, "num_sampled": 0}, "num_sampled"),
    ("num-sampled-too-many", lambda p: {**p, "num_sampled": 21}, "num_sampled"),
    ("sampler", lambda p: {**p, "sampler": "zipfian"}, "sampler"),
    ("unigram-no-counts", lambda p: {**p, "sampler": "unigram"}, "class_counts"),
    ("unigram-negative-counts", lambda p: {**p, "sampler": "unigram", "class_counts": -torch.ones(20)},
     "class_counts"),
    ("unigram-counts-shape", lambda p: {**p, "sampler": "unigram", "class_counts": torch.ones(19)}, "class_counts"),
    ("sampled-shape", lambda p: {**p, "sampled": (torch.tensor([1, 2]), torch.ones(3), torch.ones(2))}, "sampled"),
    ("sampled-range", lambda p: {**p, "sampled": (torch.tensor([1, 20]), torch.ones(4), torch.ones(2))}, "sampled"),
    ("sampled-nonpositive", lambda p: {**p, "sampled": (torch.tensor([1, 2]), torch.ones(4), torch.zeros(2))},
     "sampled"),
    ("reduction", lambda p: {**p, "reduction": "avg"}, "reduction"),
]


@pytest.mark.parametrize("case,mutate,arg", SS_BAD, ids=[b[0] for b in SS_BAD])
def test_sampled_softmax_loss_rejects(case, mutate, arg):
    kw = mutate(ss_base())
    x, w, b, labels = kw.pop("x"), kw.pop("weight"), kw.pop("bias"), kw.pop("labels")
    if "sampled" in kw:
        kw.pop("num_sampled")
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        kc_kernels.sampled_softmax_loss(x, w, b, labels, **kw)


class _NoHostReads:
    """While active, reading a tensor's value on the host (bool, int, float, item, tolist) fails the test."""

    NAMES = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __enter__(self):
        def refuse(*args, **kwargs):
            raise AssertionError("a value check read a tensor on the host")

        for name in self.NAMES:
            self.mp.setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        for name in self.NAMES:
            self.mp.undo()
        return False


ASYNC_BAD = [
    ("target_index", lambda p: {**p, "target_index": p["target_index"].clamp(max=9).index_fill(1, torch.tensor([0]),
                                                                                                  10)}),
    ("target_value", lambda p: {**p, "target_value": p["target_value"].index_fill(1, torch.tensor([1]),
                                                                                  float("nan"))}),
    ("target_value", lambda p: {**p, "target_value": p["target_value"] - 2.0}),
    ("teacher_logits", lambda p: {**{k: v for k, v in p.items() if k not in ("target_index", "target_value")},
                                  "teacher_logits": torch.randn(4, 10).index_fill(1, torch.tensor([3]),
                                                                                  float("nan"))}),
    ("sample_weight", lambda p: {**p, "sample_weight": torch.tensor([1.0, float("nan"), 1.0, 1.0])}),
]


@pytest.mark.parametrize("name,mutate", ASYNC_BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ASYNC_BAD)])
def test_async_value_checks_are_device_assertions(monkeypatch, name, mutate):
    """KC_CHECK_VALUES=async: every value check is a device-side assertion (torch._assert_async) queued without a
    host read, so on a GPU it costs no synchronisation and a bad value surfaces at the next natural sync. On CPU
    tensors the assertion fires at once: a RuntimeError whose message starts with the argument."""
    monkeypatch.setenv("KC_CHECK_VALUES", "async")
    from kc_kernels.ops import checks

    assert checks.values_mode(torch.device("cuda")) == "async" and not checks.values_enabled(torch.device("cpu"))
    p = mutate(base())
    p["segments"] = p["segments"].tolist()  # a layout, read once per tensor on a GPU: not a value check
    queued = []
    real = torch._assert_async
    monkeypatch.setattr(torch, "_assert_async", lambda ok, msg: queued.append(msg) or real(ok, msg))
    with _NoHostReads(monkeypatch), pytest.raises(RuntimeError, match=f"^{name}: "):
        kc_kernels.linear_soft_target_loss(p.pop("x"), p.pop("weight"), p.pop("bias"), backend="reference", **p)
    assert queued and queued[-1].startswith(f"{name}: ")


def test_async_value_checks_pass_good_values_and_cover_sampled_softmax(monkeypatch):
    monkeypatch.setenv("KC_CHECK_VALUES", "async")
    p = base()
    x, w, b = p.pop("x"), p.pop("weight"), p.pop("bias")
    good = kc_kernels.linear_soft_target_loss(x, w, b, backend="cpu", **p)
    monkeypatch.setenv("KC_CHECK_VALUES", "1")
    assert torch.equal(good, kc_kernels.linear_soft_target_loss(x, w, b, backend="cpu", **p))
    monkeypatch.setenv("KC_CHECK_VALUES", "async")
    sampled = (torch.tensor([1, 2, 3]), torch.ones(4), torch.ones(3))
    with pytest.raises(RuntimeError, match="^labels: "):
        kc_kernels.sampled_softmax_loss(x, w, b, torch.tensor([0, 1, 10, 2]), sampled=sampled, backend="cpu")
    with pytest.raises(RuntimeError, match="^sampled: "):
        kc_kernels.sampled_softmax_loss(x, w, b, torch.tensor([0, 1, 9, 2]),
                                        sampled=(torch.tensor([1, 12, 3]),) + sampled[1:], backend="cpu")
    monkeypatch.setenv("KC_CHECK_VALUES", "sometimes")
    with pytest.raises(ValueError, match="KC_CHECK_VALUES"):
        kc_kernels.linear_soft_target_loss(x, w, b, backend="cpu", **p)
