"""The FlashAttention-4 custom ops: layout, autograd and compile plumbing, with the kernels replaced by
a float64 stand-in (the real kernels need a Hopper GPU; benchmarks/results/ holds their GPU runs)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from mugen.errors import MugenError
from mugen.models.common import flash_attn4
from mugen.models.common.attention import ScaledDotProductAttention, backend_priority


def _stand_in_interface() -> types.ModuleType:
    """flash_attn.cute.interface's two entry points, computed in float64 on (B, N, H, D) tensors."""
    calls = {"fwd": 0, "bwd": 0}

    def scores(q, k, scale, seqused_k):
        s = torch.einsum("bnhd,blhd->bhnl", q.double(), k.double()) * scale  # (B, H, N, L)
        if seqused_k is not None:  # sample b reads its first seqused_k[b] keys
            assert seqused_k.dtype == torch.int32
            unused = torch.arange(k.shape[1])[None, :] >= seqused_k[:, None].long()  # (B, L)
            s = s.masked_fill(unused[:, None, None, :], float("-inf"))
        return s

    def _flash_attn_fwd(q, k, v, seqused_k=None, softmax_scale=None, causal=False, return_lse=False):
        assert not causal and q.stride(-1) == 1
        calls["fwd"] += 1
        s = scores(q, k, softmax_scale, seqused_k)
        lse = torch.logsumexp(s, dim=-1)  # (B, H, N)
        out = torch.einsum("bhnl,blhd->bnhd", torch.softmax(s, dim=-1), v.double())
        return out.to(q.dtype).contiguous(), lse.float(), None, None, None

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale, causal, seqused_k=None, dk=None, dv=None):
        calls["bwd"] += 1
        p = torch.exp(scores(q, k, softmax_scale, seqused_k) - lse.double()[..., None])  # (B, H, N, L) from the saved lse
        dout = dout.double()
        dv_values = torch.einsum("bhnl,bnhd->blhd", p, dout)
        dp = torch.einsum("bnhd,blhd->bhnl", dout, v.double())
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * softmax_scale
        dq = torch.einsum("bhnl,blhd->bnhd", ds, k.double())
        dk_values = torch.einsum("bhnl,bnhd->blhd", ds, q.double())
        # like the kernel: dk/dv allocated with torch.empty_like unless given, and with seqused_k only the used
        # keys' rows written (the rest keep what was there: NaN here, whatever the allocator held on a GPU)
        dk = torch.full_like(k, float("nan")) if dk is None else dk
        dv = torch.full_like(v, float("nan")) if dv is None else dv
        used = torch.full((k.shape[0],), k.shape[1]) if seqused_k is None else seqused_k.long()
        for b, count in enumerate(used.tolist()):
            dk[b, :count], dv[b, :count] = dk_values[b, :count], dv_values[b, :count]
        return dq.to(q.dtype), dk, dv

    module = types.ModuleType("stand_in_interface")
    module._flash_attn_fwd, module._flash_attn_bwd, module.calls = _flash_attn_fwd, _flash_attn_bwd, calls
    return module


@pytest.fixture
def stand_in(monkeypatch):
    interface = _stand_in_interface()
    monkeypatch.setattr(flash_attn4, "_interface", lambda: interface)
    return interface


def _qkv(generator, batch=2, tokens=13, keys=11, heads=3, head_dim=24):
    q = torch.randn(batch, heads, tokens, head_dim, generator=generator)
    k = torch.randn(batch, heads, keys, head_dim, generator=generator)
    v = torch.randn(batch, heads, keys, head_dim, generator=generator)
    return [t.requires_grad_() for t in (q, k, v)]


