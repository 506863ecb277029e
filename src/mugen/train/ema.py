"""Online exponential moving average of model weights (seed §4.2.3 "Annealed SFT with post-EMA").

The report compares this online EMA with a post-hoc EMA (``posthoc_ema.py``). The EMA is a small
object in the EDM2 style: ``update(model)`` after every applied optimizer step, ``copy_to(model)``
for evaluation, ``state_dict``/``load_state_dict`` so the Trainer checkpoints it::

    ema = EMA(model, decay=0.9999)
    Trainer(..., extra_state=lambda: {"ema": ema}, on_step_end=lambda step, model: ema.update(model))

The shadow holds one tensor per parameter and buffer, made with ``detach().clone()`` from whatever
``model.parameters()`` gives: with FSDP2 these are DTensors, so the shadow is sharded the same way
and every update is local to a rank. Plain tensors are updated with one ``torch._foreach_lerp_``;
DTensors fall back to one ``lerp_`` each.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mugen.errors import MugenError

try:  # DTensor lives in torch.distributed.tensor from torch 2.5 on
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = ()


def warmup_decay(decay: float, updates: int) -> float:
    """Decay used for the ``updates``-th update (1-based) when warm-up is on.

    ``min(decay, (1 + n) / (10 + n))``: the first updates follow the model closely, so the average
    is not dominated by the random initial weights (the ``num_updates`` rule of TensorFlow's
    ExponentialMovingAverage; EDM2 gets the same effect from its power-function profile).
    """
    return min(decay, (1.0 + updates) / (10.0 + updates))


class EMA:
    """``shadow <- decay * shadow + (1 - decay) * weights`` for floating-point parameters; buffers copied."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise MugenError(f"EMA: decay={decay} must be in [0, 1); typical values are 0.999 to 0.9999")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {
                name: tensor.detach().clone() for name, tensor in self._named_tensors(model).items()
            }

    @staticmethod
    def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
        named = dict(model.named_parameters())
        named.update(dict(model.named_buffers()))
        return named

    def current_decay(self) -> float:
        """Decay the next ``update`` will use."""
        return warmup_decay(self.decay, self.updates + 1) if self.warmup else self.decay

    def _matching_tensors(self, model: nn.Module, caller: str) -> dict[str, Tensor]:
        named = self._named_tensors(model)
        if named.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - named.keys())[:3]
            unexpected = sorted(named.keys() - self.shadow.keys())[:3]
            raise MugenError(
                f"EMA.{caller}: the model's tensors differ from the EMA's (missing {missing}, unexpected {unexpected}); "
                "pass the model the EMA was built from"
            )
        return named

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow toward the model's current weights by ``1 - current_decay()``."""
        named = self._matching_tensors(model, "update")
        weight = 1.0 - self.current_decay()
        parameter_names = {name for name, _ in model.named_parameters()}
        plain_shadows: list[Tensor] = []
        plain_targets: list[Tensor] = []
        for name, tensor in named.items():
            shadow = self.shadow[name]
            if name not in parameter_names or not tensor.is_floating_point():
                shadow.copy_(tensor)  # buffers (and integer parameters) are copied, not averaged
            elif isinstance(tensor, DTensor) or isinstance(shadow, DTensor):
                shadow.lerp_(tensor.detach(), weight)  # local to each shard
            else:
                plain_shadows.append(shadow)
                plain_targets.append(tensor.detach())
        if plain_shadows:
            torch._foreach_lerp_(plain_shadows, plain_targets, weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters and buffers with the averaged ones."""
        for name, tensor in self._matching_tensors(model, "copy_to").items():
            tensor.copy_(self.shadow[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = state["shadow"]
        if saved.keys() != self.shadow.keys():
            raise MugenError(
                f"EMA.load_state_dict: the saved EMA has tensors {sorted(saved)[:3]}... but this one has "
                f"{sorted(self.shadow)[:3]}...; load the EMA saved with this model"
            )
        for name, shadow in self.shadow.items():
            if tuple(saved[name].shape) != tuple(shadow.shape):
                raise MugenError(
                    f"EMA.load_state_dict: {name} is {tuple(saved[name].shape)} in the saved EMA but "
                    f"{tuple(shadow.shape)} here; build the model with the config it was trained with"
                )
            shadow.copy_(saved[name])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.updates = int(state["updates"])


class PowerFunctionEMA(EMA):
    """EDM2's power-function EMA (Karras et al. 2024, eq. 2-3), tracked online for post-hoc EMA.

    The ``t``-th update uses ``beta_t = (1 - 1/t)^(gamma + 1)``, so the average seen at step ``t``
    weighs the weights of step ``tau`` by ``(tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)``: its
    width is a fixed fraction ``sigma_rel`` of the training length. Snapshots of two such EMAs
    (EDM2 uses sigma_rel 0.05 and 0.10) let ``mugen posthoc-ema --method power`` rebuild an EMA of
    any other width after training (``mugen.train.posthoc_ema.solve_posthoc_ema_weights``).
    """

    def __init__(self, model: nn.Module, sigma_rel: float):
        from mugen.train.posthoc_ema import gamma_from_sigma_rel

        super().__init__(model, decay=0.0, warmup=False)
        self.sigma_rel = float(sigma_rel)
        self.gamma = gamma_from_sigma_rel(self.sigma_rel)

    def current_decay(self) -> float:
        from mugen.train.posthoc_ema import power_function_beta

        return power_function_beta(self.updates + 1, self.gamma)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "sigma_rel": self.sigma_rel, "gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        if abs(float(state.get("sigma_rel", -1.0)) - self.sigma_rel) > 1e-12:
            raise MugenError(
                f"PowerFunctionEMA.load_state_dict: the saved EMA has sigma_rel={state.get('sigma_rel')} but this one "
                f"{self.sigma_rel}; resume with the same --power-ema-sigma-rel values"
            )
        super().load_state_dict(state)
        self.gamma = float(state["gamma"])


def power_ema_file_name(sigma_rel: float) -> str:
    """File of a snapshot that holds the power-function EMA of width ``sigma_rel``."""
    return f"power_ema_{sigma_rel:.4f}.safetensors"


def save_averaged_weights(ema: EMA, model: nn.Module, path) -> None:
    """Write the EMA's tensors as a model file that ``load_model_weights`` reads (atomically).

    ``model`` (the one the EMA was built from) gives the names and the tied aliases of its state
    dict; its own weights are not read. Sharded (DTensor) shadows are gathered first.
    """
    import json

    from safetensors.torch import save_file

    from mugen.atomic import write_atomically
    from mugen.train.checkpoint import _ALIASES_KEY

    shadow_name_of = {id(tensor): name for name, tensor in EMA._named_tensors(model).items()}
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    stored_as: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        source = shadow_name_of.get(id(tensor))
        if source is None:
            raise MugenError(f"save_averaged_weights: state dict entry {name} is no parameter or buffer the EMA tracks")
        if source in stored_as:  # tied weights: stored once
            aliases[name] = stored_as[source]
            continue
        value = ema.shadow[source].detach()
        if isinstance(value, DTensor):
            value = value.full_tensor()
        tensors[name] = value.to("cpu").contiguous().clone()
        stored_as[source] = name
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata={_ALIASES_KEY: json.dumps(aliases)}))
