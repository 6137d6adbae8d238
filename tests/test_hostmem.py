"""kc_kernels.hostmem: large host tensors backed by NumPy memory behave as torch.empty / torch.zeros do."""
import pytest
import torch

from kc_kernels import hostmem


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64])
def test_large_zeros_are_zero_and_writable(dtype):
    shape = (1024, hostmem.MIN_BYTES // 1024 // torch.empty((), dtype=dtype).element_size() + 3)
    z = hostmem.zeros(shape, dtype)
    assert z.shape == shape and z.dtype == dtype and z.is_contiguous() and z.device.type == "cpu"
    assert not z.any()
    z[5, 7] = 3
    z[-1] += 1
    assert z.double().sum().item() == 3 + shape[1]
    e = hostmem.empty(shape, dtype)
    assert e.shape == shape and e.dtype == dtype and e.is_contiguous()
    e.fill_(2)
    assert (e == 2).all()


def test_small_requests_go_to_torch():
    z = hostmem.zeros((3, 5), torch.float32)
    assert z.shape == (3, 5) and not z.any()
    assert z.untyped_storage().resizable()  # torch's own storage
    assert not hostmem.zeros((4096, 1024), torch.float32).untyped_storage().resizable()  # NumPy's memory


def test_zeros_like_matches_torch():
    t = torch.randn(2048, 700).t()  # non-contiguous input: the result is contiguous, like torch's contiguous_format
    z = hostmem.zeros_like(t)
    assert z.shape == t.shape and z.dtype == t.dtype and z.is_contiguous() and not z.any()


def test_numpy_backed_gradients_accumulate():
    """A gradient in NumPy memory takes part in autograd accumulation and in an optimiser step."""
    w = torch.zeros(4096, 512, requires_grad=True)
    for _ in range(2):
        g = hostmem.zeros(w.shape, w.dtype)
        g[:10] = 1.0
        w.backward(g)
    assert w.grad.sum().item() == 2 * 10 * 512
    torch.optim.SGD([w], lr=0.5).step()
    assert w[0, 0].item() == -1.0 and w[-1, 0].item() == 0.0
