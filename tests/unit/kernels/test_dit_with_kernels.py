"""MUG-DiT with the fused kernels equals MUG-DiT without them (fp32, CPU, TRITON_INTERPRET=1)."""

import pytest
import torch

pytest.importorskip("triton")

import mugen.kernels as kernels  # noqa: E402
from mugen.models.dit import MUGDiT, dit_config  # noqa: E402
from mugen.models.dit.model import plain_linear  # noqa: E402
from mugen.models.lora import apply_lora  # noqa: E402


def tiny_model() -> MUGDiT:
    torch.manual_seed(0)
    # head dim 72 (the release's); depth 2; every weight non-zero so every path matters
    model = MUGDiT(dit_config("debug", hidden_size=144, num_heads=2, depth=2, text_dim=32))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def inputs(conditioned: bool):
    generator = torch.Generator().manual_seed(1)
    batch, frames = 2, 3
    latents = torch.randn(batch, 24, frames, 4, 6, generator=generator)  # 3 x 2 x 3 = 18 + 2 tokens
    text = torch.randn(batch, 5, 32, generator=generator)
    text_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    frame_cond_mask = torch.tensor([[True, False, False], [False, True, False]]) if conditioned else None
    return dict(
        latents=latents,
        timestep=torch.tensor([700.0, 250.0]),
        text_states=text,
        text_mask=text_mask,
        fps=torch.tensor([24.0, 30.0]),
        frame_cond_mask=frame_cond_mask,
    )


def forward_backward(model: MUGDiT, flag: bool, conditioned: bool):
    model.zero_grad(set_to_none=True)
    with kernels.enabled(flag):
        out = model(**inputs(conditioned))
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weight).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("conditioned", [False, True])
def test_kernels_on_equals_kernels_off(conditioned):
    model = tiny_model()
    out_ref, grads_ref = forward_backward(model, False, conditioned)
    out_fused, grads_fused = forward_backward(model, True, conditioned)
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-5, atol=1e-5)
    assert grads_fused.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-4, atol=1e-5 * max(1.0, scale), msg=lambda m: f"{name}: {m}")


def test_blocks_with_lora_fall_back_and_still_match():
    """A LoRA-wrapped proj/fc2 keeps its own bias; the kernels still run and the output still matches."""
    model = tiny_model()
    apply_lora(model, rank=2)
    for block in model.blocks:  # make the adapters matter
        torch.nn.init.normal_(block.attn.proj.lora_up.weight, std=0.1)
    assert not plain_linear(model.blocks[0].attn.proj)
    with torch.no_grad():
        with kernels.enabled(False):
            expected = model(**inputs(True))
        with kernels.enabled(True):
            actual = model(**inputs(True))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
