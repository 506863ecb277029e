"""RoPE's two formulations: the complex multiply (eager) and the real arithmetic torch.compile traces."""

from __future__ import annotations

import torch

from mugen.models.common.rope import apply_rope, apply_rope_real, rope_rotations, video_rope_angles


def _inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    angles = video_rope_angles(torch.arange(6)[None].repeat(2, 1), 2, 3, 24) + 0.1  # (2, N, 12)
    x = torch.randn(2, 3, angles.shape[1], 24, generator=generator).to(dtype)
    return x, rope_rotations(angles)


def test_real_arithmetic_equals_the_complex_multiply_with_gradients():
    for dtype in (torch.float32, torch.bfloat16):
        x, rotations = _inputs(dtype)
        x_complex, x_real = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_complex, out_real = apply_rope(x_complex, rotations), apply_rope_real(x_real, rotations)
        assert out_real.dtype == dtype and out_real.shape == x.shape
        torch.testing.assert_close(out_real, out_complex, rtol=1e-6, atol=1e-6)
        grad = torch.randn_like(out_real)
        out_complex.backward(grad)
        out_real.backward(grad)
        torch.testing.assert_close(x_real.grad, x_complex.grad, rtol=1e-6, atol=1e-6)
        assert not torch.equal(out_real, x)  # it rotates


def test_compiled_rope_traces_no_complex_tensor_ops():
    traced_ops = []

    def recording_backend(graph_module, example_inputs):
        traced_ops.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    x, rotations = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(apply_rope, backend=recording_backend, fullgraph=True)
    torch.testing.assert_close(compiled(x, rotations), apply_rope(x, rotations), rtol=1e-6, atol=1e-6)
    assert traced_ops and not [op for op in traced_ops if "complex" in op]
