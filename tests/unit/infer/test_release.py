"""The release pipeline (``mugen.infer.release``) against the official MUG-V pipeline, end to end.

``tests/fixtures/reference_pipeline`` holds what the reference ``infer_pipeline.MUGDiTPipeline``
produced (``scripts/make_reference_pipeline_fixtures.py``) on the CPU with the small random models of
the DiT and VAE parity fixtures and a tiny T5 saved beside it: a synthetic 80x45 reference image,
frame size 40x56, 33 frames, 4 steps, guidance 4, seed 1234, in float32 and in bfloat16. mugen loads
the same weights into its own classes and must produce the same video from the same request and
seed: the starting noise, the VAE's posterior draw, the shifted timesteps (computed in the pipeline
dtype as the reference does), every step's latents and the final video.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mugen.errors import MugenError
from mugen.infer.release import (
    RELEASE_ASPECT_RATIOS,
    RELEASE_NEGATIVE_PROMPT,
    ReleasePipeline,
    load_reference_image,
    prompt_with_aesthetic_score,
    release_frame_size,
    release_latent_frames,
    release_num_frames,
    release_shift_ratio,
    release_timesteps,
    release_weight_paths,
)
from mugen.models.dit import MUGDiT, MUGDiTConfig
from mugen.models.text.t5 import T5TextEncoder
from mugen.models.vae.official import ReleasedVAEConfig, ReleasedVideoVAE

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
PIPELINE = FIXTURES / "reference_pipeline"
RECORD = json.loads((PIPELINE / "reference_pipeline.json").read_text(encoding="utf-8"))
REQUEST = RECORD["request"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def expected() -> dict:
    return load_file(PIPELINE / "reference_pipeline.safetensors")


def build_models():
    dit_record = json.loads((FIXTURES / "reference_dit" / "reference_dit.json").read_text(encoding="utf-8"))
    dit = MUGDiT(MUGDiTConfig.from_dict(dit_record["mugen_config"]))
    dit.load_state_dict({k: v.float() for k, v in load_file(FIXTURES / "reference_dit" / "state_dict.safetensors").items()}, strict=True)
    vae_record = json.loads((FIXTURES / "reference_vae" / "reference_vae.json").read_text(encoding="utf-8"))
    vae = ReleasedVideoVAE(ReleasedVAEConfig.from_dict(vae_record["mugen_config"]))
    vae.load_state_dict({k: v.float() for k, v in load_file(FIXTURES / "reference_vae" / "state_dict.safetensors").items()}, strict=True)
    text_encoder = T5TextEncoder(PIPELINE / "t5", max_length=300, dtype=torch.float32)  # the reference runs T5 in fp32
    return dit, vae, text_encoder


@pytest.fixture
def models():
    return build_models()  # fresh each test: casting to bf16 and back would round the VAE's shift/scale


def l2_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return ((actual.float() - expected).norm() / expected.norm()).item()


def run_mugen(models, dtype: torch.dtype):
    dit, vae, text_encoder = models
    pipeline = ReleasePipeline(dit.to(dtype), vae.to(dtype), text_encoder, device="cpu", dtype=dtype)
    return pipeline(
        image=PIPELINE / REQUEST["image"],
        prompt=REQUEST["prompt"],
        seed=REQUEST["seed"],
        num_steps=REQUEST["num_steps"],
        guidance_scale=REQUEST["guidance_scale"],
        frame_size=tuple(REQUEST["frame_size"]),
        num_frames=REQUEST["num_frames"],
        keep_trace=True,
    )


def test_text_features_match_the_reference_t5_call(models, expected):
    _, _, text_encoder = models
    features = text_encoder.encode([prompt_with_aesthetic_score(REQUEST["prompt"]), RELEASE_NEGATIVE_PROMPT])
    assert torch.equal(features.mask, expected["text_mask"].bool())
    lengths = features.mask.sum(dim=1)
    assert 0 < lengths[0] < lengths[1] < 300  # both right-padded to 300 tokens, the negative prompt longer
    assert relative_error(features.states, expected["text_states"]) <= 1e-6


def test_float32_video_matches_the_reference_pipeline(models, expected):
    result = run_mugen(models, torch.float32)
    timesteps = release_timesteps(REQUEST["num_steps"], release_shift_ratio(*REQUEST["frame_size"], 5, torch.float32))
    # Bit for bit; here the float32 shift puts t_0 just above 1000, so the reference's first step
    # moves no frame and the second re-noises them with its fresh draw: mugen must do the same.
    assert torch.equal(torch.cat(timesteps), expected["timesteps_fp32"]) and timesteps[0].item() > 1000
    assert relative_error(result.image_latent, expected["image_latent_fp32"]) <= 1e-5
    reference_states = expected["step_inputs_fp32"]  # what the DiT saw at each step
    assert len(result.trace) == len(reference_states)
    for step, state in enumerate(result.trace):
        assert relative_error(state, reference_states[step]) <= 1e-5, f"DiT input at step {step}"
    assert relative_error(result.latents, expected["samples_fp32"]) <= 1e-5
    assert result.video.shape == expected["video_fp32"].shape == (3, REQUEST["num_frames"], *REQUEST["frame_size"])
    assert relative_error(result.video, expected["video_fp32"]) <= 1e-5


def test_bfloat16_video_matches_the_reference_pipeline_within_bfloat16_noise(models, expected):
    """Both pipelines in bf16 (DiT and VAE cast, T5 float32, CPU).

    The timesteps (rounded through bf16 as the reference does) agree exactly. The image latent (the VAE
    encode) agrees within bf16 rounding, which depends on the CPU: on one with AVX512-BF16 (native bf16 dot
    products) it differed from the fixture's bf16 run by 1.4% (max-relative) while both were 1.5-1.9% from
    float32; where the fixture was made they agreed within 1%. It is held to 1e-2 or 1.5x the reference's
    own bf16-to-float32 distance, whichever is larger. That image latent is the first frame of every DiT
    input, so the DiT inputs and the sampled latents are held to 2e-2 (L2-relative; 0.6-1.1% measured on
    the AVX512-BF16 CPU; the bf16 and float32 reference trajectories are 100%+ apart, so a wrong step is far
    outside). The decoded video cannot get within 1e-2: four guided
    steps (v_neg + 4 (v_pos - v_neg)) amplify bf16 rounding, so even mugen against itself with
    another exact attention kernel (SDPA's math backend) moves it by about 2e-2. The video must be
    no further from the reference than that kernel swap moves mugen, and far closer to the
    reference's bf16 run than to its float32 run.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dit, vae, text_encoder = models
    result = run_mugen(models, torch.bfloat16)
    timesteps = release_timesteps(REQUEST["num_steps"], release_shift_ratio(*REQUEST["frame_size"], 5, torch.bfloat16))
    assert torch.equal(torch.cat(timesteps), expected["timesteps_bf16"])
    assert not torch.equal(expected["timesteps_bf16"], expected["timesteps_fp32"])
    rounding = relative_error(expected["image_latent_bf16"], expected["image_latent_fp32"])  # 1.5% on the fixture
    assert relative_error(result.image_latent, expected["image_latent_bf16"]) <= max(1e-2, 1.5 * rounding)
    for step, state in enumerate(result.trace):
        assert l2_relative_error(state, expected["step_inputs_bf16"][step]) <= 2e-2, f"DiT input at step {step}"
    assert l2_relative_error(result.latents, expected["samples_bf16"]) <= 2e-2

    with sdpa_kernel([SDPBackend.MATH]):
        other_kernel = run_mugen(build_models(), torch.bfloat16)
    kernel_noise = l2_relative_error(other_kernel.video, result.video)
    to_reference = l2_relative_error(result.video, expected["video_bf16"])
    assert to_reference <= max(1e-2, 1.5 * kernel_noise)
    assert to_reference < 0.25 * l2_relative_error(expected["video_bf16"], expected["video_fp32"])


def test_first_frame_is_the_preprocessed_reference_image(models, expected):
    image = load_reference_image(PIPELINE / REQUEST["image"], tuple(REQUEST["frame_size"]))
    assert torch.equal(image, expected["video_fp32"][:, 0])


def test_another_seed_gives_another_video(models, expected):
    dit, vae, text_encoder = models
    pipeline = ReleasePipeline(dit, vae, text_encoder, device="cpu", dtype=torch.float32)
    result = pipeline(
        image=PIPELINE / REQUEST["image"], prompt=REQUEST["prompt"], seed=REQUEST["seed"] + 1, num_steps=1,
        frame_size=tuple(REQUEST["frame_size"]), num_frames=17,
    )
    assert result.video.shape == (3, 17, *REQUEST["frame_size"])
    assert relative_error(result.video[:, 1:], expected["video_fp32"][:, 1:17]) > 1e-2


def test_sizes_off_the_vae_grid_keep_the_decoded_size(models):
    """3:4 and 4:3 are 1110 and 1108 pixels: the VAE's floor gives 1104. The reference fails to join
    its 1110-wide image to 1104-wide frames; mugen crops the image's top-left to the decoded size."""
    dit, vae, text_encoder = models
    pipeline = ReleasePipeline(dit, vae, text_encoder, device="cpu", dtype=torch.float32)
    result = pipeline(image=PIPELINE / REQUEST["image"], prompt=REQUEST["prompt"], num_steps=1, frame_size=(46, 58), num_frames=9)
    assert result.latents.shape[-2:] == (5, 7) and result.video.shape == (3, 9, 40, 56)
    image = load_reference_image(PIPELINE / REQUEST["image"], (46, 58))
    assert torch.equal(result.video[:, 0], image[:, :40, :56])


@pytest.mark.parametrize("num_frames", [1, 16, 20])
def test_frame_counts_must_be_one_plus_eight_k(models, num_frames):
    pipeline = ReleasePipeline(*models, device="cpu", dtype=torch.float32)
    with pytest.raises(MugenError, match=f"num_frames={num_frames}: the release makes 1 \\+ 8k frames"):
        pipeline(image=PIPELINE / REQUEST["image"], prompt=REQUEST["prompt"], frame_size=(40, 56), num_frames=num_frames)


# ------------------------------------------------------------------------------ the request
def test_release_tables():
    assert release_frame_size("9:16") == (720, 1280) and release_frame_size("16:9") == (1280, 720)
    assert set(RELEASE_ASPECT_RATIOS) == {"9:16", "3:4", "1:1", "4:3", "16:9"}
    assert release_num_frames(5) == release_num_frames("5s") == 105 and release_num_frames("3") == 73
    assert release_latent_frames(105) == 14 and release_latent_frames(73) == 10
    assert prompt_with_aesthetic_score("a cat.") == "a cat. aesthetic score: 6.0."


@pytest.mark.parametrize("value", ["16:10", "720p", ""])
def test_unknown_aspect_ratio_lists_the_accepted_ones(value):
    with pytest.raises(MugenError, match=r"9:16 \(720x1280\).*16:9 \(1280x720\)"):
        release_frame_size(value)


@pytest.mark.parametrize("value", [4, "10s", "five"])
def test_unknown_duration_lists_the_accepted_ones(value):
    with pytest.raises(MugenError, match=r"5 \(105 frames\), 3 \(73 frames\)"):
        release_num_frames(value)


def test_shift_ratio_rounds_like_the_reference_in_bfloat16():
    # 720p, 14 latent frames: sqrt(720 * 1280 / 512^2) = 1.875 exactly; sqrt(14) rounds in bf16.
    ratio = release_shift_ratio(720, 1280, 14, torch.bfloat16)
    assert ratio.dtype == torch.bfloat16
    assert ratio.item() == torch.tensor(1.875 * torch.tensor(14.0, dtype=torch.bfloat16).sqrt().item(), dtype=torch.bfloat16).item()
    assert abs(release_shift_ratio(720, 1280, 14, torch.float32).item() - 1.875 * 14**0.5) < 1e-5
    grid = release_timesteps(25, ratio)
    assert len(grid) == 25 and grid[0].item() == 1000.0 and all(a > b for a, b in zip(grid, grid[1:]))


def test_reference_image_resize_and_crop(tmp_path):
    from PIL import Image

    # 100x50 (w x h) to 20x20: the height needs the larger scale -> 40x20, crop columns 10..30.
    pixels = torch.zeros(50, 100, 3, dtype=torch.uint8)
    pixels[:, 50:] = 255
    Image.fromarray(pixels.numpy()).save(tmp_path / "half.png")
    image = load_reference_image(tmp_path / "half.png", (20, 20))
    assert image.shape == (3, 20, 20) and image.min() == -1 and image.max() == 1
    assert (image[:, :, :8] == -1).all() and (image[:, :, 12:] == 1).all()
    with pytest.raises(MugenError, match="does not exist"):
        load_reference_image(tmp_path / "missing.png", (20, 20))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(MugenError, match="cannot be read"):
        load_reference_image(tmp_path / "broken.png", (20, 20))


def test_weights_folder_names_what_is_missing(tmp_path):
    with pytest.raises(MugenError, match="dit.pt.*vae.pt.*t5-v1_1-xxl"):
        release_weight_paths(tmp_path)
    (tmp_path / "dit.pt").write_bytes(b"")
    (tmp_path / "t5-v1_1-xxl").mkdir()
    with pytest.raises(MugenError, match="lacks .*vae.pt") as error:
        release_weight_paths(tmp_path)
    assert "dit.pt," not in str(error.value).split("it must hold")[0]
    (tmp_path / "vae.pt").write_bytes(b"")
    paths = release_weight_paths(tmp_path)
    assert paths["t5"] == tmp_path / "t5-v1_1-xxl"
    with pytest.raises(MugenError, match="is not a folder"):
        release_weight_paths(tmp_path / "nowhere")
