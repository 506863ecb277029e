"""Fused Triton kernels against their torch references (CPU, TRITON_INTERPRET=1).

Odd shapes on purpose: 72-wide heads (MUG-DiT's), widths that are not powers of two, one token,
odd token counts, token counts that are not a multiple of the kernels' 32-token backward blocks.
Tolerances: fp32 1e-5 (same math in another order). bf16 runs are compared with an fp32 reference on
the same (bf16-valued) inputs at 2e-2 relative, absolute 2e-2 of the tensor's largest value (sums
over tokens cancel): a few bf16 ulps. Triton's interpreter truncates fp32 -> bf16 conversions
(the GPU rounds to nearest even), so the kernels' bf16 roundings are checked here only to within
those ulps; benchmarks/bench_dit_block.py compares them on the GPU.
"""

import pytest
import torch

pytest.importorskip("triton")

import mugen.kernels as kernels  # noqa: E402
from mugen.kernels import (  # noqa: E402
    gated_residual,
    gated_residual_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
    qk_norm_rope,
    qk_norm_rope_reference,
)
from mugen.models.common.rope import rope_rotations, video_rope_angles  # noqa: E402

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(autouse=True)
def kernels_forced_on():
    with kernels.enabled(True):
        yield


def leaves(*tensors, dtype):
    return [t.detach().to(dtype).requires_grad_(True) if t is not None else None for t in tensors]


def run_both(fused_fn, reference_fn, inputs, dtype, seed=1):
    """Forward + backward through the kernel (inputs in dtype) and the reference (same values in fp32)."""
    fused_inputs = leaves(*inputs, dtype=dtype)
    reference_inputs = [t.detach().float().requires_grad_(True) if t is not None else None for t in fused_inputs]
    out = fused_fn(*fused_inputs)
    with kernels.enabled(False):
        expected = reference_fn(*reference_inputs)
    outs = out if isinstance(out, tuple) else (out,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    generator = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(e.shape, generator=generator) for e in expecteds]
    torch.autograd.backward([o.float() for o in outs], [u.to(dtype).float() for u in upstream])
    torch.autograd.backward(list(expecteds), [u.to(dtype).float() for u in upstream])
    return outs, expecteds, fused_inputs, reference_inputs


def assert_close(actual, expected, dtype, name):
    assert actual is not None, f"{name}: no gradient"
    tolerance = dict(TOLERANCE[dtype])
    if dtype == torch.bfloat16:
        tolerance["atol"] *= max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), **tolerance, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,tokens,dim,selected", [(1, 1, 72, False), (2, 37, 100, True), (1, 5, 72, True)])
def test_gated_residual_matches_reference(dtype, batch, tokens, dim, selected):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, tokens, dim, generator=generator), torch.randn(batch, tokens, dim, generator=generator)
    bias, gate, gate0 = torch.randn(dim, generator=generator), torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)
    use_t0 = (torch.rand(batch, tokens, generator=generator) > 0.5) if selected else None
    if not selected:
        gate0 = None

    def fused(x, y, bias, gate, gate0):
        return gated_residual(x, y, bias, gate, gate0, use_t0)

    def reference(x, y, bias, gate, gate0):
        return gated_residual_reference(x, y, bias, gate, gate0, use_t0)

    (out,), (expected,), fused_in, ref_in = run_both(fused, reference, [x, y, bias, gate, gate0], dtype)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, "output")
    for name, a, b in zip(["x", "y", "bias", "gate", "gate_t0"], fused_in, ref_in):
        if a is not None:
            assert_close(a.grad, b.grad, dtype, f"grad {name}")


def test_gated_residual_without_bias():
    generator = torch.Generator().manual_seed(3)
    x, y, gate = torch.randn(1, 3, 24, generator=generator), torch.randn(1, 3, 24, generator=generator), torch.randn(1, 1, 24, generator=generator)
    (out,), (expected,), fused_in, ref_in = run_both(
        lambda x, y, g: gated_residual(x, y, None, g), lambda x, y, g: gated_residual_reference(x, y, None, g), [x, y, gate], torch.float32
    )
    assert_close(out, expected, torch.float32, "output")
    assert_close(fused_in[2].grad, ref_in[2].grad, torch.float32, "grad gate")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,tokens,dim,selected", [(1, 1, 72, False), (2, 35, 144, True), (2, 3, 100, False)])
def test_layernorm_modulate_matches_reference(dtype, batch, tokens, dim, selected):
    generator = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(batch, tokens, dim, generator=generator) + 0.5  # off-centre, not unit scale
    shift, scale = torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)
    shift0, scale0 = torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)
    use_t0 = (torch.rand(batch, tokens, generator=generator) > 0.5) if selected else None
    if use_t0 is not None:
        use_t0[:, 0] = True  # a start token is always t = 0
    else:
        shift0 = scale0 = None

    def fused(x, shift, scale, shift0, scale0):
        return layernorm_modulate(x, shift, scale, shift0, scale0, use_t0)

    def reference(x, shift, scale, shift0, scale0):
        return layernorm_modulate_reference(x, shift, scale, shift0, scale0, use_t0)

    (out,), (expected,), fused_in, ref_in = run_both(fused, reference, [x, shift, scale, shift0, scale0], dtype)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, "output")
    for name, a, b in zip(["x", "shift", "scale", "shift_t0", "scale_t0"], fused_in, ref_in):
        if a is not None:
            assert_close(a.grad, b.grad, dtype, f"grad {name}")


