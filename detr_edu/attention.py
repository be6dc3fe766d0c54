"""Dense attention, three ways: by hand, ViT's fused-qkv self-attention, and the detection wrapper.

Chapter 01 builds these and checks them against ``torch.nn.functional.scaled_dot_product_attention``
and ``torch.nn.MultiheadAttention``.

Mask convention (the one ``nn.MultiheadAttention`` and DETR-family code use): a boolean mask is
**True where attention is blocked**. ``attn_mask`` is (Nq, Nk) (or (B*nh, Nq, Nk)); ``key_padding_mask``
is (B, Nk) and marks padded *keys*. Careful: ``F.scaled_dot_product_attention`` uses the opposite
boolean convention (True = may attend).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "scaled_dot_product_attention",
    "expand_key_padding_mask",
    "SelfAttention",
    "MultiheadAttention",
]


def _check_heads(embed_dim: int, num_heads: int) -> None:
    if num_heads <= 0 or embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")


def expand_key_padding_mask(key_padding_mask: Tensor, num_queries: int) -> Tensor:
    """(B, Nk) key padding mask -> the equivalent (B, Nq, Nk) attention mask (True = blocked).

    Every query of image b is blocked from the padded keys of image b: the same row repeated Nq
    times. This is why ``key_padding_mask`` needs no query dimension.
    """
    if key_padding_mask.dim() != 2:
        raise ValueError(f"key_padding_mask must be (B, Nk), got shape {tuple(key_padding_mask.shape)}")
    B, Nk = key_padding_mask.shape
    return key_padding_mask[:, None, :].expand(B, num_queries, Nk)  # (B, Nq, Nk)


def _combine_masks(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, B: int, Nq: int, Nk: int
) -> Tensor | None:
    """Validate both masks and merge them into one boolean/additive mask broadcastable to (B, ..., Nq, Nk)."""
    mask = None
    if attn_mask is not None:
        if attn_mask.shape[-2:] != (Nq, Nk):
            raise ValueError(
                f"attn_mask must end in (Nq, Nk) = ({Nq}, {Nk}), got shape {tuple(attn_mask.shape)}"
            )
        mask = attn_mask
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, Nk):
            raise ValueError(
                f"key_padding_mask must be (B, Nk) = ({B}, {Nk}) -- one flag per key, not per query -- "
                f"got shape {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be boolean (True = padded key)")
        pad = key_padding_mask[:, None, :]  # (B, 1, Nk): broadcast over queries
        if mask is None:
            mask = pad
        elif mask.dtype == torch.bool:
            mask = mask | pad
        else:  # additive float mask
            mask = mask.masked_fill(pad, float("-inf"))
    return mask


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + mask) v, written out.

    Args:
        q: (..., Nq, d) queries.
        k: (..., Nk, d) keys.
        v: (..., Nk, dv) values.
        attn_mask: boolean (True = blocked) or additive float mask broadcastable to (..., Nq, Nk).
        scale: defaults to 1 / sqrt(d) (Vaswani et al., 2017).
        dropout_p: dropout on the attention weights (training only: pass 0.0 in eval).

    Returns:
        (out (..., Nq, dv), weights (..., Nq, Nk)).
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k need the same last dim, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v need the same number of keys, got {k.shape[-2]} and {v.shape[-2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., Nq, Nk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            if attn_mask.all(-1).any():
                raise ValueError("attn_mask blocks every key for some query: its softmax would be NaN")
            scores = scores.masked_fill(attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = scores.softmax(dim=-1)  # (..., Nq, Nk)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights  # (..., Nq, dv), (..., Nq, Nk)


class SelfAttention(nn.Module):
    """ViT/timm-style multi-head self-attention with one fused qkv projection.

    One ``Linear(C, 3C)`` makes q, k and v together -- possible only because all three come from the
    same tokens. Cross-attention (queries from one sequence, keys/values from another) needs separate
    projections, which is what :class:`MultiheadAttention` (via ``nn.MultiheadAttention``) has.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: Tensor,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, N, C) -> (B, N, C); with ``return_weights`` also the weights (B, nh, N, N)."""
        if x.dim() != 3:
            raise ValueError(f"x must be (B, N, C), got shape {tuple(x.shape)}")
        B, N, C = x.shape
        if C != self.num_heads * self.head_dim:
            raise ValueError(
                f"x has {C} channels but the layer was built for {self.num_heads * self.head_dim}"
            )
        mask = _combine_masks(attn_mask, key_padding_mask, B, N, N)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, N, N): broadcast over heads
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, N, hd)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, N, N)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = scores.softmax(dim=-1)  # (B, nh, N, N)
        out = self.attn_drop(weights) @ v  # (B, nh, N, hd)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        out = self.proj_drop(self.proj(out))  # (B, N, C)
        return (out, weights) if return_weights else out


class MultiheadAttention(nn.Module):
    """The detection wrapper around ``nn.MultiheadAttention`` (as detrex builds it), batch-first.

    Adds what DETR-family layers need around plain attention:

    - defaults: ``key = query``, ``value = key``, ``identity = query``;
    - positional embeddings added to query (``query_pos``) and key (``key_pos``), never to value: the
      position decides *where* to look, the content is what is fetched. If ``key_pos`` is missing and
      ``query_pos`` has the key's shape (self-attention), ``key_pos = query_pos``;
    - an identity (residual) connection with dropout on the projected output:
      ``identity + proj_drop(attn(...))``. Dropout on the attention weights is ``attn_drop``.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        _check_heads(embed_dim, num_heads)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=attn_drop, batch_first=True)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        identity: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_pos: Tensor | None = None,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``query`` (B, Nq, C) to ``key``/``value`` (B, Nk, C).

        Args:
            attn_mask: (Nq, Nk) or (B*nh, Nq, Nk), boolean True = blocked (or additive float).
            key_padding_mask: (B, Nk) boolean, True = padded key. (The source note writes
                (bs, num_query); it is one flag per *key*.)
            return_weights: also return the per-head weights (B, nh, Nq, Nk).

        Returns:
            (B, Nq, C) = identity + dropout(attention output), and the weights if asked.
        """
        key = query if key is None else key
        value = key if value is None else value
        identity = query if identity is None else identity
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError("query, key and value must be batch-first (B, N, C) tensors")
        B, Nq, C = query.shape
        Nk = key.shape[1]
        if C != self.embed_dim or key.shape[-1] != C or value.shape[-1] != C:
            raise ValueError(f"query/key/value must have {self.embed_dim} channels")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != B:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must share (B, Nk)")
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos  # self-attention: keys are the queries, so are their positions
        q = query if query_pos is None else query + query_pos  # (B, Nq, C)
        k = key if key_pos is None else key + key_pos  # (B, Nk, C)
        if attn_mask is not None and attn_mask.shape[-2:] != (Nq, Nk):
            raise ValueError(f"attn_mask must end in (Nq, Nk) = ({Nq}, {Nk}), got {tuple(attn_mask.shape)}")
        if attn_mask is not None and attn_mask.dim() == 3 and attn_mask.shape[0] != B * self.num_heads:
            raise ValueError(f"a 3-d attn_mask must be (B*nh, Nq, Nk) = ({B * self.num_heads}, {Nq}, {Nk})")
        if key_padding_mask is not None and key_padding_mask.shape != (B, Nk):
            raise ValueError(
                f"key_padding_mask must be (B, Nk) = ({B}, {Nk}) -- one flag per key, not per query -- "
                f"got shape {tuple(key_padding_mask.shape)}"
            )
        out, weights = self.attn(
            q,
            k,
            value,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=return_weights,
            average_attn_weights=False,
        )  # (B, Nq, C), (B, nh, Nq, Nk) or None
        out = identity + self.proj_drop(out)  # (B, Nq, C)
        return (out, weights) if return_weights else out


def attention_flops(num_queries: int, num_keys: int, embed_dim: int) -> int:
    """Multiply-adds of the two matrix products of dense attention: 2 * Nq * Nk * C."""
    return 2 * num_queries * num_keys * embed_dim


def attention_matrix_bytes(
    batch: int, num_heads: int, num_queries: int, num_keys: int, itemsize: int = 4
) -> int:
    """Bytes of the (B, nh, Nq, Nk) weight matrix dense attention materialises."""
    return batch * num_heads * num_queries * num_keys * itemsize


__all__ += ["attention_flops", "attention_matrix_bytes"]
