"""The official MUG-V 10B image-to-video release, as its reference pipeline samples it (issue 3).

Preset ``mugv-10b-i2v``: the released ``dit.pt`` (MUG-DiT 10B), the released ``vae.pt`` and the
DeepFloyd ``t5-v1_1-xxl`` text encoder. What the reference pipeline (Shopee-MUG/MUG-V
``infer_pipeline.py`` and ``mug_v/scheduler/rectified_flow.py``) does, and mugen repeats here:

Request
- 720p only. Sizes are keyed by the reference's ``"height:width"`` strings, so ``"16:9"`` is a
  portrait 1280x720 (height x width) clip and ``"9:16"`` a landscape 720x1280 one (see
  ``RELEASE_ASPECT_RATIOS``). Lengths: 5 s = 105 frames, 3 s = 73 frames.
- The prompt gets ``" aesthetic score: 6.0."`` appended; the unconditional half of classifier-free
  guidance encodes the release's fixed negative prompt (``RELEASE_NEGATIVE_PROMPT``). Both go
  through T5 with 300 tokens, right-padded, with the attention mask (``mugen.models.text.t5``).
- The DiT is told fps 30, frame indices ``0 .. T + 1`` (start token, T latent frames, end token).

Reference image (seed §3.2 image conditioning)
- Read as RGB, resized with PIL bicubic so that it covers the frame (the side that needs the larger
  scale fits exactly, the other is rounded), then cropped at the centre (offset rounded), scaled to
  [-1, 1].
- Repeated 8 times in time (one temporal VAE chunk) and encoded; the VAE *samples* its posterior
  with ``torch.randn`` on the CPU, so the seed fixes that draw too. The latent becomes latent frame 0,
  held clean (frame mask) through sampling.

Sampling (rectified flow, t = 1000 noise -> 0 data, Euler, ``release_sample``)
- Grid ``t_i = (1 - i / 25) * 1000``, each shifted by ``t' = r t / (1 + (r - 1) t)`` (t in [0, 1])
  with ``r = sqrt(H W / 512^2) * sqrt(T_latent)``, where the reference computes r from tensors in
  the pipeline dtype (bf16: H W, the quotient and both square roots are rounded to bf16; the
  3:4 width 1110 is 1112 in bf16), then works in float32.
- Noise: the seed goes to every generator (``torch.manual_seed``); first the VAE's posterior draw
  (CPU, float32), then ``randn`` of the latent shape on the device in the pipeline dtype (frame 0
  is then overwritten by the image latent), then ``randn_like`` of it: the starting state is
  ``(1 - t_0/1000) first + (t_0/1000) second`` on the noisy frames (t_0 is 1000, or a hair off it
  after dtype rounding), float32 from then on. Every step draws one more float32 ``randn_like``.
- Each step, the reference's frame bookkeeping: a frame moves while ``1000 * mask >= t`` (with the
  0/1 mask: the noisy frames, unless rounding puts t_0 above 1000, as the float32 shift of small
  sizes does, and then the first step moves nothing); a frame that starts moving after sitting out
  is re-noised to t with that step's draw. Then one forward on ``[z, z]`` with [prompt, negative
  prompt] (frames sitting out are modulated as clean, t = 0), velocity = first 24 of the 48 output
  channels, ``v = v_neg + 4.0 (v_pos - v_neg)``, ``z += v dt`` (dt in [0, 1]; the last step goes
  to 0), and frames sitting out are put back.

Output
- Latent frames 1.. are decoded for ``num_frames - 1`` pixel frames (the VAE's 48-frame chunks) and
  the preprocessed reference image (cast to the decoded dtype) is put in front: 105 or 73 frames.
- The file: clamp to [-1, 1], H.264 at crf 17, written at 20 fps (the reference's ``save_video``
  default; the model itself is conditioned on fps 30).
- 3:4 and 4:3 (widths/heights 1110 and 1108, not multiples of 8) decode to 1104 pixels while the
  reference image keeps 1110/1108: the reference pipeline fails to concatenate them there. mugen
  crops the reference frame to the decoded size, keeping the top-left (the part the VAE's
  right/bottom-padded convolutions cover).

Differences on purpose: T5 runs in bf16 on GPU by default (the reference runs it in float32;
``t5_dtype=torch.float32`` matches it exactly); seed 0 is seed 0 (the reference replaces a falsy
seed by 42); attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (no
flash-attn or xformers).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mugen.errors import MugenError
from mugen.models.text.base import TextFeatures

log = logging.getLogger(__name__)

RELEASE_PRESET = "mugv-10b-i2v"

# "height:width" -> (height, width) pixels, as keyed by the reference (720p only).
RELEASE_ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "9:16": (720, 1280),
    "3:4": (832, 1110),
    "1:1": (960, 960),
    "4:3": (1108, 832),
    "16:9": (1280, 720),
}
# seconds -> pixel frames (the first is the reference image itself)
RELEASE_DURATIONS: dict[int, int] = {5: 105, 3: 73}

RELEASE_NEGATIVE_PROMPT = (
    "ugly, blurry, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
    "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry"
)
RELEASE_AESTHETIC_SCORE = 6.0
RELEASE_STEPS = 25
RELEASE_GUIDANCE = 4.0
RELEASE_FPS = 30  # the fps signal given to the DiT
RELEASE_FILE_FPS = 20  # the frame rate the reference writes its MP4 at
RELEASE_CRF = 17
RELEASE_SEED = 42
RELEASE_TEXT_TOKENS = 300
NUM_TIMESTEPS = 1000
SHIFT_BASE_RESOLUTION = 512 * 512
VAE_SPATIAL_FACTOR = 8
VAE_TEMPORAL_FACTOR = 8
VAE_MICRO_FRAMES = 48  # pixel frames per temporal-VAE chunk in the release


# ------------------------------------------------------------------------------------ request
def release_frame_size(aspect_ratio: str) -> tuple[int, int]:
    """(height, width) of a 720p aspect ratio, keyed "height:width" as in the reference."""
    if aspect_ratio not in RELEASE_ASPECT_RATIOS:
        accepted = ", ".join(f"{key} ({h}x{w})" for key, (h, w) in RELEASE_ASPECT_RATIOS.items())
        raise MugenError(f"aspect ratio {aspect_ratio!r} is not one the release supports; use one of {accepted} (height:width, HxW pixels)")
    return RELEASE_ASPECT_RATIOS[aspect_ratio]


def release_num_frames(duration: int | float | str) -> int:
    """Pixel frames of a duration in seconds (5 or 3; "5s" works too)."""
    text = str(duration).strip().lower().removesuffix("s")
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is None or seconds not in RELEASE_DURATIONS:
        accepted = ", ".join(f"{s} ({frames} frames)" for s, frames in RELEASE_DURATIONS.items())
        raise MugenError(f"duration {duration!r} is not one the release supports; use {accepted} seconds")
    return RELEASE_DURATIONS[int(seconds)]


def release_latent_frames(num_frames: int, micro_frames: int = VAE_MICRO_FRAMES, factor: int = VAE_TEMPORAL_FACTOR) -> int:
    """Latent frames of ``num_frames`` pixel frames under the released VAE's chunking.

    Whole chunks of ``micro_frames`` give ``micro_frames / factor`` latents each; a remainder is
    front-padded to a multiple of ``factor``. 105 -> 6 + 6 + 2 = 14, 73 -> 6 + 4 = 10.
    """
    if num_frames < 1:
        raise MugenError(f"num_frames={num_frames} must be at least 1")
    whole, remainder = divmod(num_frames, micro_frames)
    return whole * (micro_frames // factor) + -(-remainder // factor)


def prompt_with_aesthetic_score(prompt: str, score: float | None = RELEASE_AESTHETIC_SCORE) -> str:
    """The prompt as the release conditions on it: ``"<prompt> aesthetic score: 6.0."``."""
    return prompt if score is None else f"{prompt} aesthetic score: {score:.1f}."


def load_reference_image(path: str | os.PathLike, size: tuple[int, int]) -> Tensor:
    """The reference image as the release preprocesses it: (3, H, W) float32 in [-1, 1].

    PIL bicubic resize so the image covers ``size`` = (H, W): if the height needs the larger scale it
    becomes exactly H and the width ``round(w * H / h)``, else the other way round; then the centre
    crop at offset ``round((scaled - target) / 2)``.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MugenError(f"reference image {path} does not exist; pass --image with a PNG/JPEG file")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise MugenError(f"reference image {path} cannot be read ({error}); use a PNG/JPEG/WebP file that opens") from None
    target_h, target_w = size
    width, height = image.size
    scale_h, scale_w = target_h / height, target_w / width
    if scale_h > scale_w:
        scaled_h, scaled_w = target_h, round(width * scale_h)
        top, left = 0, int(round((scaled_w - target_w) / 2.0))
    else:
        scaled_h, scaled_w = round(height * scale_w), target_w
        top, left = int(round((scaled_h - target_h) / 2.0)), 0
    resized = np.asarray(image.resize((scaled_w, scaled_h), Image.BICUBIC))  # (scaled_h, scaled_w, 3) uint8
    crop = resized[top : top + target_h, left : left + target_w]
    if crop.shape[:2] != (target_h, target_w):
        raise MugenError(f"reference image {path} ({width}x{height}) cannot be cropped to {target_w}x{target_h}")
    pixels = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255.0  # (3, H, W) in [0, 1]
    return (pixels - 0.5) / 0.5