def test_output_and_gradients_equal_sdpa_in_the_heads_first_layout(stand_in):
    generator = torch.Generator().manual_seed(0)
    q, k, v = _qkv(generator)
    grad = torch.randn(2, 3, 13, 24, generator=generator)
    expected = F.scaled_dot_product_attention(q, k, v)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    # the model's call: heads-first tensors viewed as FlashAttention's (B, tokens, heads, hd)
    out = flash_attn4.fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert stand_in.calls == {"fwd": 1, "bwd": 1}
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_compiled_function_keeps_the_kernel_as_one_op(stand_in):
    generator = torch.Generator().manual_seed(1)
    q, k, v = _qkv(generator, tokens=9, keys=9)

    mask = torch.arange(9)[None, :] < torch.tensor([[9], [5]])  # (B, L) padded keys of the second sample

    def block(q, k, v):
        full = flash_attn4.fa4_attention(q, k, v, softmax_scale=0.3)
        padded = flash_attn4.fa4_attention(q, k, v, key_padding_mask=mask)
        return (full + padded).sum(dim=2) * 2.0

    args = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    out.square().sum().backward()
    eager_args = [t.detach().clone().requires_grad_() for t in args]
    eager = block(*eager_args)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip(args, eager_args):
        torch.testing.assert_close(a.grad, b.grad)


def test_fake_implementations_match_the_real_outputs(stand_in):
    q, k, v = (torch.randn(1, 5, 2, 16, dtype=torch.float32) for _ in range(3))
    used = torch.tensor([3], dtype=torch.int32)
    torch.library.opcheck(flash_attn4._forward, (q, k, v, 0.25, used), test_utils=("test_schema", "test_faketensor"))
    out, lse = flash_attn4._forward(q, k, v, 0.25, None)
    torch.library.opcheck(
        flash_attn4._backward, (q, k, v, out, torch.randn_like(out), lse, 0.25, None), test_utils=("test_schema", "test_faketensor")
    )


def test_shape_mismatch_is_a_clear_error(stand_in):
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(MugenError, match="fa4_attention"):
        flash_attn4.fa4_attention(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))


