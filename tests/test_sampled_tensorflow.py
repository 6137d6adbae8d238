"""Sampled softmax against TensorFlow's own tf.nn.sampled_softmax_loss on the same sampled values.

TensorFlow (tensorflow-cpu, in requirements-dev.txt) is the peer kc's semantics follow, so it is the oracle here,
not a re-derivation of it. It is imported once, by the ``tf`` fixture, so collecting the suite never pays for it.
Both get the same candidates, expected counts and parameters in float64 (fp32 on the cuda backend); compared are
the per-row losses and the gradients of their sum to x, weight and bias, for both remove_accidental_hits settings,
one and several true labels, and candidates that repeat a row's true label (sampling with replacement), where kc's
default (mask every copy) and TensorFlow (mask one) differ and accidental_hits="tensorflow" reproduces TensorFlow.
"""
import math
import os

import pytest
import torch

import kc_kernels
from tests.conftest import HAS_CUDA
from tests.helpers import assert_close

HAS_TRITON = bool(kc_kernels.backends()["triton"])
BACKENDS = ["reference", "cpu",
            pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")),
            pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))]


@pytest.fixture(scope="module")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # its start-up banner is not test output
    return pytest.importorskip(
        "tensorflow", reason="TensorFlow is the oracle of this comparison and is not importable here "
                             "(pip install -r requirements-dev.txt installs tensorflow-cpu)")


def _problem(num_true: int, repeated: bool, seed: int = 0):
    """B=6 rows, V=20 classes, S=10 candidates. Every row's labels are distinct (TensorFlow has no padding). With
    ``repeated`` the candidates hold row 0's first label three times and row 1's last label twice, as sampling with
    replacement draws them; otherwise they hold each of those once (an accidental hit without repeats)."""
    g = torch.Generator().manual_seed(seed)
    B, H, V, S = 6, 8, 20, 10
    x = torch.randn(B, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H) * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    labels = torch.stack([torch.randperm(V, generator=g)[:num_true] for _ in range(B)])
    ids = torch.randperm(V, generator=g)[:S]
    if repeated:
        ids[[0, 3, 7]] = labels[0, 0]
        ids[[2, 5]] = labels[1, -1]
    else:
        others = ids[(ids != labels[0, 0]) & (ids != labels[1, -1])]
        ids = torch.cat([labels[0, :1], labels[1, -1:], others])[:S]
    true_exp = torch.rand(B, num_true, generator=g, dtype=torch.float64) + 0.05
    samp_exp = torch.rand(S, generator=g, dtype=torch.float64) + 0.05
    return x, w, b, labels, (ids, true_exp, samp_exp)


def _tensorflow(tf, x, w, b, labels, sampled, remove_hits):
    """Per-row loss and the gradients of its sum from tf.nn.sampled_softmax_loss, as float64 torch tensors."""
    ids, true_exp, samp_exp = (t.numpy() for t in sampled)
    xt, wt, bt = (tf.Variable(t.numpy()) for t in (x, w, b))
    with tf.GradientTape() as tape:
        loss = tf.nn.sampled_softmax_loss(
            weights=wt, biases=bt, labels=tf.constant(labels.numpy()), inputs=xt, num_sampled=len(ids),
            num_classes=w.shape[0], num_true=labels.shape[1], sampled_values=(ids, true_exp, samp_exp),
            remove_accidental_hits=remove_hits)
        total = tf.reduce_sum(loss)
    grads = tape.gradient(total, [xt, wt, bt])  # weight and bias gradients are IndexedSlices (gathered rows)
    return [torch.from_numpy(tf.convert_to_tensor(t).numpy()) for t in [loss] + grads]


def _kc(backend, x, w, b, labels, sampled, remove_hits, accidental_hits):
    dtype = torch.float32 if backend == "cuda" else torch.float64  # the cuda backend computes in fp32
    device = "cuda" if backend in ("cuda", "triton") and HAS_CUDA else "cpu"
    xs, ws, bs = (t.detach().to(device, dtype).requires_grad_() for t in (x, w, b))
    loss = kc_kernels.sampled_softmax_loss(
        xs, ws, bs, labels.to(device), sampled=tuple(t.to(device) for t in sampled), backend=backend,
        remove_accidental_hits=remove_hits, accidental_hits=accidental_hits, reduction="none")
    return [loss] + list(torch.autograd.grad(loss.sum(), [xs, ws, bs])), dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("remove_hits", [True, False])
@pytest.mark.parametrize("num_true", [1, 3])
@pytest.mark.parametrize("repeated", [False, True])
def test_tensorflow_accidental_hits_mode_equals_tensorflow(tf, backend, remove_hits, num_true, repeated):
    """accidental_hits="tensorflow" is TensorFlow's loss and gradients in every case."""
    problem = _problem(num_true, repeated)
    want = _tensorflow(tf, *problem, remove_hits)
    got, dtype = _kc(backend, *problem, remove_hits, "tensorflow")
    for name, a, e in zip(("loss", "dx", "dweight", "dbias"), got, want):
        assert_close(a, e, dtype, what=f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_true", [1, 3])
def test_default_masks_every_repeat_and_equals_tensorflow_without_repeats(tf, backend, num_true):
    """kc's default: the same as TensorFlow when no label is drawn twice; when one is, TensorFlow leaves the
    other copies in the softmax, and only those rows differ."""
    problem = _problem(num_true, repeated=False)
    got, dtype = _kc(backend, *problem, True, "all")
    for name, a, e in zip(("loss", "dx", "dweight", "dbias"), got, _tensorflow(tf, *problem, True)):
        assert_close(a, e, dtype, what=f"{backend} {name}")

    problem = _problem(num_true, repeated=True)
    loss = _kc(backend, *problem, True, "all")[0][0].detach().double().cpu()
    tf_loss = _tensorflow(tf, *problem, True)[0]
    labels, ids = problem[3], problem[4][0]
    repeats = ids[(ids[:, None] == ids[None, :]).sum(dim=1) > 1]
    drawn_twice = (labels[:, :, None] == repeats).any(dim=(1, 2))  # rows 0 and 1, and any that share their labels
    assert drawn_twice[:2].all()
    differs = (loss - tf_loss).abs() > 1e-4 * tf_loss.abs()
    assert torch.equal(differs, drawn_twice), (loss, tf_loss)
    assert bool((loss[differs] < tf_loss[differs]).all())  # the unmasked copies only add to TensorFlow's softmax