# ---------------------------------------------------------------------------- time schedule
def release_shift_ratio(height: int, width: int, latent_frames: int, dtype: torch.dtype, device=None) -> Tensor:
    """(1,) shift ratio ``sqrt(H W / 512^2) * sqrt(T)`` computed in ``dtype`` as the reference does.

    The reference hands its timestep transform the height, width and latent frame count as tensors
    of the pipeline dtype, so in bf16 every intermediate is rounded to bf16 (fp32: plain float32).
    """
    def scalar(value: float) -> Tensor:
        return torch.tensor([value], dtype=dtype, device=device)

    ratio_space = (scalar(height) * scalar(width) / SHIFT_BASE_RESOLUTION).sqrt()
    ratio_time = (scalar(latent_frames) / 1).sqrt()
    return ratio_space * ratio_time * 1.0


def release_timesteps(num_steps: int, ratio: Tensor) -> list[Tensor]:
    """The shifted grid in the model's units (1000 = noise): ``num_steps`` float32 tensors of shape (1,)."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise MugenError(f"num_steps={num_steps!r} must be a positive whole number (the release uses 25)")
    grid = []
    for step in range(num_steps):
        t = torch.tensor([(1.0 - step / num_steps) * NUM_TIMESTEPS], device=ratio.device)  # float32
        fraction = t / NUM_TIMESTEPS
        shifted = ratio * fraction / (1 + (ratio - 1) * fraction)  # promoted to float32
        grid.append(shifted * NUM_TIMESTEPS)
    return grid


# ---------------------------------------------------------------------------------- sampler
@dataclass
class ReleaseNoise:
    """The generators of one seed: the VAE posterior draws on the CPU, the latents on the device."""

    cpu: torch.Generator
    device: torch.Generator

    @classmethod
    def from_seed(cls, seed: int, device: torch.device) -> ReleaseNoise:
        if int(seed) != seed or seed < 0:
            raise MugenError(f"seed {seed!r} must be a non-negative whole number")
        cpu = torch.Generator("cpu").manual_seed(int(seed))
        # On the CPU the reference draws everything from the one global generator, in order.
        on_device = cpu if device.type == "cpu" else torch.Generator(device).manual_seed(int(seed))
        return cls(cpu=cpu, device=on_device)


def release_velocity(
    dit, z: Tensor, t: Tensor, text: TextFeatures, fps: Tensor, frame_indices: Tensor, noisy_frames: Tensor, guidance_scale: float
) -> Tensor:
    """Guided velocity: one DiT forward on [z, z] with text [prompt, negative]; returns (B, C, T, h, w) float32.

    t: (B,) in [0, 1000]; fps (2B,); frame_indices (2B, T + 2); noisy_frames (2B, T) bool.
    """
    batch, channels = z.shape[:2]
    prediction = dit(
        latents=torch.cat([z, z]),
        timestep=torch.cat([t, t]),
        text_states=text.states,
        text_mask=text.mask,
        fps=fps,
        frame_cond_mask=~noisy_frames,
        frame_indices=frame_indices,
    )  # (2B, 2C, T, h, w) float32
    velocity = prediction[:, :channels]
    velocity_prompt, velocity_negative = velocity[:batch], velocity[batch:]
    return velocity_negative + guidance_scale * (velocity_prompt - velocity_negative)


def _blend_noise(clean: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """The reference's noising at model time t (B,): ``(1 - t/1000) clean + (t/1000) noise`` in float32."""
    keep = (1 - t.float() / NUM_TIMESTEPS)[:, None, None, None, None]  # (B, 1, 1, 1, 1)
    return keep * clean + (1 - keep) * noise


