"""The dense DETR transformer, assembled from chapter 01's attention (chapter 03).

Pieces, smallest first:

* :class:`FFN` -- Linear -> activation -> dropout -> Linear -> dropout, *with its own identity
  connection* (``identity + ffn(x)``), like the attention wrapper: every sub-layer of a block then has
  the same shape ``x -> x + f(x)`` followed by a norm;
* :class:`MLP` -- a plain multi-layer perceptron without identity or dropout (box heads, query
  position from boxes);
* :class:`TransformerEncoderLayer` -- operation order ``("self_attn", "norm", "ffn", "norm")``;
* :class:`TransformerDecoderLayer` -- ``("self_attn", "norm", "cross_attn", "norm", "ffn", "norm")``;
* :class:`TransformerEncoder` / :class:`TransformerDecoder` -- stacks of independently initialised
  layers that can return every layer's output (the decoder always does: DETR's auxiliary losses need
  one prediction per layer).

These are DETR's "post-norm" blocks (Carion et al. 2020, Sec. 3.2 and Appendix A.3; Vaswani et al.
2017): LayerNorm *after* each residual sum. The source note describes a block by an
``operation_order`` tuple interpreted by a generic block; here each order is an explicit class, so the
forward pass reads top to bottom (chapter 03 shows the generic interpreter as an aside).

Positions (``pos``, ``query_pos``) are added to queries and keys at every attention, never to values
(see :class:`detr_edu.attention.MultiheadAttention`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr_edu.attention import MultiheadAttention

__all__ = [
    "FFN",
    "MLP",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def _check_tokens(x: Tensor, name: str, embed_dim: int) -> None:
    if x.dim() != 3 or x.shape[-1] != embed_dim:
        raise ValueError(f"{name} must be (B, N, C={embed_dim}), got shape {tuple(x.shape)}")


class FFN(nn.Module):
    """Position-wise feed-forward network with an identity connection.

    ``identity + dropout(fc2(dropout(act(fc1(x)))))`` -- the note's ``FFN`` with ``num_fcs=2`` (the
    only value DETR-family models use). Dropout sits after the activation and after the second linear,
    as in the note.

    Args:
        embed_dim: C, input and output channels.
        feedforward_dim: hidden width (DETR 2048, Deformable DETR / DINO 1024 or 2048).
        dropout: on the hidden activations and on the output.
        activation: ``"relu"`` (DETR family) or ``"gelu"``.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        feedforward_dim: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.fc1 = nn.Linear(embed_dim, feedforward_dim)
        self.act = _ACTIVATIONS[activation]()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(feedforward_dim, embed_dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, identity: Tensor | None = None) -> Tensor:
        """x (..., C) -> identity + ffn(x), (..., C); ``identity`` defaults to ``x``."""
        identity = x if identity is None else identity
        out = self.drop1(self.act(self.fc1(x)))  # (..., feedforward_dim)
        out = self.drop2(self.fc2(out))  # (..., C)
        return identity + out  # (..., C)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last), no dropout.

    DETR's box head is ``MLP(C, C, 4, 3)``; DAB/DINO's query position head is ``MLP(2C, C, C, 2)``.

    Args:
        input_dim, hidden_dim, output_dim: widths.
        num_layers: number of linear layers, >= 1.
    """

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)  # (..., width_i)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class TransformerEncoderLayer(nn.Module):
    """DETR encoder layer: ``("self_attn", "norm", "ffn", "norm")``, post-norm.

    Args:
        embed_dim: C.
        num_heads: nh.
        feedforward_dim: FFN hidden width.
        dropout: on attention weights, attention output and FFN.
    """

    def __init__(
        self, *, embed_dim: int = 256, num_heads: int = 8, feedforward_dim: int = 1024, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.self_attn = MultiheadAttention(
            embed_dim=embed_dim, num_heads=num_heads, attn_drop=dropout, proj_drop=dropout
        )
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim=embed_dim, feedforward_dim=feedforward_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(
        self, src: Tensor, *, pos: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """src (B, N, C), pos (B, N, C), key_padding_mask (B, N) True = pad -> (B, N, C)."""
        _check_tokens(src, "src", self.embed_dim)
        src = self.self_attn(src, query_pos=pos, key_pos=pos, key_padding_mask=key_padding_mask)  # (B, N, C)
        src = self.norm1(src)  # (B, N, C)
        src = self.norm2(self.ffn(src))  # (B, N, C)
        return src


class TransformerDecoderLayer(nn.Module):
    """DETR decoder layer: ``("self_attn", "norm", "cross_attn", "norm", "ffn", "norm")``, post-norm.

    Self-attention lets the queries see each other (so they can avoid predicting the same object twice);
    cross-attention reads the encoder memory. ``query_pos`` (DETR: the learned object queries) is added
    to the queries of both attentions and to the keys of self-attention; ``memory_pos`` to the memory
    keys.

    Args: as :class:`TransformerEncoderLayer`.
    """

    def __init__(
        self, *, embed_dim: int = 256, num_heads: int = 8, feedforward_dim: int = 1024, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.self_attn = MultiheadAttention(
            embed_dim=embed_dim, num_heads=num_heads, attn_drop=dropout, proj_drop=dropout
        )
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiheadAttention(
            embed_dim=embed_dim, num_heads=num_heads, attn_drop=dropout, proj_drop=dropout
        )
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim=embed_dim, feedforward_dim=feedforward_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(embed_dim)

    def forward(
        self,
        query: Tensor,
        memory: Tensor,
        *,
        query_pos: Tensor | None = None,
        memory_pos: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """One decoder step.

        Args:
            query: (B, Nq, C) content of the queries.
            memory: (B, Nk, C) encoder output.
            query_pos: (B, Nq, C).
            memory_pos: (B, Nk, C).
            memory_key_padding_mask: (B, Nk) bool, True = padded pixel.
            self_attn_mask: (Nq, Nq) bool, True = blocked (DINO's denoising groups).

        Returns:
            (B, Nq, C).
        """
        _check_tokens(query, "query", self.embed_dim)
        _check_tokens(memory, "memory", self.embed_dim)
        query = self.self_attn(
            query, query_pos=query_pos, key_pos=query_pos, attn_mask=self_attn_mask
        )  # (B, Nq, C)
        query = self.norm1(query)  # (B, Nq, C)
        query = self.cross_attn(
            query,
            key=memory,
            value=memory,
            query_pos=query_pos,
            key_pos=memory_pos,
            key_padding_mask=memory_key_padding_mask,
        )  # (B, Nq, C)
        query = self.norm2(query)  # (B, Nq, C)
        query = self.norm3(self.ffn(query))  # (B, Nq, C)
        return query


class TransformerEncoder(nn.Module):
    """``num_layers`` independently initialised :class:`TransformerEncoderLayer` s.

    Args:
        num_layers: depth (DETR: 6).
        embed_dim, num_heads, feedforward_dim, dropout: per layer.
    """

    def __init__(
        self,
        *,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                embed_dim=embed_dim, num_heads=num_heads, feedforward_dim=feedforward_dim, dropout=dropout
            )
            for _ in range(num_layers)
        )

    def forward(
        self,
        src: Tensor,
        *,
        pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        return_all_layers: bool = False,
    ) -> Tensor:
        """src (B, N, C) -> memory (B, N, C), or every layer's output (num_layers, B, N, C)."""
        outputs = []
        for layer in self.layers:
            src = layer(src, pos=pos, key_padding_mask=key_padding_mask)  # (B, N, C)
            outputs.append(src)
        return torch.stack(outputs) if return_all_layers else src


class TransformerDecoder(nn.Module):
    """``num_layers`` :class:`TransformerDecoderLayer` s returning every layer's output.

    DETR normalises each returned output with one shared final LayerNorm (``post_norm``), because the
    class and box heads are applied to every layer's output for the auxiliary losses; the un-normalised
    output is what flows into the next layer.

    Args:
        num_layers: depth (DETR: 6).
        embed_dim, num_heads, feedforward_dim, dropout: per layer.
        post_norm: apply the shared LayerNorm to the returned outputs (DETR: True).
    """

    def __init__(
        self,
        *,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
        post_norm: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(
                embed_dim=embed_dim, num_heads=num_heads, feedforward_dim=feedforward_dim, dropout=dropout
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim) if post_norm else nn.Identity()

    def forward(
        self,
        query: Tensor,
        memory: Tensor,
        *,
        query_pos: Tensor | None = None,
        memory_pos: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Run every layer; args as :meth:`TransformerDecoderLayer.forward`.

        Returns:
            inter_states (num_layers, B, Nq, C): each layer's (normalised) output, last one last.
        """
        outputs = []
        for layer in self.layers:
            query = layer(
                query,
                memory,
                query_pos=query_pos,
                memory_pos=memory_pos,
                memory_key_padding_mask=memory_key_padding_mask,
                self_attn_mask=self_attn_mask,
            )  # (B, Nq, C)
            outputs.append(self.norm(query))
        return torch.stack(outputs)  # (num_layers, B, Nq, C)
