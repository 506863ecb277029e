"""The attention call of mugen's transformers, as a replaceable module.

``SelfAttention.attention_op`` and ``CrossAttention.attention_op`` hold a parameter-free
:class:`ScaledDotProductAttention`. Parallelism applied from outside the model swaps it (e.g. for
ring attention over a context-parallel group) without touching the model code or its state dict.
The contract: ``forward(q, k, v, attn_mask=None) -> out``, all ``(B, heads, tokens, head_dim)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ScaledDotProductAttention(nn.Module):
    """``softmax(q k^T / sqrt(head_dim) + mask) v`` through torch SDPA (no parameters)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        # q (B, heads, N, hd), k/v (B, heads, L, hd), attn_mask broadcastable to (B, heads, N, L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, hd)
