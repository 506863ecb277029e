"""mugen's MUGDiT against the official MUG-V DiT (Shopee-MUG/MUG-V ``mug_v/dit``).

The fixtures in ``tests/fixtures/reference_dit`` were written by
``scripts/make_reference_dit_fixtures.py``: the reference model (attention swapped for torch SDPA
with the same math) at a reduced official layout (head dim 72, patch (1, 2, 2), 24 channels,
hidden 144 = 2 heads, depth 2, text width 64), random weights, fixed inputs, and its outputs in
float32 and in bfloat16 (CPU). Here mugen loads that state dict strictly, with no renaming, and
must give the same numbers.

Conventions translated from the reference: ``x_mask`` (True = noisy frame) -> ``frame_cond_mask =
~x_mask`` (True = clean conditioned frame); ``mask`` -> ``text_mask``; ``frame_indice`` ->
``frame_indices``; ``y`` -> ``text_states``; ``x`` -> ``latents``.

Start and end tokens: the reference's forward only runs with ``x_mask`` (the official sampler always
passes one, all-noisy for text-to-video) and then gives the start and end tokens the t = 0 modulation.
mugen adopts that rule for every call, so the ``t2v`` case (all frames noisy) matches too.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mugen.models.dit import MUGDiT, MUGDiTConfig

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "reference_dit"
RECORD = json.loads((FIXTURES / "reference_dit.json").read_text(encoding="utf-8"))

CASES = [case["name"] for case in RECORD["cases"]]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def model() -> MUGDiT:
    model = MUGDiT(MUGDiTConfig.from_dict(RECORD["mugen_config"])).eval()
    # Stored as bfloat16 with values on the bfloat16 grid: float32 is exactly what the reference ran.
    state_dict = {name: tensor.float() for name, tensor in load_file(FIXTURES / RECORD["weights"]["file"]).items()}
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def run_mugen(model: MUGDiT, case: dict, dtype: torch.dtype) -> torch.Tensor:
    model = model.to(dtype)
    with torch.no_grad():
        return model(
            latents=case["x"].to(dtype),
            timestep=case["timestep"],
            text_states=case["y"].to(dtype),
            text_mask=case["mask"],
            fps=case["fps"],
            frame_cond_mask=~case["x_mask"],
            frame_indices=case["frame_indice"],
        )


def load_case(name: str) -> dict:
    return load_file(FIXTURES / f"case_{name}.safetensors")


def test_fixture_matches_the_official_layout(model):
    """The reduced model keeps the release's structure: head dim 72, 12 RoPE frequencies per axis."""
    assert model.config.head_dim == 72 and model.config.head_dim // 6 == 12
    assert model.config.patch_size == (1, 2, 2) and model.config.latent_channels == 24
    assert all(torch.count_nonzero(p) == p.numel() for p in model.parameters()), "every weight must matter"


@pytest.mark.parametrize("name", CASES)
def test_float32_output_matches_reference(model, name):
    case = load_case(name)
    out = run_mugen(model, case, torch.float32)
    assert out.shape == case["output_fp32"].shape
    assert relative_error(out, case["output_fp32"]) <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_output_matches_reference_run_in_bfloat16(model, name):
    """Both models cast to bfloat16 on the CPU; the reference also rounds t to bfloat16 first."""
    case = load_case(name)
    try:
        out = run_mugen(model, case, torch.bfloat16)
    finally:
        model.float()  # lossless: the weights lie on the bfloat16 grid
    assert relative_error(out, case["output_bf16"]) <= 1e-2


def test_inputs_exercise_padding_conditioning_and_rope_offsets():
    """Guards the fixture itself: the cases cover what the parity claims cover."""
    odd = load_case("odd_size_frame_indices")
    assert odd["x"].shape[-2:] == (5, 7)  # padded to 6 x 8 inside the model
    assert not torch.equal(odd["frame_indice"][0], torch.arange(odd["frame_indice"].shape[1]))
    i2v = load_case("i2v")
    assert (~i2v["x_mask"]).any(dim=1).all()  # every sample has a conditioned frame
    assert not i2v["mask"].all() and i2v["mask"].any(dim=1).all()  # padded text, never empty
    assert (i2v["timestep"] != i2v["timestep"].to(torch.bfloat16).float()).all()  # t off the bf16 grid
