"""MugenVideoPipeline: T2V/I2V/TI2V semantics on tiny random networks."""

import pytest
import torch

from mugen.errors import MugenError
from mugen.infer.pipeline import MugenVideoPipeline
from mugen.models.dit import MUGDiT, dit_config
from mugen.models.text.base import TextEncoder, TextFeatures
from mugen.models.vae.model import VideoVAE
from mugen.models.vae.presets import vae_config


class HashTextEncoder(TextEncoder):
    """Deterministic per-word features; enough to tell prompts apart without a language model."""

    name = "hash"
    dim = 384
    max_length = 16

    def _encode(self, prompts):
        words = [p.split()[: self.max_length] or ["<null>"] for p in prompts]
        length = max(len(w) for w in words)
        states = torch.zeros(len(prompts), length, self.dim)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for row, sentence in enumerate(words):
            for col, word in enumerate(sentence):
                states[row, col] = torch.randn(self.dim, generator=torch.Generator().manual_seed(hash(word) % 2**31))
                mask[row, col] = True
        return TextFeatures(states, mask)

    def to(self, device):
        return self


@pytest.fixture(scope="module")
def pipeline():
    torch.manual_seed(0)
    dit = MUGDiT(dit_config("debug", depth=1))
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.02)
    for block in dit.blocks:  # zero-initialised cross-attention would make every prompt alike
        torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.02)
    vae = VideoVAE(vae_config("tiny"))
    return MugenVideoPipeline(dit, vae, HashTextEncoder())


def test_text_to_video_shapes_and_determinism(pipeline):
    args = dict(prompt="a red circle moving left", num_frames=9, height=32, width=32, num_inference_steps=2)
    out = pipeline(**args, generator=torch.Generator().manual_seed(1))
    assert out.frames.shape == (1, 3, 9, 32, 32) and out.latents.shape == (1, 24, 2, 4, 4)
    again = pipeline(**args, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.frames, again.frames)
    other = pipeline(**{**args, "prompt": "a blue square moving up"}, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out.latents, other.latents)


def test_image_conditioning_keeps_the_image_latent_and_first_frame(pipeline):
    image = torch.rand(3, 32, 32) * 2 - 1
    for prompt in (None, "a green triangle moving right"):  # I2V and TI2V
        out = pipeline(prompt=prompt, image=image, num_frames=17, height=32, width=32, num_inference_steps=3, generator=torch.Generator().manual_seed(2))
        expected_latent = pipeline.vae.encode_images(image[None])
        torch.testing.assert_close(out.latents[:, :, :1], expected_latent)
        torch.testing.assert_close(out.frames[0, :, 0], image)
        assert out.frames.shape == (1, 3, 17, 32, 32)


def test_batched_prompts_with_one_image(pipeline):
    image = torch.rand(3, 32, 32) * 2 - 1
    out = pipeline(prompt=["a", "b"], image=image, num_frames=9, height=32, width=32, num_inference_steps=2)
    assert out.frames.shape[0] == 2
    torch.testing.assert_close(out.latents[0, :, 0], out.latents[1, :, 0])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompt="x", height=40, width=32), "divisible by 16"),
        (dict(prompt="x", num_frames=8), r"1 \+ 8k"),
        (dict(prompt=" "), "empty"),
        (dict(), "give a prompt"),
        (dict(prompt=["a", "b"], negative_prompt=["n"]), "negative prompts"),
    ],
)
def test_bad_requests_are_user_errors(pipeline, kwargs, message):
    with pytest.raises(MugenError, match=message):
        pipeline(**{"height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 1, **kwargs})


def test_negative_prompt_steers_only_under_guidance(pipeline):
    args = dict(prompt="a red circle", num_frames=9, height=32, width=32, num_inference_steps=2)
    plain = pipeline(**args, guidance_scale=3.0, generator=torch.Generator().manual_seed(3))
    negative = pipeline(**args, negative_prompt="blurry dark", guidance_scale=3.0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(plain.latents, negative.latents)
    off = pipeline(**args, guidance_scale=1.0, generator=torch.Generator().manual_seed(3))
    off_negative = pipeline(**args, negative_prompt="blurry dark", guidance_scale=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(off.latents, off_negative.latents)