@torch.no_grad()
def release_sample(
    dit,
    text: TextFeatures,
    start: Tensor,
    noise: Tensor,
    noisy_frames: Tensor,
    timesteps: list[Tensor],
    generator: torch.Generator | None = None,
    fps: float = RELEASE_FPS,
    guidance_scale: float = RELEASE_GUIDANCE,
    show_progress: bool = False,
    trace: list | None = None,
) -> Tensor:
    """Euler integration with the release's frame masks (see the module docstring).

    start: (B, C, T, h, w) latents in the pipeline dtype whose clean frames hold the conditioning
    latents; noise: the starting noise, same shape and dtype; noisy_frames: (B, T) bool, False =
    conditioned; text: 2B rows, [prompts, negatives]; generator: the device generator the starting
    noise came from (each step draws a fresh noise tensor from it, as the reference does). Returns
    float32 latents; ``trace`` collects the state the DiT sees at every step.

    The reference's frame bookkeeping, kept exactly: a frame takes part in a step only while
    ``1000 * noisy >= t`` (with a 0/1 mask: noisy frames, unless rounding puts t above 1000, as the
    float32 shift of small sizes does at the first step, which then changes nothing); a frame that
    joins after sitting out is re-noised to t with that step's fresh draw; frames sitting out keep
    their state and are modulated as clean (t = 0) by the DiT.
    """
    batch, _, frames = start.shape[:3]
    device = start.device
    mask_time = noisy_frames.float() * NUM_TIMESTEPS  # (B, T): 1000 for noisy frames, 0 for conditioned
    # The first blend: t_0 is (about) 1000, so this is (nearly) the noise; float32 from here on.
    z = torch.where(noisy_frames[:, None, :, None, None], _blend_noise(start, noise, timesteps[0].expand(batch)), start)
    noised = noisy_frames.clone()  # frames holding noise at the current level
    fps_tensor = torch.full((2 * batch,), float(fps), device=device)
    frame_indices = torch.arange(frames + 2, device=device).expand(2 * batch, -1)
    for step in tqdm(range(len(timesteps)), desc="sampling", disable=not show_progress):
        t = timesteps[step].expand(batch)  # (B,) float32
        held = z
        fresh = torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype)
        active = mask_time >= t[:, None]  # (B, T) frames this step moves
        joining = active & ~noised
        z = torch.where(joining[:, None, :, None, None], _blend_noise(held, fresh, t), held)
        noised = active
        active_pair = torch.cat([active, active])  # (2B, T)
        if trace is not None:
            trace.append(z.detach().cpu())
        velocity = release_velocity(dit, z, t, text, fps_tensor, frame_indices, active_pair, guidance_scale)
        t_next = timesteps[step + 1] if step + 1 < len(timesteps) else torch.zeros_like(timesteps[step])
        dt = (timesteps[step] - t_next) / NUM_TIMESTEPS  # (1,) float32
        z = z + velocity * dt[:, None, None, None, None]
        z = torch.where(active[:, None, :, None, None], z, held)
    return z


