"""Preference optimisation of MUG-DiT under rectified flow: Flow-DPO, Flow-KTO and RDPO pairs.

Seed §4.2.3 "Preference optimisation": pairwise better/worse labels (motion quality) train with DPO,
absolute desirable/undesirable labels (artefacts, physical implausibility) with KTO; the SFT
objective stays on as a regulariser, and batches from several annotation sources are interleaved.
Seed appendix A.2 adds RDPO, which builds pairs from real videos without labels.

Likelihoods of a flow model are intractable, so, as in Diffusion-DPO (Wallace et al. 2023) and
Diffusion-KTO (Li et al. 2024), the log-likelihood ratio ``log p_theta(x) / p_ref(x)`` is replaced by
the negative difference of per-sample flow-matching errors at one shared (noise, t):

    err(m, x) = mean over (C, T, H, W) of (v_m(x_t, t) - (x - noise))^2      (flow_matching_loss)
    implicit reward r(x) = -(err(policy, x) - err(reference, x))

Preference manifest columns (one row per batch entry; the loaders turn them into these keys):

* DPO (``FlowDPOTask``): ``latents_w`` (B, C, T, H, W) preferred clip, ``latents_l`` (B, C, T, H, W)
  rejected clip of the same prompt (same shape), ``text_states`` (B, L, D), ``text_mask`` (B, L)
  bool, ``fps`` (B,) (0 = unknown, replaced by the model's default).
* KTO (``FlowKTOTask``): ``latents`` (B, C, T, H, W), ``label`` (B,) 1 = desirable, 0 = undesirable,
  ``text_states``, ``text_mask``, ``fps`` as above.

``build_rdpo_pairs`` turns a plain SFT batch into a DPO batch; ``interleave_sources`` mixes batches
from several annotation sources in a configured ratio.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mugen.errors import MugenError
from mugen.flow.objective import flow_matching_loss
from mugen.flow.sampler import FlowSamplerConfig, euler_sample
from mugen.flow.timesteps import resolution_shift_ratio, sample_training_timesteps
from mugen.models.text.base import TextFeatures
from mugen.train.tasks import model_velocity_fn
from mugen.train.trainer import LossOutput

# ----------------------------------------------------------------------------------------------
# Closed-form losses on per-sample flow-matching errors
# ----------------------------------------------------------------------------------------------


def _check_same_shape(name_tensors: dict[str, Tensor]) -> None:
    shapes = {name: tuple(tensor.shape) for name, tensor in name_tensors.items()}
    first = next(iter(shapes.values()))
    if any(shape != first or len(shape) != 1 for shape in shapes.values()):
        raise MugenError(f"preference loss: per-sample errors must all be (B,) of one size; got {shapes}")


def _check_beta(beta: float) -> None:
    if not math.isfinite(beta) or beta <= 0:
        raise MugenError(f"preference loss: beta={beta!r} must be finite and positive (e.g. 2500 for mean errors)")


def dpo_loss(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """Flow-DPO loss per pair, (B,).

    ``loss = -log sigmoid(-beta * ((policy_w - ref_w) - (policy_l - ref_l)))`` where each argument is
    the (B,) flow-matching error of the policy or the frozen reference on the winner (w) or loser
    (l), all four at the same noise and t. The loss falls when the policy's error on the winner
    falls relative to the reference's (and rises on the loser). It is log 2 when policy == reference.

    Diffusion-DPO (Wallace et al. 2023, eq. 14) writes ``-log sigmoid(-beta T omega(lambda_t) (...))``
    with summed squared errors; its released code uses mean errors and a factor 0.5. Here every such
    constant (T, omega, 1/2, the number of latent elements) is folded into ``beta``: ``beta`` here
    equals ``0.5 * beta_dpo`` of that code (its SD1.5 default beta_dpo = 5000 gives 2500).
    """
    _check_beta(beta)
    _check_same_shape({"policy_w": policy_w, "policy_l": policy_l, "ref_w": ref_w, "ref_l": ref_l})
    error_gap = (policy_w - ref_w) - (policy_l - ref_l)  # (B,) < 0 when the policy prefers w
    return -F.logsigmoid(-beta * error_gap)


def kto_reference_point(implicit_reward: Tensor) -> Tensor:
    """KTO reference point z: ``max(0, mean(r))`` over the batch, detached (a scalar).

    KTO estimates the policy/reference KL from the batch; with the implicit reward
    ``r = -(policy_err - ref_err)`` standing in for ``log p_theta / p_ref``, its batch mean is that
    estimate. Detached, as in KTO, so no gradient flows through the baseline; clamped at 0 because
    a KL is non-negative.
    """
    return implicit_reward.detach().mean().clamp(min=0.0)


def kto_loss(
    policy_err: Tensor,
    ref_err: Tensor,
    label: Tensor,
    beta: float,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
    reference_point: Tensor | float | None = None,
) -> Tensor:
    """Flow-KTO loss per sample, (B,).

    ``r = -(policy_err - ref_err)``; ``z = kto_reference_point(r)`` unless ``reference_point`` is
    given (e.g. an estimate gathered across ranks); then

        value = sigmoid(beta * (r - z))   for label 1 (desirable)
        value = sigmoid(beta * (z - r))   for label 0 (undesirable)
        loss  = lambda_y * (1 - value)

    (KTO, Ethayarajh et al. 2024, with Diffusion-KTO's implicit reward; as in ``dpo_loss``, all
    constant factors of the error are folded into ``beta``.)
    """
    _check_beta(beta)
    _check_same_shape({"policy_err": policy_err, "ref_err": ref_err, "label": label})
    if bool(((label != 0) & (label != 1)).any()):
        raise MugenError("kto loss: label must hold only 1 (desirable) or 0 (undesirable)")
    if lambda_desirable < 0 or lambda_undesirable < 0:
        raise MugenError(
            f"kto loss: lambda_desirable={lambda_desirable!r} and lambda_undesirable={lambda_undesirable!r} "
            "must be non-negative"
        )
    reward = -(policy_err - ref_err)  # (B,) implicit reward, > 0 when the policy fits better than ref
    z = kto_reference_point(reward) if reference_point is None else torch.as_tensor(reference_point).to(reward)
    desirable = label.to(torch.bool)
    value = torch.where(desirable, torch.sigmoid(beta * (reward - z)), torch.sigmoid(beta * (z - reward)))
    weight = torch.where(
        desirable, torch.full_like(reward, lambda_desirable), torch.full_like(reward, lambda_undesirable)
    )
    return weight * (1 - value)


def with_sft_regulariser(preference_loss: Tensor, policy_sft_loss: Tensor, sft_weight: float) -> Tensor:
    """``total = preference + sft_weight * policy_sft_loss`` (seed §4.2.3: SFT kept as a regulariser)."""
    if not math.isfinite(sft_weight) or sft_weight < 0:
        raise MugenError(f"preference: sft_weight={sft_weight!r} must be finite and non-negative (0 = no SFT term)")
    return preference_loss + sft_weight * policy_sft_loss


# ----------------------------------------------------------------------------------------------
# Train tasks
# ----------------------------------------------------------------------------------------------


@dataclass
class PreferenceTaskConfig:
    # beta on mean-reduced errors; 2500 = 0.5 * Diffusion-DPO's SD1.5 beta_dpo (not tuned for MUG-DiT)
    beta: float = 2500.0
    # seed §4.2.3 keeps SFT as a regulariser but gives no weight; 1.0 is our choice
    sft_weight: float = 1.0
    lambda_desirable: float = 1.0  # KTO only
    lambda_undesirable: float = 1.0  # KTO only
    timestep_mean: float = 0.0  # logit-normal location, as in DiTTaskConfig
    timestep_std: float = 1.0
    spatial_factor: int = 8
    shift_base_resolution: int = 512 * 512


def freeze_reference(reference: nn.Module) -> nn.Module:
    """Put the reference model in eval mode with no trainable parameters; returns it."""
    reference.eval()
    reference.requires_grad_(False)
    return reference


def _fps_or_default(batch: dict, model: nn.Module) -> Tensor | None:
    fps = batch.get("fps")
    if fps is None:
        return None
    return torch.where(fps > 0, fps, torch.full_like(fps, model.config.default_fps))  # 0 = unknown


def _require_keys(batch: dict, keys: tuple[str, ...], task: str) -> None:
    missing = [key for key in keys if key not in batch]
    if missing:
        raise MugenError(
            f"{task}: batch lacks {missing}; a {task} batch needs {list(keys)} (see mugen.train.preference)"
        )


def flow_errors(model: nn.Module, latents: Tensor, text: TextFeatures, fps: Tensor | None, t: Tensor, noise: Tensor):
    """Per-sample flow-matching error of ``model`` on ``latents`` at the given (t, noise), (B,)."""
    return flow_matching_loss(model_velocity_fn(model, text, fps), latents, t, noise)


def _repeat_text(text: TextFeatures, times: int) -> TextFeatures:
    return TextFeatures(text.states.repeat(times, 1, 1), text.mask.repeat(times, 1))


class _PreferenceTask:
    """Shared parts: the frozen reference and the draw of one (t, noise) per pair."""

    def __init__(self, reference: nn.Module, config: PreferenceTaskConfig | None = None):
        self.reference = freeze_reference(reference)
        self.config = config or PreferenceTaskConfig()
        _check_beta(self.config.beta)

    def _check_model(self, model: nn.Module) -> None:
        if model is self.reference:
            raise MugenError(
                "preference task: the policy is the reference model itself; pass a frozen copy "
                "(copy.deepcopy(model)) as reference"
            )

    def draw_time_and_noise(self, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One t (B,) and one noise (B, C, T, H, W) per pair, with the SFT task's shifted logit-normal."""
        cfg = self.config
        batch_size, _, latent_frames, height, width = latents.shape
        ratio = resolution_shift_ratio(
            height * cfg.spatial_factor, width * cfg.spatial_factor, latent_frames, cfg.shift_base_resolution
        )
        t = sample_training_timesteps(
            batch_size, ratio, generator, latents.device, cfg.timestep_mean, cfg.timestep_std
        )  # (B,)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=latents.dtype)
        return t, noise.to(latents.device)

    def policy_and_reference_errors(
        self, model: nn.Module, latents: Tensor, text: TextFeatures, fps: Tensor | None, t: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        policy = flow_errors(model, latents, text, fps, t, noise)  # (N,)
        with torch.no_grad():
            reference = flow_errors(self.reference, latents, text, fps, t, noise)  # (N,)
        return policy, reference


class FlowDPOTask(_PreferenceTask):
    """Flow-DPO on (winner, loser) pairs with the SFT loss on winners as regulariser (seed §4.2.3)."""

    KEYS = ("latents_w", "latents_l", "text_states", "text_mask")

    def compute_loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> LossOutput:
        self._check_model(model)
        _require_keys(batch, self.KEYS, "DPO")
        winner, loser = batch["latents_w"], batch["latents_l"]  # (B, C, T, H, W) each
        if winner.shape != loser.shape or winner.dim() != 5:
            raise MugenError(
                f"DPO: latents_w {tuple(winner.shape)} and latents_l {tuple(loser.shape)} must share one "
                "(B, C, T, H, W) shape; bucket pairs by shape"
            )
        batch_size = winner.shape[0]
        text = TextFeatures(batch["text_states"], batch["text_mask"])
        fps = _fps_or_default(batch, model)

        # One (t, noise) per pair, shared by winner and loser and by policy and reference: the
        # error difference then measures the preference, not the luck of the draw.
        t, noise = self.draw_time_and_noise(winner, generator)
        both = torch.cat([winner, loser])  # (2B, C, T, H, W)
        policy, reference = self.policy_and_reference_errors(
            model,
            both,
            _repeat_text(text, 2),
            None if fps is None else fps.repeat(2),
            t.repeat(2),
            noise.repeat(2, 1, 1, 1, 1),
        )
        policy_w, policy_l = policy[:batch_size], policy[batch_size:]  # (B,) each
        ref_w, ref_l = reference[:batch_size], reference[batch_size:]
        per_pair = dpo_loss(policy_w, policy_l, ref_w, ref_l, self.config.beta)  # (B,)
        sft = policy_w.mean()  # the winners are data the model should still fit
        loss = with_sft_regulariser(per_pair.mean(), sft, self.config.sft_weight)
        margin = -((policy_w - ref_w) - (policy_l - ref_l)).detach()  # (B,) > 0: policy prefers w
        return LossOutput(
            loss=loss,
            per_sample=per_pair.detach(),
            timesteps=t.detach(),
            metrics={
                "dpo_loss": float(per_pair.detach().mean()),
                "sft_loss": float(sft.detach()),
                "reward_margin": float(margin.mean()),
                "reward_accuracy": float((margin > 0).float().mean()),
            },
        )


class FlowKTOTask(_PreferenceTask):
    """Flow-KTO on desirable/undesirable samples with the SFT loss on desirable ones (seed §4.2.3)."""

    KEYS = ("latents", "label", "text_states", "text_mask")

    def compute_loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> LossOutput:
        self._check_model(model)
        _require_keys(batch, self.KEYS, "KTO")
        latents = batch["latents"]  # (B, C, T, H, W)
        if latents.dim() != 5:
            raise MugenError(f"KTO: latents have shape {tuple(latents.shape)}, expected (B, C, T, H, W)")
        label = batch["label"].to(latents.device)
        if tuple(label.shape) != (latents.shape[0],):
            raise MugenError(f"KTO: label has shape {tuple(label.shape)}, expected ({latents.shape[0]},)")
        text = TextFeatures(batch["text_states"], batch["text_mask"])
        fps = _fps_or_default(batch, model)

        t, noise = self.draw_time_and_noise(latents, generator)  # shared by policy and reference
        policy, reference = self.policy_and_reference_errors(model, latents, text, fps, t, noise)
        cfg = self.config
        per_sample = kto_loss(policy, reference, label, cfg.beta, cfg.lambda_desirable, cfg.lambda_undesirable)
        desirable = label.to(torch.bool)
        # SFT only on desirable samples: fitting an undesirable clip would undo the preference.
        # A batch with none of them contributes no SFT term.
        sft = (policy * desirable).sum() / desirable.sum().clamp(min=1)
        loss = with_sft_regulariser(per_sample.mean(), sft, cfg.sft_weight)
        reward = -(policy - reference).detach()
        return LossOutput(
            loss=loss,
            per_sample=per_sample.detach(),
            timesteps=t.detach(),
            metrics={
                "kto_loss": float(per_sample.detach().mean()),
                "sft_loss": float(sft.detach()),
                "reference_point": float(kto_reference_point(reward)),
                "desirable_fraction": float(desirable.float().mean()),
            },
        )


# ----------------------------------------------------------------------------------------------
# RDPO: preference pairs from real data (seed appendix A.2)
# ----------------------------------------------------------------------------------------------


def build_rdpo_pairs(
    model: nn.Module,
    latents: Tensor,
    text: TextFeatures,
    fps: Tensor | None,
    num_steps: int,
    generator: torch.Generator,
    *,
    guidance_scale: float = 1.0,
    shift_ratio: float = 1.0,
) -> dict:
    """Build a DPO batch from real clips without labels (RDPO, seed appendix A.2).

    Returns ``{"latents_w", "latents_l"}`` (B, C, T, H, W) each, ``"text_states"`` (B, L, D),
    ``"text_mask"`` (B, L) and ``"fps"`` (B,) (or None when ``fps`` is None): the winner is the real
    clip's latent, the loser is what ``model`` (the current policy or the reference) samples from
    fresh random noise for the same caption, with ``num_steps`` Euler steps.

    Reading of the report: A.2 says that flow paths obtained by reverse sampling from real videos are
    "statistically superior" to paths from random noise, so pairs can be built without annotation.
    We take the simplest form of that statement: the real clip (the end point of its path) is
    preferred to the model's own sample from random noise. That the loser is a few-step sample and
    that the winner is the clean real latent, rather than a re-generation from the real clip's
    inverted noise, is our interpretation; the report and its reference [28] give no more detail.
    Iterating this with the current policy as generator gives the report's multi-stage schedule.
    """
    if latents.dim() != 5:
        raise MugenError(f"RDPO: latents have shape {tuple(latents.shape)}, expected (B, C, T, H, W)")
    if len(text) != latents.shape[0]:
        raise MugenError(f"RDPO: text holds {len(text)} captions for {latents.shape[0]} clips; pass one per clip")
    noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=latents.dtype)
    noise = noise.to(latents.device)  # (B, C, T, H, W)
    rate = None if fps is None else torch.where(fps > 0, fps, torch.full_like(fps, model.config.default_fps))
    sampler = FlowSamplerConfig(num_steps=num_steps, guidance_scale=guidance_scale, shift_ratio=shift_ratio)
    if guidance_scale != 1.0:
        raise MugenError(
            "RDPO: guidance_scale other than 1.0 needs a null caption batch; generate the losers without "
            "guidance (guidance_scale=1.0)"
        )
    was_training = model.training
    model.eval()
    try:
        generated = euler_sample(model_velocity_fn(model, text, rate), noise, sampler)  # (B, C, T, H, W)
    finally:
        model.train(was_training)
    return {
        "latents_w": latents,
        "latents_l": generated.detach(),
        "text_states": text.states,
        "text_mask": text.mask,
        "fps": fps,
    }


