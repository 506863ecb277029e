"""The attention call is a replaceable submodule, and heads follow ``num_heads`` (for parallelism)."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend

from mugen.models.common.attention import ScaledDotProductAttention
from mugen.models.dit.model import CrossAttention, SelfAttention


class RecordingAttention(nn.Module):
    """Plain attention that records the shapes it was given."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, q, k, v, attn_mask=None):
        self.shapes.append(tuple(q.shape))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return scores.softmax(-1) @ v


def test_sdpa_module_matches_functional_and_has_no_state():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 12) for _ in range(3))
    mask = torch.rand(2, 1, 1, 5) > 0.3
    mask[..., 0] = True
    op = ScaledDotProductAttention()
    assert not list(op.parameters()) and not op.state_dict()
    torch.testing.assert_close(op(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_swapping_attention_op_keeps_state_dict_and_output():
    torch.manual_seed(0)
    attn = SelfAttention(24, 2, qk_norm=True)
    keys = set(attn.state_dict())
    x = torch.randn(2, 7, 24)
    rope = torch.polar(torch.ones(2, 1, 7, 6), torch.randn(2, 1, 7, 6))
    expected = attn(x, rope)
    attn.attention_op = RecordingAttention()
    torch.testing.assert_close(attn(x, rope), expected, rtol=1e-5, atol=1e-6)
    assert attn.attention_op.shapes == [(2, 2, 7, 12)]
    assert set(attn.state_dict()) == keys

    cross = CrossAttention(24, 2)
    text = torch.randn(2, 4, 24)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])[:, None, None, :]
    expected = cross(x, text, mask)
    cross.attention_op = RecordingAttention()
    torch.testing.assert_close(cross(x, text, mask), expected, rtol=1e-5, atol=1e-6)


def test_heads_follow_num_heads_not_input_width():
    """Tensor parallel shards qkv/proj by heads and sets num_heads to the local count from outside."""
    torch.manual_seed(0)
    dim, heads, head_dim = 24, 4, 6
    full = SelfAttention(dim, heads, qk_norm=True)
    x = torch.randn(1, 5, dim)
    rope = torch.polar(torch.ones(1, 1, 5, 3), torch.randn(1, 1, 5, 3))
    # Keep the first 2 heads only: qkv rows of those heads, proj columns of those heads.
    local = SelfAttention(dim, heads, qk_norm=True)
    local.load_state_dict(full.state_dict())
    local.num_heads = 2
    rows = torch.cat([torch.arange(part * dim, part * dim + 2 * head_dim) for part in range(3)])
    local.qkv = nn.Linear(dim, 3 * 2 * head_dim)
    local.qkv.weight.data, local.qkv.bias.data = full.qkv.weight[rows].clone(), full.qkv.bias[rows].clone()
    local.proj = nn.Linear(2 * head_dim, dim, bias=False)
    local.proj.weight.data = full.proj.weight[:, : 2 * head_dim].clone()
    out = local(x, rope)  # (1, 5, dim): partial sum over the kept heads
    # The same partial sum from the full module: zero the other heads' contribution to proj.
    full.proj.weight.data[:, 2 * head_dim :] = 0
    full.proj.bias.data.zero_()
    torch.testing.assert_close(out, full(x, rope), rtol=1e-5, atol=1e-6)


def test_backend_choice():
    import pytest

    from mugen.errors import MugenError
    from mugen.models.common import attention

    cpu = torch.device("cpu")
    assert attention.backend_priority("auto", cpu) is None  # CPU: torch decides
    assert attention.backend_priority("cudnn", cpu) is None
    cuda = torch.device("cuda", 0)  # named backends need no device query: first in the list, then the others
    order = attention.backend_priority("flash", cuda)
    assert order[0] == SDPBackend.FLASH_ATTENTION and len(order) == 4 and SDPBackend.CUDNN_ATTENTION in order
    assert attention.backend_priority("default", cuda) is None
    with pytest.raises(MugenError, match="unknown"):
        attention.set_sdpa_backend("fastest")
    with pytest.raises(MugenError, match="unknown"):
        ScaledDotProductAttention(backend="cudnnn")
    previous = attention.get_sdpa_backend()
    try:
        attention.set_sdpa_backend("math")
        q, k, v = (torch.randn(1, 2, 3, 6) for _ in range(3))
        torch.testing.assert_close(ScaledDotProductAttention()(q, k, v), F.scaled_dot_product_attention(q, k, v))
    finally:
        attention.set_sdpa_backend(previous)
