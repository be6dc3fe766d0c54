"""Tests for detr_edu.transformer: against torch.nn's Transformer layers with copied weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_edu.transformer import (
    FFN,
    MLP,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

C, NH, FF = 16, 4, 32


def test_ffn_matches_formula():
    torch.manual_seed(0)
    ffn = FFN(embed_dim=C, feedforward_dim=FF)
    x, identity = torch.randn(2, 3, C), torch.randn(2, 3, C)
    manual = ffn.fc2(torch.relu(ffn.fc1(x)))
    torch.testing.assert_close(ffn(x), x + manual)
    torch.testing.assert_close(ffn(x, identity), identity + manual)
    gelu = FFN(embed_dim=C, feedforward_dim=FF, activation="gelu")
    torch.testing.assert_close(gelu(x), x + gelu.fc2(nn.functional.gelu(gelu.fc1(x))))
    with pytest.raises(ValueError, match="activation"):
        FFN(activation="tanh")


def test_mlp_matches_formula():
    torch.manual_seed(0)
    mlp = MLP(input_dim=5, hidden_dim=7, output_dim=4, num_layers=3)
    x = torch.randn(2, 5)
    a, b, c = mlp.layers
    torch.testing.assert_close(mlp(x), c(torch.relu(b(torch.relu(a(x))))))
    assert len(MLP(input_dim=5, hidden_dim=7, output_dim=4, num_layers=1).layers) == 1
    with pytest.raises(ValueError, match="num_layers"):
        MLP(input_dim=5, hidden_dim=7, output_dim=4, num_layers=0)


def copy_into_torch_encoder(ours: TransformerEncoderLayer) -> nn.TransformerEncoderLayer:
    ref = nn.TransformerEncoderLayer(C, NH, FF, dropout=0.0, batch_first=True, norm_first=False)
    ref.self_attn.load_state_dict(ours.self_attn.attn.state_dict())
    ref.linear1.load_state_dict(ours.ffn.fc1.state_dict())
    ref.linear2.load_state_dict(ours.ffn.fc2.state_dict())
    ref.norm1.load_state_dict(ours.norm1.state_dict())
    ref.norm2.load_state_dict(ours.norm2.state_dict())
    return ref.eval()


def test_encoder_layer_equals_torch_post_norm_layer():
    torch.manual_seed(0)
    ours = TransformerEncoderLayer(embed_dim=C, num_heads=NH, feedforward_dim=FF, dropout=0.0).eval()
    ref = copy_into_torch_encoder(ours)
    src = torch.randn(2, 7, C)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        torch.testing.assert_close(ours(src, key_padding_mask=pad), ref(src, src_key_padding_mask=pad))


def test_encoder_layer_with_positions_by_hand():
    torch.manual_seed(0)
    ours = TransformerEncoderLayer(embed_dim=C, num_heads=NH, feedforward_dim=FF, dropout=0.0).eval()
    src, pos = torch.randn(2, 7, C), torch.randn(2, 7, C)
    mha = ours.self_attn.attn
    with torch.no_grad():
        attn, _ = mha(src + pos, src + pos, src)  # positions on query and key, never on value
        x = ours.norm1(src + attn)
        expected = ours.norm2(x + ours.ffn.fc2(torch.relu(ours.ffn.fc1(x))))
        torch.testing.assert_close(ours(src, pos=pos), expected)


def test_decoder_layer_equals_torch_post_norm_layer():
    torch.manual_seed(0)
    ours = TransformerDecoderLayer(embed_dim=C, num_heads=NH, feedforward_dim=FF, dropout=0.0).eval()
    ref = nn.TransformerDecoderLayer(C, NH, FF, dropout=0.0, batch_first=True, norm_first=False)
    ref.self_attn.load_state_dict(ours.self_attn.attn.state_dict())
    ref.multihead_attn.load_state_dict(ours.cross_attn.attn.state_dict())
    ref.linear1.load_state_dict(ours.ffn.fc1.state_dict())
    ref.linear2.load_state_dict(ours.ffn.fc2.state_dict())
    for i in (1, 2, 3):
        getattr(ref, f"norm{i}").load_state_dict(getattr(ours, f"norm{i}").state_dict())
    ref.eval()
    query, memory = torch.randn(2, 5, C), torch.randn(2, 9, C)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    blocked = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    with torch.no_grad():
        out = ours(query, memory, memory_key_padding_mask=pad, self_attn_mask=blocked)
        expected = ref(query, memory, tgt_mask=blocked, memory_key_padding_mask=pad)
    torch.testing.assert_close(out, expected)


def test_padding_is_invisible_to_the_encoder():
    torch.manual_seed(0)
    enc = TransformerEncoder(num_layers=2, embed_dim=C, num_heads=NH, feedforward_dim=FF, dropout=0.0).eval()
    src, pos = torch.randn(1, 5, C), torch.randn(1, 5, C)
    padded = torch.cat([src, torch.randn(1, 3, C) * 10], 1)  # garbage tokens appended
    padded_pos = torch.cat([pos, torch.randn(1, 3, C)], 1)
    mask = torch.tensor([[False] * 5 + [True] * 3])
    with torch.no_grad():
        alone = enc(src, pos=pos)
        out = enc(padded, pos=padded_pos, key_padding_mask=mask)
    torch.testing.assert_close(out[:, :5], alone, atol=1e-5, rtol=1e-5)


def test_stacks_return_every_layer():
    torch.manual_seed(0)
    enc = TransformerEncoder(num_layers=3, embed_dim=C, num_heads=NH, feedforward_dim=FF).eval()
    dec = TransformerDecoder(num_layers=2, embed_dim=C, num_heads=NH, feedforward_dim=FF).eval()
    src, query = torch.randn(2, 7, C), torch.randn(2, 4, C)
    with torch.no_grad():
        memory = enc(src)
        all_layers = enc(src, return_all_layers=True)
        states = dec(query, memory)
        # The last state is the final LayerNorm of the last layer's output, computed by hand.
        x = query
        for layer in dec.layers:
            x = layer(x, memory)
        torch.testing.assert_close(states[-1], dec.norm(x))
    assert memory.shape == (2, 7, C) and all_layers.shape == (3, 2, 7, C)
    torch.testing.assert_close(all_layers[-1], memory)
    assert states.shape == (2, 2, 4, C)
    assert isinstance(
        TransformerDecoder(num_layers=1, embed_dim=C, num_heads=NH, post_norm=False).norm, nn.Identity
    )


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    enc = TransformerEncoder(num_layers=2, embed_dim=C, num_heads=NH, feedforward_dim=FF)
    dec = TransformerDecoder(num_layers=2, embed_dim=C, num_heads=NH, feedforward_dim=FF)
    src, pos = torch.randn(2, 7, C), torch.randn(2, 7, C)
    query_pos = torch.randn(2, 4, C)
    memory = enc(src, pos=pos)
    states = dec(torch.randn(2, 4, C), memory, query_pos=query_pos, memory_pos=pos)
    states.pow(2).sum().backward()
    for module in (enc, dec):
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_queries_make_the_first_self_attention_weights_useless():
    # DETR starts the decoder from zero content: every value of layer 0's self-attention is the same
    # bias vector, so the attention weights do not matter and q/k projections get exactly zero gradient.
    torch.manual_seed(0)
    dec = TransformerDecoder(num_layers=1, embed_dim=C, num_heads=NH, feedforward_dim=FF, dropout=0.0)
    states = dec(torch.zeros(2, 4, C), torch.randn(2, 7, C), query_pos=torch.randn(2, 4, C))
    states.pow(2).sum().backward()
    grad = dec.layers[0].self_attn.attn.in_proj_weight.grad  # rows: q, k, v projections
    assert grad[: 2 * C].abs().max() == 0


def test_bad_inputs():
    layer = TransformerEncoderLayer(embed_dim=C, num_heads=NH)
    with pytest.raises(ValueError, match="src must be"):
        layer(torch.randn(2, 7, C + 1))
    dec_layer = TransformerDecoderLayer(embed_dim=C, num_heads=NH)
    with pytest.raises(ValueError, match="memory must be"):
        dec_layer(torch.randn(2, 3, C), torch.randn(2, 7))
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(torch.randn(2, 7, C), key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_layers"):
        TransformerEncoder(num_layers=0)
    with pytest.raises(ValueError, match="num_layers"):
        TransformerDecoder(num_layers=0)
