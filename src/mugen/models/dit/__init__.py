from mugen.models.dit.model import MUGDiT, MUGDiTConfig
from mugen.models.dit.presets import DIT_PRESETS, dit_config

__all__ = ["MUGDiT", "MUGDiTConfig", "DIT_PRESETS", "dit_config"]
