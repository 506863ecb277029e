"""Video VAE presets and config validation."""

import pytest

from mugen.errors import MugenError
from mugen.models.vae import VAE_PRESETS, VideoVAE, VideoVAEConfig, vae_config


def test_unknown_preset_lists_the_names():
    with pytest.raises(MugenError) as error:
        vae_config("huge")
    message = str(error.value)
    assert "'huge'" in message
    for name in VAE_PRESETS:
        assert name in message


def test_presets_are_fresh_objects_with_the_report_design():
    first, second = vae_config("tiny"), vae_config("tiny")
    assert first == second and first is not second
    paper = vae_config("paper")
    assert paper.stage_channels == (128, 256, 512, 512)  # SDXL-VAE-like widths
    for config in (first, paper):
        config.validate()
        assert config.latent_channels == 24
        assert config.temporal_chunk == config.spatial_factor == 8 == 2**config.num_down_stages
        assert config.decoder_windows == (1, 4, 8)


def test_config_survives_a_json_style_round_trip():
    config = VideoVAEConfig(channel_multipliers=[1, 2, 2, 4], decoder_windows=[1, 4, 8])
    assert config.channel_multipliers == (1, 2, 2, 4)
    assert config.decoder_windows == (1, 4, 8)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"temporal_chunk": 4}, "temporal_chunk=4"),
        ({"channel_multipliers": (1, 2)}, "compress by 2"),
        ({"channel_multipliers": (1,)}, "fewer than 2"),
        ({"base_channels": 12, "norm_groups": 8}, "not divisible by norm_groups=8"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"decoder_windows": (0, 4)}, "decoder_windows"),
    ],
)
def test_invalid_configs_are_refused(changes, message):
    config = VideoVAEConfig(**{**vars(vae_config("tiny")), **changes})
    with pytest.raises(MugenError, match=message):
        VideoVAE(config)