def test_layernorm_modulate_writes_autocast_dtype():
    """Under autocast the kernel writes bf16 for the next linear layer; values match the fp32 reference."""
    generator = torch.Generator().manual_seed(5)
    x, shift, scale = torch.randn(1, 4, 72, generator=generator), torch.randn(1, 72, generator=generator), torch.randn(1, 72, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layernorm_modulate(x, shift, scale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layernorm_modulate_reference(x, shift, scale), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,grid,heads,head_dim", [(1, (1, 1, 1), 1, 72), (2, (2, 3, 2), 3, 72), (1, (3, 1, 3), 2, 12)])
def test_qk_norm_rope_matches_reference(dtype, batch, grid, heads, head_dim):
    frames, height, width = grid
    tokens = frames * height * width + 2
    generator = torch.Generator().manual_seed(0)
    qkv = 2 * torch.randn(batch, tokens, 3, heads, head_dim, generator=generator)
    q_weight, k_weight = 1 + 0.3 * torch.randn(head_dim, generator=generator), 1 + 0.3 * torch.randn(head_dim, generator=generator)
    frame_indices = torch.randint(0, 50, (batch, frames + 2), generator=generator)
    rotations = rope_rotations(video_rope_angles(frame_indices, height, width, head_dim))  # (B, 1, N, hd/2)

    def fused(qkv, q_weight, k_weight):
        return qk_norm_rope(qkv, q_weight, k_weight, rotations)

    def reference(qkv, q_weight, k_weight):
        return qk_norm_rope_reference(qkv, q_weight, k_weight, rotations)

    outs, expecteds, fused_in, ref_in = run_both(fused, reference, [qkv, q_weight, k_weight], dtype)
    for name, out, expected in zip("qkv", outs, expecteds):
        assert out.shape == (batch, heads, tokens, head_dim)
        assert_close(out, expected, dtype, name)
    for name, a, b in zip(["qkv", "q_weight", "k_weight"], fused_in, ref_in):
        assert_close(a.grad, b.grad, dtype, f"grad {name}")


def test_switch_routes_to_reference():
    x, shift, scale = torch.randn(1, 3, 8), torch.randn(1, 8), torch.randn(1, 8)
    calls = []
    import mugen.kernels.triton_kernels as triton_kernels

    original = triton_kernels.LayerNormModulateFunction.apply
    try:
        triton_kernels.LayerNormModulateFunction.apply = lambda *args: calls.append(1) or original(*args)
        layernorm_modulate(x, shift, scale)
        assert calls == [1]
        with kernels.enabled(False):
            layernorm_modulate(x, shift, scale)
        with kernels.enabled(None):  # auto: CPU tensors never take the kernels
            layernorm_modulate(x, shift, scale)
        assert calls == [1]
    finally:
        triton_kernels.LayerNormModulateFunction.apply = original


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_saving_functions_match_reference(dtype):
    """rms_norm and gelu_linear keep less for backward; values and gradients are unchanged."""
    generator = torch.Generator().manual_seed(9)
    x, weight = 2 * torch.randn(2, 5, 3, 72, generator=generator), 1 + 0.3 * torch.randn(72, generator=generator)
    for strided in (False, True):  # contiguous: Triton kernel; strided: torch Function
        def fused(x, weight):
            return kernels.rms_norm(x.transpose(1, 2) if strided else x, weight)

        def reference(x, weight):
            return kernels.rms_norm_reference(x.transpose(1, 2) if strided else x, weight)

        (out,), (expected,), fused_in, ref_in = run_both(fused, reference, [x, weight], dtype)
        assert_close(out, expected, dtype, "rms_norm")
        for name, a, b in zip(["x", "weight"], fused_in, ref_in):
            assert_close(a.grad, b.grad, dtype, f"rms_norm grad {name}")
    u, w = torch.randn(2, 7, 40, generator=generator), 0.2 * torch.randn(24, 40, generator=generator)
    (out,), (expected,), fused_in, ref_in = run_both(kernels.gelu_linear, kernels.gelu_linear_reference, [u, w], dtype)
    assert_close(out, expected, dtype, "gelu_linear")
    for name, a, b in zip(["u", "weight"], fused_in, ref_in):
        assert_close(a.grad, b.grad, dtype, f"gelu_linear grad {name}")


def test_gelu_linear_keeps_only_its_input():
    u, w = torch.randn(3, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    out = kernels.gelu_linear(u, w)
    saved = out.grad_fn.saved_tensors
    assert [t.data_ptr() for t in saved] == [u.data_ptr(), w.data_ptr()]  # no GELU output kept
