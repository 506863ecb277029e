"""Text-to-video, image-to-video and text+image-to-video generation (seed §3.2, §4.2).

The pipeline takes diffusers-style arguments (``prompt``, ``negative_prompt``, ``image``,
``num_frames``, ``height``, ``width``, ``num_inference_steps``, ``guidance_scale``, ``generator``)
and returns a ``VideoPipelineOutput``. Classifier-free guidance runs the conditional and the
unconditional (negative-prompt) halves as one batched forward (``mugen.flow.sampler``).

Frame layout (``mugen.models.vae.frames``): ``num_frames = 1 + 8k`` frames <-> ``1 + k`` latents.
Image conditioning puts the image's latent at latent 0 and masks it as a clean frame; the output's
first frame is then the conditioning image itself, as in the MUG-V release.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mugen.errors import MugenError
from mugen.flow.sampler import FlowSamplerConfig, euler_sample
from mugen.flow.timesteps import resolution_shift_ratio
from mugen.models.text.base import TextEncoder, concat_text_features
from mugen.models.vae.frames import decode_clip, latent_frames_for
from mugen.train.tasks import model_velocity_fn


@dataclass
class VideoPipelineOutput:
    frames: Tensor  # (B, 3, T, H, W) in [-1, 1]
    latents: Tensor  # (B, C, 1 + k, H/8, W/8) normalised latents


class MugenVideoPipeline:
    def __init__(
        self,
        dit,
        vae,
        text_encoder: TextEncoder,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        shift_base_resolution: int = 512 * 512,
    ):
        self.shift_base_resolution = shift_base_resolution  # must match training (DiTTaskConfig)
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.dit = dit.to(self.device).eval()
        self.vae = vae.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, device: str | torch.device = "cpu", vae: str | None = None, text_encoder: str | None = None, preset: str | None = None) -> "MugenVideoPipeline":
        """Rebuild DiT, VAE and text encoder from a `mugen train dit` run folder."""
        from mugen.models.dit.io import load_dit
        from mugen.models.text.base import build_text_encoder
        from mugen.models.vae.loading import load_vae

        dit, record = load_dit(checkpoint, device, preset=preset)
        vae_dir = vae or record.get("vae")
        if not vae_dir:
            raise MugenError(f"checkpoint {checkpoint} names no VAE; pass --vae (a mugen VAE folder or the released vae.pt)")
        spec = text_encoder or record.get("text_encoder", "minilm")
        encoder = build_text_encoder(spec, device=device)
        if encoder.dim != dit.config.text_dim:
            raise MugenError(f"text encoder {spec!r} gives {encoder.dim}-d features but the DiT expects {dit.config.text_dim}; use the encoder it was trained with")
        vae_model = load_vae(vae_dir, device=device)  # mugen's VideoVAE folder or the released vae.pt
        return cls(dit, vae_model, encoder, device=device, shift_base_resolution=record.get("shift_base_resolution", 512 * 512))

    def _check_request(self, num_frames: int, height: int, width: int) -> int:
        if height % 16 or width % 16 or height <= 0 or width <= 0:
            raise MugenError(f"size {height}x{width} is not divisible by 16 (VAE 8x and 2x2 patches); use e.g. {max(16, height // 16 * 16)}x{max(16, width // 16 * 16)}")
        return latent_frames_for(num_frames, "num_frames")

    def _prepare_image(self, image, height: int, width: int, batch: int) -> Tensor:
        from mugen.data.video_io import read_image, resize_center_crop

        if isinstance(image, (str, os.PathLike)):
            image = read_image(Path(image), (height, width))  # (3, H, W)
        image = image.float()
        if image.ndim == 3:
            image = image[None]
        image = torch.stack([resize_center_crop(i, (height, width)) for i in image])  # (B', 3, H, W)
        if image.shape[0] == 1 and batch > 1:
            image = image.expand(batch, -1, -1, -1)
        if image.shape[0] != batch:
            raise MugenError(f"got {image.shape[0]} images for {batch} prompts; give one image or one per prompt")
        return image.to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        image: Tensor | str | os.PathLike | None = None,
        num_frames: int = 17,
        height: int = 64,
        width: int = 64,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        fps: float = 8.0,
        generator: torch.Generator | None = None,
        cond_latents: Tensor | None = None,
        frame_cond_mask: Tensor | None = None,
        show_progress: bool = False,
    ) -> VideoPipelineOutput:
        """Generate; ``image`` gives I2V (no prompt) or TI2V (with prompt); ``cond_latents`` with
        ``frame_cond_mask`` (B, 1 + k) conditions any latent frames (e.g. video continuation)."""
        latent_frames = self._check_request(num_frames, height, width)
        if prompt is None and image is None and cond_latents is None:
            raise MugenError("give a prompt (text-to-video), an image (image-to-video) or both")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [""])
        batch = len(prompts)
        text = self.text_encoder.encode(prompts, allow_empty=image is not None or cond_latents is not None)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch
        if len(negatives) != batch:
            raise MugenError(f"got {len(negatives)} negative prompts for {batch} prompts")
        if guidance_scale != 1.0:
            text = concat_text_features(text, self.text_encoder.encode(negatives, allow_empty=True))
        text = text.to(self.device, self.dtype)

        channels = self.dit.config.latent_channels
        shape = (batch, channels, latent_frames, height // 8, width // 8)
        generator = generator or torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(self.device)

        image_tensor = None
        if image is not None:
            image_tensor = self._prepare_image(image, height, width, batch)
            image_latent = self.vae.encode_images(image_tensor)  # (B, C, 1, h, w)
            cond_latents = torch.zeros(shape, device=self.device) if cond_latents is None else cond_latents.to(self.device).clone()
            cond_latents[:, :, :1] = image_latent
            frame_cond_mask = torch.zeros(batch, latent_frames, dtype=torch.bool, device=self.device) if frame_cond_mask is None else frame_cond_mask.to(self.device).clone()
            frame_cond_mask[:, 0] = True
        if (cond_latents is None) != (frame_cond_mask is None):
            raise MugenError("cond_latents and frame_cond_mask go together; give both or neither")

        fps_tensor = torch.full((text.states.shape[0],), float(fps), device=self.device)
        velocity = model_velocity_fn(self.dit, text, fps_tensor)
        config = FlowSamplerConfig(
            num_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            shift_ratio=resolution_shift_ratio(height, width, latent_frames, self.shift_base_resolution),
            show_progress=show_progress,
        )
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with autocast:
            latents = euler_sample(velocity, noise, config, cond_latents, frame_cond_mask)
        frames = decode_clip(self.vae, latents.float())
        if image_tensor is not None:
            frames[:, :, 0] = image_tensor  # the release outputs the reference image as frame 0
        return VideoPipelineOutput(frames=frames.clamp(-1, 1).cpu(), latents=latents.float().cpu())


def save_generation(frames: Tensor, output: str | os.PathLike, fps: float, label: str | None = None) -> tuple[Path, Path]:
    """Write one (3, T, H, W) clip as H.264 MP4 and a PNG contact sheet beside it."""
    from mugen.data.video_io import write_contact_sheet, write_video

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    video_path = write_video(output, frames, fps=fps)
    sheet_path = write_contact_sheet(output.with_suffix(".png"), frames, label=label)
    return video_path, sheet_path