# ----------------------------------------------------------------------------------------------
# Interleaving annotation sources (seed §4.2.3)
# ----------------------------------------------------------------------------------------------


def interleave_sources(
    iterators: dict[str, Iterator], ratios: dict[str, float], seed: int
) -> Iterator[tuple[str, object]]:
    """Yield ``(source name, batch)`` drawn from ``iterators`` with probabilities ``ratios`` (normalised).

    Each draw picks a source at random with a ``random.Random(seed)`` stream, so the order is the
    same for the same seed. Stops when the picked source is exhausted (so the mix never drifts
    from the configured ratio).
    """
    if not iterators:
        raise MugenError("interleave_sources: iterators is empty; pass at least one annotation source")
    if set(iterators) != set(ratios):
        raise MugenError(
            f"interleave_sources: sources {sorted(iterators)} and ratios {sorted(ratios)} must name the same keys"
        )
    for name, ratio in ratios.items():
        if not math.isfinite(ratio) or ratio < 0:
            raise MugenError(f"interleave_sources: ratio for {name!r} is {ratio!r}; it must be finite and >= 0")
    if sum(ratios.values()) <= 0:
        raise MugenError("interleave_sources: all ratios are 0; give at least one source a positive ratio")
    names = list(iterators)
    return _interleave(iterators, names, [ratios[name] for name in names], random.Random(seed))


def _interleave(iterators: dict[str, Iterator], names: list[str], weights: list[float], chooser: random.Random):
    while True:
        name = chooser.choices(names, weights=weights)[0]
        try:
            batch = next(iterators[name])
        except StopIteration:
            return
        yield name, batch
