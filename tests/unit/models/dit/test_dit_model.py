"""MUG-DiT: official layout, padded-text invariance, frame conditioning, RoPE, shapes."""

from pathlib import Path

import pytest
import torch

from mugen.errors import MugenError
from mugen.models.common.rope import apply_rope, rope_frequencies, rope_rotations, video_rope_angles
from mugen.models.dit import MUGDiT, dit_config

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures"


def official_10b_shapes() -> dict[str, tuple[int, ...]]:
    """Names/shapes of the released dit.pt (block 0 listed; blocks 1..55 repeat it)."""
    shapes = {}
    for line in (FIXTURES / "mugdit-10b-state-dict.tsv").read_text().splitlines():
        if not line or line.startswith("#") or line.startswith("name\t"):
            continue
        name, shape = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("[]").split(","))
        if name.startswith("blocks.0."):
            for block in range(56):
                shapes[name.replace("blocks.0.", f"blocks.{block}.", 1)] = shape
        else:
            shapes[name] = shape
    return shapes


def test_official_10b_state_dict_loads_strictly_on_meta():
    shapes = official_10b_shapes()
    state_dict = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    assert sum(t.numel() for t in state_dict.values()) == 10_830_321_984  # the file's stated total
    with torch.device("meta"):
        model = MUGDiT(dit_config("10B"))
    result = model.load_state_dict(state_dict, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert model.num_parameters == 10_830_321_984


def test_wrong_preset_state_dict_fails_strict_load():
    with torch.device("meta"):
        model = MUGDiT(dit_config("2B"))
    state_dict = {name: torch.empty(shape, device="meta") for name, shape in official_10b_shapes().items()}
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(state_dict, strict=True, assign=True)


@pytest.mark.parametrize("name,params", [("1B", 1.21e9), ("2B", 2.71e9), ("4B", 4.82e9), ("18B", 19.24e9)])
def test_paper_presets_sizes(name, params):
    with torch.device("meta"):
        model = MUGDiT(dit_config(name))
    assert abs(model.num_parameters - params) / params < 0.01
    assert model.config.depth == 56 and model.config.head_dim == 72


def test_unknown_preset_is_a_user_error():
    with pytest.raises(MugenError, match="unknown DiT preset"):
        dit_config("3B")


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = MUGDiT(dit_config("debug", **overrides)).eval()
    # The zero-initialised output head would hide every difference; give it weights.
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    for block in model.blocks:
        torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.05)
    return model


def inputs(batch=2, frames=3, height=6, width=8, text_len=5, text_dim=384, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        latents=torch.randn(batch, 24, frames, height, width, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
        text_states=torch.randn(batch, text_len, text_dim, generator=g),
        fps=torch.full((batch,), 24.0),
    )


def test_output_shape_and_odd_latent_sizes_are_padded_and_cropped():
    model = make_model()
    args = inputs(height=5, width=7)
    out = model(**args)
    assert out.shape == (2, 48, 3, 5, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_zero_initialised_head_predicts_zero():
    torch.manual_seed(0)
    model = MUGDiT(dit_config("debug"))
    assert torch.count_nonzero(model(**inputs())) == 0


def test_padded_text_tokens_do_not_change_the_output():
    model = make_model()
    args = inputs(text_len=5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    reference = model(**args, text_mask=mask)
    padding = torch.randn(2, 7, 384) * 10  # garbage in the padded slots
    padded_states = torch.cat([args["text_states"], padding], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 7, dtype=torch.bool)], dim=1)
    padded = model(**{**args, "text_states": padded_states}, text_mask=padded_mask)
    torch.testing.assert_close(padded, reference, rtol=1e-5, atol=1e-6)
    # ...and the mask matters: unmasked garbage does change it.
    unmasked = model(**{**args, "text_states": padded_states}, text_mask=torch.ones(2, 12, dtype=torch.bool))
    assert (unmasked - reference).abs().max() > 1e-3


def test_samples_in_a_batch_are_independent():
    model = make_model()
    args = inputs(batch=2)
    lengths = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool)
    both = model(**args, text_mask=lengths)
    second = model(**{k: v[1:] for k, v in args.items()}, text_mask=lengths[1:])
    torch.testing.assert_close(both[1:], second, rtol=1e-5, atol=1e-6)


def test_all_frames_conditioned_equals_time_zero():
    """Conditioned tokens (and the start/end tokens of a conditioned sample) use t = 0 modulation."""
    model = make_model()
    args = inputs()
    all_clean = torch.ones(2, 3, dtype=torch.bool)
    conditioned = model(**args, frame_cond_mask=all_clean)
    at_zero = model(**{**args, "timestep": torch.zeros(2)})
    torch.testing.assert_close(conditioned, at_zero, rtol=1e-5, atol=1e-6)


def test_first_frame_conditioning_changes_only_through_modulation():
    model = make_model()
    args = inputs()
    first = torch.tensor([[True, False, False], [False, False, False]])
    out = model(**args, frame_cond_mask=first)
    plain = model(**args)
    assert (out[0] - plain[0]).abs().max() > 1e-4  # sample 0 is conditioned
    torch.testing.assert_close(out[1], plain[1], rtol=1e-5, atol=1e-6)  # sample 1 has no clean frame


def test_time_shift_of_frame_indices_leaves_output_unchanged():
    """RoPE encodes relative positions: shifting every time index by a constant changes nothing."""
    model = make_model()
    args = inputs()
    base = torch.arange(5).expand(2, -1)
    out = model(**args, frame_indices=base)
    shifted = model(**args, frame_indices=base + 7)
    torch.testing.assert_close(shifted, out, rtol=1e-4, atol=1e-5)
    reordered = model(**args, frame_indices=torch.tensor([[0, 1, 3, 2, 4]] * 2))
    assert (reordered - out).abs().max() > 1e-4


def test_rope_matches_complex_multiplication():
    head_dim = 24
    frame_indices = torch.tensor([[0, 1, 2, 3], [2, 4, 6, 8]])
    angles = video_rope_angles(frame_indices, 3, 4, head_dim)  # (B, 2*3*4 + 2, 12)
    assert angles.shape == (2, 2 * 3 * 4 + 2, head_dim // 2)
    freqs = rope_frequencies(head_dim)
    # token 1 + (t=1, h=2, w=3) of sample 1: angles are [2f, 3f, 6f]
    token = 1 + 1 * 12 + 2 * 4 + 3
    torch.testing.assert_close(angles[1, token], torch.cat([2 * freqs, 3 * freqs, 6 * freqs]))
    # end token at spatial (H-1, W-1) and time index of the last slot
    torch.testing.assert_close(angles[1, -1], torch.cat([2 * freqs, 3 * freqs, 8 * freqs]))
    x = torch.randn(2, 3, angles.shape[1], head_dim)
    rotated = apply_rope(x, rope_rotations(angles))
    # the same rotation written with real arithmetic on interleaved pairs
    real, imag = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    expected = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)
    torch.testing.assert_close(rotated, expected)


def test_backward_reaches_every_parameter_after_head_is_nonzero():
    model = make_model().train()
    out = model(**inputs(), frame_cond_mask=torch.tensor([[True, False, False], [False] * 3]))
    out[:, :24].pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero
