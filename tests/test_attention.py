"""detr_edu.attention against torch built-ins (float64 where precision matters)."""

import pytest
import torch
import torch.nn.functional as F

from detr_edu.attention import (
    MultiheadAttention,
    SelfAttention,
    expand_key_padding_mask,
    scaled_dot_product_attention,
)


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def test_by_hand_equals_torch_sdpa_without_mask():
    q, k, v = _rand(2, 3, 5, 4, seed=1), _rand(2, 3, 7, 4, seed=2), _rand(2, 3, 7, 6, seed=3)
    out, weights = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))


def test_by_hand_equals_torch_sdpa_with_bool_mask_opposite_convention():
    q, k, v = _rand(2, 5, 4, seed=1), _rand(2, 7, 4, seed=2), _rand(2, 7, 6, seed=3)
    blocked = torch.rand(5, 7, generator=torch.Generator().manual_seed(4)) < 0.4
    blocked[:, 0] = False  # keep one key per query so no row is fully blocked
    out, weights = scaled_dot_product_attention(q, k, v, attn_mask=blocked)
    # torch's SDPA reads a boolean mask as "may attend": pass the complement
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=~blocked))
    assert (weights[:, blocked] == 0).all()


def test_additive_mask_equals_boolean_mask():
    q, k, v = _rand(1, 4, 8, seed=5), _rand(1, 6, 8, seed=6), _rand(1, 6, 8, seed=7)
    blocked = torch.zeros(4, 6, dtype=torch.bool)
    blocked[:, 4:] = True
    additive = torch.zeros(4, 6, dtype=torch.float64).masked_fill(blocked, float("-inf"))
    a, _ = scaled_dot_product_attention(q, k, v, attn_mask=blocked)
    b, _ = scaled_dot_product_attention(q, k, v, attn_mask=additive)
    torch.testing.assert_close(a, b)


def test_fully_blocked_row_is_an_error():
    q = _rand(1, 2, 4)
    with pytest.raises(ValueError, match="blocks every key"):
        scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(2, 2, dtype=torch.bool))


def test_sdpa_shape_errors():
    with pytest.raises(ValueError, match="same last dim"):
        scaled_dot_product_attention(_rand(2, 3), _rand(2, 4), _rand(2, 4))
    with pytest.raises(ValueError, match="same number of keys"):
        scaled_dot_product_attention(_rand(2, 3), _rand(4, 3), _rand(5, 3))


def _copy_into_torch_mha(ours: SelfAttention, dim: int, heads: int) -> torch.nn.MultiheadAttention:
    ref = torch.nn.MultiheadAttention(dim, heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    return ref


@pytest.mark.parametrize("masked", [False, True])
def test_self_attention_equals_torch_mha(masked):
    torch.manual_seed(0)
    ours = SelfAttention(dim=12, num_heads=3).double().eval()
    ref = _copy_into_torch_mha(ours, 12, 3).eval()
    x = _rand(2, 6, 12, seed=8)
    kpm = torch.tensor([[False] * 6, [False] * 4 + [True] * 2]) if masked else None
    mask = None
    if masked:
        mask = torch.zeros(6, 6, dtype=torch.bool)
        mask[0, 1] = True
    got, w = ours(x, attn_mask=mask, key_padding_mask=kpm, return_weights=True)
    want, w_ref = ref(x, x, x, attn_mask=mask, key_padding_mask=kpm, average_attn_weights=False)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(w, w_ref)


def test_key_padding_mask_equals_expanded_attn_mask():
    torch.manual_seed(1)
    layer = MultiheadAttention(embed_dim=8, num_heads=2).double().eval()
    q, kv = _rand(3, 4, 8, seed=9), _rand(3, 6, 8, seed=10)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    kpm[2, 2:] = True
    a = layer(q, kv, key_padding_mask=kpm)
    attn_mask = expand_key_padding_mask(kpm, 4).repeat_interleave(2, dim=0)  # (B*nh, Nq, Nk)
    b = layer(q, kv, attn_mask=attn_mask)
    torch.testing.assert_close(a, b)


def test_wrapper_defaults_positions_and_identity():
    torch.manual_seed(2)
    layer = MultiheadAttention(embed_dim=8, num_heads=2).double().eval()
    x, pos = _rand(2, 5, 8, seed=11), _rand(2, 5, 8, seed=12)
    out = layer(x, query_pos=pos)
    # by hand: q = k = x + pos, v = x, identity = x
    ref, _ = layer.attn(x + pos, x + pos, x)
    torch.testing.assert_close(out, x + ref)
    # value never receives the position: changing pos only through q/k
    explicit = layer(x, x, x, identity=x, query_pos=pos, key_pos=pos)
    torch.testing.assert_close(out, explicit)


def test_wrapper_gradients_flow_to_all_inputs():
    torch.manual_seed(3)
    layer = MultiheadAttention(embed_dim=4, num_heads=2).double()
    q = _rand(1, 3, 4, seed=13).requires_grad_()
    kv = _rand(1, 5, 4, seed=14).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b), (q, kv))


def test_self_attention_gradcheck():
    torch.manual_seed(4)
    layer = SelfAttention(dim=4, num_heads=2).double()
    x = _rand(2, 3, 4, seed=15).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: layer(a), (x,))


def test_bad_inputs():
    with pytest.raises(ValueError, match="divisible"):
        SelfAttention(dim=10, num_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(embed_dim=10, num_heads=4)
    layer = MultiheadAttention(embed_dim=8, num_heads=2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="one flag per key"):
        layer(x, torch.randn(2, 7, 8), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(Nq, Nk\)"):
        layer(x, attn_mask=torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch-first"):
        layer(torch.randn(5, 8))
    sa = SelfAttention(dim=8, num_heads=2)
    with pytest.raises(ValueError, match="one flag per key"):
        sa(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="channels"):
        sa(torch.randn(2, 5, 6))