def attention_backends(device: torch.device):
    """Context preferring cuDNN, then flash, then memory-efficient SDPA on CUDA (head dim 72)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True)


# --------------------------------------------------------------------------------- pipeline
@dataclass
class ReleaseOutput:
    video: Tensor  # (3, F, H, W) in [-1, 1]: the reference image, then the decoded frames
    latents: Tensor  # (1, C, T, h, w) float32 sampled latents (frame 0 = the image latent)
    start_noise: Tensor  # (1, C, T, h, w) the noise sampling started from
    image_latent: Tensor  # (1, C, 1, h, w) the reference image's latent
    trace: list  # the latents the DiT saw at every step (when asked for)


class ReleasePipeline:
    """Text + image to video with the released MUG-V 10B weights and the reference's semantics.

    ``dit``: a MUGDiT holding ``dit.pt``; ``vae``: the released VAE (``encode(video, generator=)``
    samples its posterior from ``generator``; ``decode(latents, num_frames=)``); ``text_encoder``:
    a mugen TextEncoder (T5-XXL, 300 tokens) or None when the caller passes ``text`` itself.
    """

    def __init__(self, dit, vae, text_encoder=None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
        self.device = torch.device(device)
        self.dtype = dtype
        self.dit = dit.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder

    @classmethod
    def from_weights(
        cls, weights_dir: str | os.PathLike, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, t5_dtype: torch.dtype | None = None
    ) -> ReleasePipeline:
        """Load ``dit.pt``, ``vae.pt`` and the T5 folder from the release folder (``release_weight_paths``)."""
        from mugen.models.dit.official import build_from_official_checkpoint
        from mugen.models.text.t5 import T5TextEncoder

        paths = release_weight_paths(weights_dir)
        device = torch.device(device)
        text_encoder = T5TextEncoder(paths["t5"], max_length=RELEASE_TEXT_TOKENS, device=device, dtype=t5_dtype)
        log.info("loading %s", paths["dit"])
        dit = build_from_official_checkpoint(paths["dit"])
        if dit.config.hidden_size != 3456 or dit.config.depth != 56:
            log.warning("%s is not the 10B size (hidden %d, depth %d); running it anyway", paths["dit"], dit.config.hidden_size, dit.config.depth)
        if dit.config.text_dim != text_encoder.dim:
            raise MugenError(
                f"{paths['dit']} expects {dit.config.text_dim}-d text features but {paths['t5']} gives {text_encoder.dim}-d; "
                "the release pairs its dit.pt with DeepFloyd t5-v1_1-xxl (4096)"
            )
        dit = dit.to(device=device, dtype=dtype)  # per tensor: the mmap'd file is cast as it is copied
        vae = load_release_vae(paths["vae"], device=device, dtype=dtype)
        if vae.latent_channels != dit.config.latent_channels:
            raise MugenError(
                f"{paths['vae']} has {vae.latent_channels} latent channels but {paths['dit']} expects "
                f"{dit.config.latent_channels}; use the vae.pt released with this dit.pt"
            )
        return cls(dit, vae, text_encoder, device=device, dtype=dtype)

    def encode_text(self, prompt: str, negative_prompt: str = RELEASE_NEGATIVE_PROMPT, aesthetic_score: float | None = RELEASE_AESTHETIC_SCORE) -> TextFeatures:
        if self.text_encoder is None:
            raise MugenError("this pipeline has no text encoder; pass text features to __call__")
        if not isinstance(prompt, str) or not prompt.strip():
            raise MugenError("the prompt is empty; the release generates from text and an image, describe the video")
        return self.text_encoder.encode([prompt_with_aesthetic_score(prompt, aesthetic_score), negative_prompt])

    @torch.no_grad()
    def __call__(
        self,
        image: str | os.PathLike | Tensor,
        prompt: str | None = None,
        aspect_ratio: str = "9:16",
        duration: int | str = 5,
        seed: int = RELEASE_SEED,
        num_steps: int = RELEASE_STEPS,
        guidance_scale: float = RELEASE_GUIDANCE,
        text: TextFeatures | None = None,
        frame_size: tuple[int, int] | None = None,
        num_frames: int | None = None,
        show_progress: bool = False,
        keep_trace: bool = False,
    ) -> ReleaseOutput:
        """Generate one clip. ``frame_size``/``num_frames`` override the 720p table (tests, previews).

        ``text``: (2, L, D) [prompt + suffix, negative] features already encoded; else ``prompt``.
        """
        height, width = frame_size if frame_size is not None else release_frame_size(aspect_ratio)
        num_frames = num_frames if num_frames is not None else release_num_frames(duration)
        if num_frames < 9 or (num_frames - 1) % VAE_TEMPORAL_FACTOR:
            raise MugenError(f"num_frames={num_frames}: the release makes 1 + 8k frames with k >= 1 (the image, then 8k generated), e.g. 105 or 73")
        if height < VAE_SPATIAL_FACTOR or width < VAE_SPATIAL_FACTOR:
            raise MugenError(f"frame size {height}x{width} is smaller than the VAE's 8x8 pixels per latent")
        micro_frames = getattr(getattr(self.vae, "config", None), "micro_frame_size", VAE_MICRO_FRAMES)
        latent_frames = release_latent_frames(num_frames, micro_frames)
        latent_h, latent_w = height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR
        if text is None:
            text = self.encode_text(prompt)
        if text.states.shape[0] != 2:
            raise MugenError(f"text features have {text.states.shape[0]} rows; expected 2 ([prompt, negative prompt])")
        text = text.to(self.device)
        generators = ReleaseNoise.from_seed(seed, self.device)

        if isinstance(image, Tensor):
            picture = image.float()
            if tuple(picture.shape) != (3, height, width):
                raise MugenError(f"image tensor has shape {tuple(picture.shape)}, expected (3, {height}, {width}) in [-1, 1]")
        else:
            picture = load_reference_image(image, (height, width))  # (3, H, W)
        clip = picture[:, None].repeat(1, VAE_TEMPORAL_FACTOR, 1, 1)[None]  # (1, 3, 8, H, W)
        # the release samples the VAE posterior, drawing on the CPU (generators.cpu), not the mean
        image_latent = self.vae.encode(clip.to(self.device, self.dtype), sample_posterior=True, generator=generators.cpu)  # (1, C, 1, h, w)
        channels = image_latent.shape[1]
        shape = (1, channels, latent_frames, latent_h, latent_w)
        if tuple(image_latent.shape) != (1, channels, 1, latent_h, latent_w):
            raise MugenError(f"the VAE encoded the image to {tuple(image_latent.shape)}, expected {(1, channels, 1, latent_h, latent_w)}")

        start = torch.randn(shape, generator=generators.device, device=self.device, dtype=self.dtype)
        start[:, :, :1] = image_latent
        noise = torch.randn(shape, generator=generators.device, device=self.device, dtype=self.dtype)
        noisy_frames = torch.ones(1, latent_frames, dtype=torch.bool, device=self.device)
        noisy_frames[:, 0] = False

        ratio = release_shift_ratio(height, width, latent_frames, self.dtype, self.device)
        timesteps = release_timesteps(num_steps, ratio)
        trace = [] if keep_trace else None
        with attention_backends(self.device):
            latents = release_sample(
                self.dit, text, start, noise, noisy_frames, timesteps, generators.device, guidance_scale=guidance_scale,
                show_progress=show_progress, trace=trace,
            )
        decoded = self.vae.decode(latents[:, :, 1:].to(self.dtype), num_frames=num_frames - 1)  # (1, 3, F - 1, H', W')
        first = picture[None, :, None].to(device=decoded.device, dtype=decoded.dtype)  # (1, 3, 1, H, W)
        first = first[..., : decoded.shape[-2], : decoded.shape[-1]]  # 1110/1108 -> 1104 (see docstring)
        video = torch.cat([first, decoded], dim=2)[0]  # (3, F, H', W')
        return ReleaseOutput(
            video=video.float().cpu(),
            latents=latents.float().cpu(),
            start_noise=noise.float().cpu(),
            image_latent=image_latent.float().cpu(),
            trace=trace or [],
        )


# ------------------------------------------------------------------------------ weights dir
RELEASE_LAYOUT = """\
DIR/
  dit.pt                   MUG-DiT 10B (MUG-V-inference)
  vae.pt                   the released video VAE (MUG-V-inference)
  t5-v1_1-xxl/             DeepFloyd/t5-v1_1-xxl: config.json, weights, spiece.model or tokenizer.json"""
T5_FOLDER_NAMES = ("t5-v1_1-xxl", "t5", "text_encoder")


def release_weight_paths(weights_dir: str | os.PathLike) -> dict[str, Path]:
    """Paths of dit.pt, vae.pt and the T5 folder in a release folder; MugenError naming what is missing."""
    root = Path(weights_dir).expanduser()
    if not root.is_dir():
        raise MugenError(f"--weights {root} is not a folder; it must hold:\n{RELEASE_LAYOUT}")
    paths = {"dit": root / "dit.pt", "vae": root / "vae.pt"}
    t5 = next((root / name for name in T5_FOLDER_NAMES if (root / name).is_dir()), None)
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if t5 is None:
        missing.append(f"{root}/t5-v1_1-xxl/ (or {', '.join(T5_FOLDER_NAMES[1:])}/)")
    if missing:
        raise MugenError(f"release folder {root} lacks {', '.join(missing)}; it must hold:\n{RELEASE_LAYOUT}")
    paths["t5"] = t5
    return paths


def load_release_vae(path: str | os.PathLike, device, dtype: torch.dtype):
    """The released VAE from ``vae.pt`` (``mugen.models.vae.loading``: a smaller test-size file may
    carry its sizes in ``vae.config.json`` beside it)."""
    from mugen.models.vae.loading import load_vae
    from mugen.models.vae.official import ReleasedVideoVAE

    vae = load_vae(path, device=device, dtype=dtype)
    if not isinstance(vae, ReleasedVideoVAE):
        raise MugenError(f"{path} is not the released VAE (it loads as mugen's own VAE); the release needs its vae.pt")
    return vae
