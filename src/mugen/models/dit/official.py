"""MUG-DiT weights in the official release's layouts: ``dit.pt`` and single-file safetensors.

The released ``dit.pt`` is a plain ``{name: tensor}`` dict written with ``torch.save`` and read with
``torch.load(weights_only=True)`` into the model strictly. mugen's ``MUGDiT`` uses the release's
parameter names and shapes (proved against the reference code in
``tests/unit/models/dit/test_dit_reference_parity.py``), so no renaming is needed in either
direction: export writes ``model.state_dict()`` as it is, import loads a file strictly.

The state dict alone fixes the model's size (see ``infer_dit_config``), so a file that does not fit
is reported with the preset it looks like.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mugen.atomic import write_atomically
from mugen.errors import MugenError
from mugen.models.state_files import read_state_dict_file, state_dict_problems
from mugen.models.dit.model import MUGDiT, MUGDiTConfig
from mugen.models.dit.presets import DIT_PRESETS

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


# ------------------------------------------------------------------------------------- export
def _exportable_tensors(model_or_state_dict: nn.Module | dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """A plain dict of contiguous CPU tensors, each owning its storage (no views, no shared memory).

    ``dtype`` casts floating-point tensors (e.g. bfloat16, the dtype the release runs in); None keeps them.
    """
    state_dict = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    tensors = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            raise MugenError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor; pass a model or a state dict")
        if tensor.is_meta:
            raise MugenError(f"state dict entry {name!r} is on the meta device (no values); load weights before exporting")
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        owns_storage = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        if not (tensor.is_contiguous() and owns_storage and tensor.storage_offset() == 0):
            tensor = tensor.contiguous().clone()  # a view would drag its whole base storage into the file
        tensors[name] = tensor
    # Tensors that still share memory (tied weights, two names for one storage) are copied apart:
    # safetensors refuses them and torch.save would tie them in the file.
    seen: set[int] = set()
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        if tensor.numel() and pointer in seen:
            tensors[name] = tensor.clone()
        seen.add(pointer)
    return tensors


def export_official_checkpoint(
    model_or_state_dict: nn.Module | dict[str, Tensor], path: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write the official ``dit.pt`` layout: ``torch.save`` of a plain ``{name: tensor}`` dict (atomic)."""
    tensors = _exportable_tensors(model_or_state_dict, dtype)
    return write_atomically(path, lambda temporary: torch.save(tensors, temporary))


def export_safetensors(
    model_or_state_dict: nn.Module | dict[str, Tensor], path: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write the state dict as one ``.safetensors`` file with the official names (atomic)."""
    tensors = _exportable_tensors(model_or_state_dict, dtype)
    return write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata={"format": "pt"}))


# ---------------------------------------------------------------------------- size inference
def infer_dit_config(state_dict: dict[str, Tensor], **overrides) -> MUGDiTConfig:
    """The MUGDiTConfig whose parameters have these shapes (values are not read: meta tensors work).

    hidden size, latent channels and patch from ``x_embedder.proj.weight`` (d, C, p_t, p_h, p_w); depth
    from the highest block index; text width from ``y_embedder.y_proj.fc1.weight`` (d, text_dim); MLP
    ratio from ``blocks.0.mlp.fc1.weight``; head dim (hence heads) from the QK-norm gain. Fields the
    file cannot tell (RoPE theta, default fps) keep their defaults unless given in ``overrides``.
    """
    required = ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "blocks.0.mlp.fc1.weight")
    absent = [name for name in required if name not in state_dict]
    if absent:
        raise MugenError(f"state dict lacks {', '.join(absent)}; it is not a MUG-DiT state dict")
    hidden_size, latent_channels, *patch_size = state_dict["x_embedder.proj.weight"].shape
    depth = 1 + max(int(match.group(1)) for name in state_dict if (match := _BLOCK_KEY.match(name)))
    qk_norm = "blocks.0.attn.q_norm.weight" in state_dict
    # Without QK-norm nothing stores the head dim; 72 is the head dim of every official size.
    head_dim = state_dict["blocks.0.attn.q_norm.weight"].shape[0] if qk_norm else 72
    values = dict(
        hidden_size=hidden_size,
        depth=depth,
        num_heads=hidden_size // head_dim,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size,
        latent_channels=latent_channels,
        patch_size=tuple(patch_size),
        text_dim=state_dict["y_embedder.y_proj.fc1.weight"].shape[1],
        qk_norm=qk_norm,
    )
    return MUGDiTConfig(**{**values, **overrides})


def matching_preset(config: MUGDiTConfig) -> str | None:
    """Name of the preset with this width, depth and head count (text width aside), or None."""
    for name, build in DIT_PRESETS.items():
        preset = build()
        if (preset.hidden_size, preset.depth, preset.num_heads) == (config.hidden_size, config.depth, config.num_heads):
            return name
    return None


def describe_size(config: MUGDiTConfig) -> str:
    preset = matching_preset(config)
    shape = f"hidden {config.hidden_size}, depth {config.depth}, {config.num_heads} heads, text width {config.text_dim}"
    return f"preset {preset!r} ({shape})" if preset else f"no preset ({shape})"


# ------------------------------------------------------------------------------------- import
def read_official_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read ``dit.pt`` (``torch.load(weights_only=True)``) or a ``.safetensors`` file onto the CPU."""
    return read_state_dict_file(
        path,
        "DiT checkpoint",
        expected=".pt (official dit.pt) or .safetensors",
        missing_hint="pass the official dit.pt or a .safetensors export",
        resave_hint="export it with `mugen convert` or torch.save(model.state_dict(), path)",
        wrapper_hint="save model.state_dict() itself, not a wrapper around it",
    )


def check_state_dict_fits(state_dict: dict[str, Tensor], model: MUGDiT, source: str) -> None:
    """Raise MugenError naming ``source`` unless every name and shape matches ``model`` both ways."""
    problems = state_dict_problems(state_dict, model.state_dict())
    if not problems:
        return
    try:
        file_size = describe_size(infer_dit_config(state_dict))
    except MugenError:
        file_size = "no MUG-DiT layout"
    raise MugenError(
        f"DiT checkpoint {source} does not fit the model: {'; '.join(problems)}. The file looks like {file_size}, "
        f"the model is {describe_size(model.config)}; build the model with the file's size (mugen.models.dit.dit_config)"
    )


def load_official_checkpoint(path: str | os.PathLike, model: MUGDiT) -> MUGDiT:
    """Load ``dit.pt`` or ``.safetensors`` into ``model`` strictly; returns ``model``.

    Values are copied into the model's parameters (cast to their dtype); a model on the meta device
    takes the file's tensors as they are.
    """
    state_dict = read_official_state_dict(path)
    check_state_dict_fits(state_dict, model, str(path))
    on_meta = any(parameter.is_meta for parameter in model.parameters())
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
    return model


def build_from_official_checkpoint(path: str | os.PathLike, **overrides) -> MUGDiT:
    """A MUGDiT sized from the file itself, with its weights (``overrides`` set e.g. ``rope_theta``)."""
    config_fields = {field.name for field in fields(MUGDiTConfig)}
    unknown = set(overrides) - config_fields
    if unknown:
        raise MugenError(f"unknown MUGDiTConfig fields {sorted(unknown)}; choose from {sorted(config_fields)}")
    state_dict = read_official_state_dict(path)
    config = infer_dit_config(state_dict, **overrides)
    with torch.device("meta"):
        model = MUGDiT(config)
    check_state_dict_fits(state_dict, model, str(path))
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()