def test_missing_package_names_it_and_the_way_out(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # an import of it fails
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    flash_attn4._interface.cache_clear()
    try:
        with pytest.raises(MugenError, match="pip install flash-attn-4.*MUGEN_SDPA_BACKEND=auto"):
            flash_attn4._interface()
        assert not flash_attn4.fa4_available()
    finally:
        flash_attn4._interface.cache_clear()


@pytest.mark.parametrize("pattern", ["prefix", "scattered"])
def test_key_padding_mask_equals_sdpa_with_the_mask(stand_in, pattern):
    """Padded text keys: kept keys are gathered to the front and the kernel reads only those (any mask pattern)."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = _qkv(generator, batch=3, tokens=7, keys=10)
    if pattern == "prefix":
        mask = torch.arange(10)[None, :] < torch.tensor([[10], [4], [1]])  # (B, L): right-padded text
    else:
        mask = torch.rand(3, 10, generator=generator) > 0.5
        mask[:, 3] = True
    grad = torch.randn(3, 3, 7, 24, generator=generator)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    key_mask = flash_attn4.key_padding_mask_of(mask[:, None, None, :], 3, 10)
    assert torch.equal(key_mask, mask)
    out = flash_attn4.fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_padding_mask=key_mask).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.all(grads[1].transpose(1, 2)[~mask] == 0) and torch.all(grads[2].transpose(1, 2)[~mask] == 0)


def test_only_key_padding_masks_are_taken():
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    assert flash_attn4.key_padding_mask_of(mask, 2, 5) is not None
    assert flash_attn4.key_padding_mask_of(mask.float(), 2, 5) is None  # additive masks: SDPA
    assert flash_attn4.key_padding_mask_of(torch.ones(2, 1, 3, 5, dtype=torch.bool), 2, 5) is None  # per-query masks: SDPA
    with pytest.raises(MugenError, match="key_padding_mask"):
        flash_attn4.fa4_attention(torch.randn(2, 3, 1, 8), torch.randn(2, 5, 1, 8), torch.randn(2, 5, 1, 8), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))


def test_calls_fa4_does_not_take_go_through_sdpa(stand_in):
    """On the CPU, in fp32 or with a mask, the 'fa4' backend is SDPA: same numbers, no kernel call."""
    generator = torch.Generator().manual_seed(2)
    q, k, v = _qkv(generator)
    mask = torch.rand(2, 1, 1, 11, generator=generator) > 0.3
    mask[..., 0] = True
    attention = ScaledDotProductAttention(backend="fa4")
    for attn_mask in (None, mask):
        torch.testing.assert_close(attention(q, k, v, attn_mask), F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))
    assert stand_in.calls == {"fwd": 0, "bwd": 0}
    assert not flash_attn4.fa4_applies(q.to(torch.bfloat16), None)  # CPU
    assert backend_priority("fa4", torch.device("cpu")) is None


def test_autocast_inputs_are_cast_like_sdpa_casts_them():
    """Under autocast the torch path hands float32 q/k to attention; the fa4 route must see bf16 (else it falls back)."""
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    assert all(t.dtype == torch.float32 for t in flash_attn4.autocast_inputs(q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = flash_attn4.autocast_inputs(q, k, v)
        assert all(t.dtype == torch.bfloat16 for t in cast)
        assert F.scaled_dot_product_attention(q, k, v).dtype == cast[0].dtype  # what SDPA itself does
    torch.testing.assert_close(cast[0].float(), q, rtol=1e-2, atol=1e-2)


def _interface_with_hopper_backward(head_dim_multiple: int) -> types.ModuleType:
    """An interface whose Hopper backward class rounds head dims the way flash-attn-4's does: by 16 in
    4.0.0b12 (the kernel's dq accumulator layout then disagrees with the 32-rounded allocation), by 32 once fixed."""

    class Sm90Backward:
        def __init__(self, dtype, head_dim, head_dim_v=None, qhead_per_kvhead=1, *, SdP_swapAB=True, dKV_swapAB=False, **_):
            head_dim_v = head_dim if head_dim_v is None else head_dim_v
            self.dtype, self.SdP_swapAB, self.dKV_swapAB = dtype, SdP_swapAB, dKV_swapAB
            self.tile_hdim = -(-head_dim // head_dim_multiple) * head_dim_multiple
            self.tile_hdimv = -(-head_dim_v // head_dim_multiple) * head_dim_multiple
            self.check_hdim_oob, self.check_hdim_v_oob = head_dim != self.tile_hdim, head_dim_v != self.tile_hdimv
            self.shuffle_LSE = self.shuffle_dPsum = SdP_swapAB and self.tile_hdim <= 64

    def _flash_attn_bwd(*args, **kwargs):
        raise AssertionError("not called here")

    _flash_attn_bwd.compile_cache = {"kernel compiled before the fix": object()}
    module = types.ModuleType("interface_with_hopper_backward")
    module.FlashAttentionBackwardSm90, module._flash_attn_bwd = Sm90Backward, _flash_attn_bwd
    module.cutlass = types.SimpleNamespace(BFloat16="bf16")
    return module


def test_the_hopper_backward_tiles_the_head_dim_like_its_dq_accumulator_once_aligned(monkeypatch):
    monkeypatch.delenv(flash_attn4._PERSISTENT_CACHE_VARIABLE, raising=False)
    interface = _interface_with_hopper_backward(16)
    original = interface.FlashAttentionBackwardSm90
    assert original("bf16", 72).tile_hdim == 80  # the 4.0.0b12 layout: dq accumulator allocated 96 wide
    assert flash_attn4.align_hopper_backward_dq(interface)
    aligned = interface.FlashAttentionBackwardSm90
    assert issubclass(aligned, original) and interface._flash_attn_bwd.compile_cache == {}
    for head_dim, tile in ((64, 64), (72, 96), (80, 96), (96, 96), (104, 128), (128, 128)):
        kernel = aligned("bf16", head_dim, head_dim)
        assert (kernel.tile_hdim, kernel.tile_hdimv) == (tile, tile)
        assert kernel.check_hdim_oob == kernel.check_hdim_v_oob == (head_dim != tile)
        assert kernel.shuffle_LSE == (tile <= 64)
    assert aligned("bf16", 72, dKV_swapAB=True).tile_hdim == 80  # the swapped layout is left as it was
    assert flash_attn4.align_hopper_backward_dq(interface) and interface.FlashAttentionBackwardSm90 is aligned  # once


def test_a_fixed_library_is_left_alone_and_the_persistent_cache_keeps_the_padding(monkeypatch):
    monkeypatch.delenv(flash_attn4._PERSISTENT_CACHE_VARIABLE, raising=False)
    fixed = _interface_with_hopper_backward(32)
    original = fixed.FlashAttentionBackwardSm90
    assert flash_attn4.align_hopper_backward_dq(fixed) and fixed.FlashAttentionBackwardSm90 is original
    assert not flash_attn4.align_hopper_backward_dq(types.ModuleType("no_hopper_backward"))
    # flash-attn's on-disk kernel cache is keyed without this change: a kernel compiled without it could be loaded
    monkeypatch.setenv(flash_attn4._PERSISTENT_CACHE_VARIABLE, "1")
    assert flash_attn4.align_hopper_backward_dq(fixed)  # nothing to change in a fixed library, cache or not
    buggy = _interface_with_hopper_backward(16)
    original = buggy.FlashAttentionBackwardSm90
    assert not flash_attn4.align_hopper_backward_dq(buggy) and buggy.FlashAttentionBackwardSm90 is original


@pytest.mark.parametrize("aligned, kernel_head_dim", [(False, 96), (True, 72)])
def test_the_backward_pads_the_head_dim_only_while_the_dq_layout_is_unaligned(stand_in, monkeypatch, aligned, kernel_head_dim):
    monkeypatch.setattr(flash_attn4, "_BACKWARD_DQ_ALIGNED", aligned)
    assert flash_attn4.backward_head_dim(72) == kernel_head_dim
    seen = []
    kernel = stand_in._flash_attn_bwd

    def recording_bwd(q, *args, **kwargs):
        seen.append(q.shape[-1])
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(stand_in, "_flash_attn_bwd", recording_bwd)
    generator = torch.Generator().manual_seed(3)
    q, k, v = _qkv(generator, head_dim=72)  # heads-first (B, H, N, hd), handed over transposed as the model does
    grad = torch.randn(2, 3, 13, 72, generator=generator)
    out = flash_attn4.fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    expected = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad)
    assert seen == [kernel_head_dim]
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # padded text keys (seqused_k): the same head dim, and the padded keys' gradients zero
    mask = torch.arange(11)[None, :] < torch.tensor([[11], [5]])  # (B, L)
    out = flash_attn4.fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_padding_mask=mask)
    grads = torch.autograd.grad(out.transpose(1, 2), (q, k, v), grad)
    expected = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]), (q, k, v), grad)
    assert seen == [kernel_head_dim, kernel_head_dim]
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.all(grads[1].transpose(1, 2)[~mask] == 0) and torch.all(grads[2].transpose(1, 2)[~mask] == 0)
    # the op's outputs keep the strides its fake promises (those of torch.empty_like of each input)
    q_t, k_t, v_t = (t.detach().transpose(1, 2) for t in (q, k, v))
    out_t, lse = flash_attn4._forward(q_t, k_t, v_t, 72**-0.5, None)
    torch.library.opcheck(
        flash_attn4._backward, (q_t, k_t, v_t, out_t, torch.randn_like(out_t), lse, 72**-0.5, None),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_loading_the_library_aligns_its_backward_before_any_kernel_is_built(monkeypatch):
    monkeypatch.delenv(flash_attn4._PERSISTENT_CACHE_VARIABLE, raising=False)
    interface = _interface_with_hopper_backward(16)
    package = types.ModuleType("flash_attn.cute")
    package.interface = interface
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    monkeypatch.setattr(flash_attn4, "_BACKWARD_DQ_ALIGNED", False)
    flash_attn4._interface.cache_clear()
    try:
        assert flash_attn4._interface() is interface
        assert interface.FlashAttentionBackwardSm90("bf16", 72).tile_hdim == 96
        assert flash_attn4.backward_head_dim(72) == 72
    finally:
        flash_attn4._interface.cache_clear()
