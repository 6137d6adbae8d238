"""The compiled libraries build, load and compute; the backend registry reports what can run."""
import shutil

import pytest
import torch

import kc_kernels
from tests.helpers import assert_close


def test_backends_report_every_backend_with_reasons():
    status = kc_kernels.backends()
    assert set(status) == {"reference", "cpu", "triton", "cuda", "portable"}
    assert status["reference"] is True
    assert status["cpu"] is True, repr(status["cpu"])
    for name, ok in status.items():
        if not ok:
            assert isinstance(ok.reason, str) and ok.reason, name
            assert ok == False  # noqa: E712  (a falsy status still compares as False)


def test_cpu_extension_is_built_with_openmp():
    from kc_kernels import _C

    assert _C.openmp


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc absent: the CUDA library is not built here")
def test_cuda_library_is_built_where_nvcc_exists():
    assert kc_kernels.built_libraries()["_cuda"]
    from kc_kernels import _cuda

    n = _cuda.device_count()  # devices, or minus a CUDA error code
    assert isinstance(n, int)
    if n < 0:
        assert _cuda.error_string(-n)  # the error has a name
    assert bool(kc_kernels.backends()["cuda"]) == (n > 0)


def test_auto_dispatch_on_cpu_falls_back_quietly(gen):
    x = torch.randn(3, 4, generator=gen)
    w = torch.randn(6, 4, generator=gen)
    loss = kc_kernels.linear_soft_target_loss(x, w, target_index=torch.tensor([[0], [1], [2]]),
                                              target_value=torch.ones(3, 1), backend="auto")
    ref = kc_kernels.linear_soft_target_loss(x, w, target_index=torch.tensor([[0], [1], [2]]),
                                             target_value=torch.ones(3, 1), backend="reference")
    assert_close(loss, ref, torch.float32)


def test_unavailable_backend_raises_with_reason():
    status = kc_kernels.backends()
    missing = [n for n, ok in status.items() if not ok]
    if not missing:
        pytest.skip("every backend is available here")
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=missing[0]):
        kc_kernels.linear_soft_target_loss(x, w, teacher_logits=torch.randn(2, 4), backend=missing[0])


def test_modules_match_functional(gen):
    x = torch.randn(3, 4, generator=gen)
    w = torch.randn(8, 4, generator=gen)
    teacher = torch.randn(3, 8, generator=gen)
    mod = kc_kernels.LinearSoftTargetLoss(mode="softmax", segments=[0, 3, 8], temperature=2.0)
    assert_close(mod(x, w, teacher_logits=teacher),
                 kc_kernels.linear_soft_target_loss(x, w, teacher_logits=teacher, mode="softmax", segments=[0, 3, 8],
                                                    temperature=2.0), torch.float32)
    labels = torch.tensor([1, 2, 3])
    a = kc_kernels.SampledSoftmaxLoss(4, seed=0)(x, w, None, labels)
    # the module is the functional op with its seeded generator: the same draw, the same loss
    b = kc_kernels.sampled_softmax_loss(x, w, None, labels, num_sampled=4, generator=torch.Generator().manual_seed(0))
    assert_close(a, b, torch.float32)
    other = kc_kernels.sampled_softmax_loss(x, w, None, labels, num_sampled=4,
                                            generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, other)  # another seed draws other negatives


def test_sampled_softmax_module_passes_sparse_grad(gen):
    x = torch.randn(3, 4, generator=gen)
    w = torch.randn(50, 4, generator=gen, requires_grad=True)
    b = torch.zeros(50, requires_grad=True)
    labels = torch.tensor([1, 2, 3])
    kc_kernels.SampledSoftmaxLoss(5, seed=0, sparse_grad=True)(x, w, b, labels).backward()
    assert w.grad.is_sparse and b.grad.is_sparse
    # the rows touched are exactly the labels and the negatives the module's generator drew
    from kc_kernels import samplers

    drawn = samplers.sample_candidates("log_uniform", 5, 50, unique=True, generator=torch.Generator().manual_seed(0))
    rows = set(w.grad.coalesce().indices()[0].tolist())
    assert rows == set(labels.tolist()) | set(drawn.ids.tolist())
    dense = torch.zeros(50, 4)
    dense.index_add_(0, w.grad.coalesce().indices()[0], w.grad.coalesce().values())
    assert torch.equal(dense, w.grad.to_dense())


def test_auto_passes_over_a_row_that_lacks_the_dtype(monkeypatch):
    from kc_kernels import dispatch

    assert torch.float64 not in dispatch.row("linear_soft_target_loss", "triton").dtypes
    monkeypatch.setattr(dispatch, "_probe", lambda name: True)
    assert dispatch._lookup("linear_soft_target_loss", "auto", "cuda", torch.float64).backend == "portable"
    assert dispatch._lookup("linear_soft_target_loss", "auto", "cuda", torch.bfloat16).backend == "triton"
    assert dispatch._lookup("sampled_softmax_loss", "auto", "cuda", torch.float64).backend == "triton"


def test_backend_table_rows_are_frozen_and_checked():
    import dataclasses

    from kc_kernels import dispatch

    assert {(r.op, r.backend) for r in dispatch.TABLE} == {
        (op, b) for op in dispatch.OPS for b in dispatch.BACKEND_NAMES}
    r = dispatch.row("soft_target_loss", "cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.backend = "triton"
    with pytest.raises(ValueError, match="implementation"):
        dataclasses.replace(r, implementation="kc_kernels.chunked.soft_target_loss")
    with pytest.raises(ValueError, match="capabilities"):
        dataclasses.replace(r, capabilities=frozenset({"fast"}))
    for row in dispatch.TABLE:  # every name in the table exists (imported only for backends that run here)
        if dispatch.backends()[row.backend]:
            assert callable(dispatch.load(row.implementation))
            if row.epilogue is not None:
                assert dispatch.load(row.epilogue) is not None
    with pytest.raises(NotImplementedError, match="reference"):
        dispatch.epilogue("soft_target_loss", "reference")
