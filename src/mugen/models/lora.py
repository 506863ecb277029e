"""LoRA: low-rank adapters for fine-tuning large MUG-DiT presets on few GPUs.

A wrapped layer computes ``base(x) + scale * lora_up(lora_down(dropout(x)))`` with
``scale = alpha / rank``. ``lora_down`` (rank x in) starts Kaiming-uniform and ``lora_up``
(out x rank) starts at zero, so a freshly wrapped model gives exactly the output of the original.
The base ``nn.Linear`` stays inside the wrapper as ``.base`` and is frozen; only adapters train.

Everything here is model-agnostic and applied from outside the model (no model file knows about
LoRA): layers are chosen by module-name suffix, e.g. ``attn.qkv`` matches ``blocks.3.attn.qkv``
but not ``blocks.3.cross_attn.qkv`` (suffixes are matched on whole dotted components).

Parallelism: this file has no distributed code. The adapters are ordinary ``nn.Linear``
submodules named ``lora_down`` / ``lora_up`` (and the base is ``base``), so tensor-parallel and
FSDP plans keyed by module name can address them, e.g. ``blocks.*.attn.qkv.base`` column-wise and
``blocks.*.attn.qkv.lora_up`` column-wise with ``lora_down`` replicated. Apply LoRA *before*
parallelising, so that the plan sees the wrapped names; FSDP then shards units that mix frozen
base weights and trainable adapters (FSDP2 ``fully_shard`` handles that; FSDP1 needs
``use_orig_params=True``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from mugen.errors import MugenError

DEFAULT_TARGETS: tuple[str, ...] = (
    "attn.qkv",
    "attn.proj",
    "cross_attn.q_linear",
    "cross_attn.kv_linear",
    "cross_attn.proj",
    "mlp.fc1",
    "mlp.fc2",
)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``scale * up @ down``."""

    def __init__(self, base: nn.Linear, rank: int = 16, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        check_lora_settings(rank, alpha, dropout)
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, **factory)  # weight (r, in)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, **factory)  # weight (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapters()

    def reset_adapters(self) -> None:
        """Kaiming-uniform ``down`` (as ``nn.Linear`` does), zero ``up``: the update starts at 0."""
        if self.lora_down.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        update = self.lora_up(self.lora_down(self.dropout(x)))  # (..., in) -> (..., r) -> (..., out)
        return self.base(x) + self.scale * update

    def merged_weight(self) -> Tensor:
        """``base.weight + scale * up @ down`` computed in fp32, in the base's dtype: (out, in)."""
        delta = self.lora_up.weight.float() @ self.lora_down.weight.float()  # (out, r) @ (r, in)
        return (self.base.weight.float() + self.scale * delta).to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}"


def check_lora_settings(rank: int, alpha: float, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise MugenError(f"LoRA rank {rank!r} is invalid; pass a positive integer such as 16")
    if not math.isfinite(alpha) or alpha <= 0:
        raise MugenError(f"LoRA alpha {alpha!r} is invalid; pass a positive number (alpha = rank gives scale 1)")
    if not 0.0 <= dropout < 1.0:
        raise MugenError(f"LoRA dropout {dropout!r} is invalid; pass a probability in [0, 1)")


def matches_target(name: str, target: str) -> bool:
    """Whether a module name ends with ``target`` on whole dotted components."""
    return name == target or name.endswith("." + target)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Wrapped layers of ``model`` by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def linear_name_summary(model: nn.Module) -> str:
    """The model's Linear names with block indices collapsed (``blocks.N.attn.qkv``), for errors."""
    names = {re.sub(r"\.\d+(?=\.|$)", ".N", name) for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return ", ".join(sorted(names)) or "(none)"


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 16,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every ``nn.Linear`` whose name ends with one of ``targets`` in a ``LoRALinear``.

    Freezes every other parameter of ``model`` (only the adapters stay trainable) and returns the
    wrapped module names, in module order. The model is changed in place.
    """
    check_lora_settings(rank, alpha, dropout)
    if isinstance(targets, str):
        targets = (targets,)
    if not targets:
        raise MugenError("LoRA targets are empty; pass module-name suffixes such as ('attn.qkv', 'mlp.fc1')")
    if lora_layers(model):
        raise MugenError("model already has LoRA adapters; call merge_lora(model) before applying LoRA again")
    chosen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(matches_target(name, target) for target in targets)
    ]
    if not chosen:
        raise MugenError(
            f"LoRA targets {list(targets)} match no nn.Linear in {type(model).__name__}; "
            f"use suffixes of these Linear names: {linear_name_summary(model)}"
        )
    model.requires_grad_(False)
    for name in chosen:
        replace_submodule(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return chosen


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight and put the plain ``nn.Linear`` back, in place.

    The merged weight keeps the base's dtype (the sum is formed in fp32 first). ``requires_grad``
    flags are left as they were (base weights stay frozen); returns ``model`` for chaining.
    """
    for name, layer in lora_layers(model).items():
        with torch.no_grad():
            layer.base.weight.copy_(layer.merged_weight())
        replace_submodule(model, name, layer.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors: ``{"<layer>.lora_down.weight": (r, in), "<layer>.lora_up.weight": (out, r)}``."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_down.weight"] = layer.lora_down.weight.detach().clone()
        state[f"{name}.lora_up.weight"] = layer.lora_up.weight.detach().clone()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter tensors from ``lora_state_dict`` into a model already wrapped by ``apply_lora``."""
    expected = lora_state_dict_shapes(model)
    if not expected:
        raise MugenError("model has no LoRA adapters to load into; call apply_lora(model, ...) first")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise MugenError(
            f"LoRA state does not fit the model: missing {preview(missing)}, unexpected {preview(unexpected)}; "
            "apply_lora with the same targets as when the adapters were saved"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise MugenError(
                f"LoRA tensor {key} has shape {tuple(state[key].shape)} but the model expects {shape}; "
                "apply_lora with the rank the adapters were trained with"
            )
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in state.items():
            parameters[key].copy_(tensor)


def lora_state_dict_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, layer in lora_layers(model).items():
        shapes[f"{name}.lora_down.weight"] = tuple(layer.lora_down.weight.shape)
        shapes[f"{name}.lora_up.weight"] = tuple(layer.lora_up.weight.shape)
    return shapes


def preview(names: Iterable[str], limit: int = 3) -> str:
    names = list(names)
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (after ``apply_lora``: the adapters), for the optimiser."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]
