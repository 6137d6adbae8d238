"""kc_kernels.compat.causal_lm_loss against a Hugging Face causal LM's own loss: a tiny LlamaForCausalLM built from
a LlamaConfig with random weights (nothing downloaded), its `model(input_ids, labels=labels).loss` and the
gradients of that loss to lm_head.weight and to the last hidden states."""
import pytest
import torch

from kc_kernels.compat import causal_lm_loss

transformers = pytest.importorskip("transformers", reason="transformers is not importable (requirements-dev.txt)")

V, H = 1000, 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _batch(B=3, T=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[-1, -3:] = -100  # padding at the end
    return ids, labels


def _close(got, want, rtol, what):
    err = float((got.detach().double() - want.detach().double()).abs().max())
    scale = float(want.detach().double().abs().max())
    assert err <= rtol * scale + 1e-12, f"{what}: max error {err:.3g} against max {scale:.3g}"


def _check(model, ids, labels, **kw):
    out = model(ids, labels=labels, output_hidden_states=True, **kw)
    hidden = out.hidden_states[-1]
    torch.testing.assert_close(model.lm_head(hidden), out.logits)  # the last hidden states feed lm_head
    ours = causal_lm_loss(hidden, model.lm_head, labels, **kw)
    _close(ours, out.loss, 1e-6, "loss")
    wrt = [model.lm_head.weight, hidden] + ([model.lm_head.bias] if model.lm_head.bias is not None else [])
    want = torch.autograd.grad(out.loss, wrt, retain_graph=True)
    got = torch.autograd.grad(ours, wrt)
    for name, a, w in zip(("d lm_head.weight", "d hidden", "d lm_head.bias"), got, want):
        _close(a, w, 1e-5, name)


def test_equals_the_model_loss(model):
    _check(model, *_batch())


def test_single_sequence(model):
    ids, labels = _batch(B=1, T=9)
    _check(model, ids, labels)


def test_num_items_in_batch(model):
    """Under gradient accumulation the Trainer passes the token count of the whole accumulated batch."""
    ids, labels = _batch()
    n = int((labels[:, 1:] != -100).sum()) + 11
    _check(model, ids, labels, num_items_in_batch=torch.tensor(n))


def test_base_model_hidden_states_and_weight_tensor(model):
    """The base model's last_hidden_state and the bare weight tensor give the same loss."""
    ids, labels = _batch(seed=2)
    want = model(ids, labels=labels).loss
    hidden = model.model(ids).last_hidden_state
    _close(causal_lm_loss(hidden, model.lm_head.weight, labels), want, 1e-6, "loss")


def test_lm_head_with_bias():
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=777, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.lm_head = torch.nn.Linear(32, 777, bias=True)
    torch.nn.init.normal_(m.lm_head.bias, std=0.5)
    ids = torch.randint(0, 777, (2, 11))
    labels = ids.clone()
    labels[1, :4] = -100
    _check(m, ids, labels)


def test_per_token_losses(model):
    ids, labels = _batch()
    hidden = model(ids, output_hidden_states=True).hidden_states[-1]
    per = causal_lm_loss(hidden, model.lm_head, labels, reduction="none")
    assert per.shape == (ids.shape[0], ids.shape[1] - 1)
    shifted = labels[:, 1:]
    assert not per[shifted == -100].any()
    _close(per.sum() / (shifted != -100).sum(), causal_lm_loss(hidden, model.lm_head, labels), 1e-6, "mean")
