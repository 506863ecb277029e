import copy
import math

import pytest
import torch

from mugen.errors import MugenError
from mugen.models.dit import MUGDiT, dit_config
from mugen.models.text.base import TextFeatures
from mugen.train import preference
from mugen.train.preference import (
    FlowDPOTask,
    FlowKTOTask,
    PreferenceTaskConfig,
    build_rdpo_pairs,
    dpo_loss,
    flow_errors,
    interleave_sources,
    kto_loss,
    with_sft_regulariser,
)

TEXT_DIM = 16
SHAPE = (2, 24, 2, 4, 4)  # (B, C, T, H, W)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_loss_matches_closed_form():
    pw, pl, rw, rl = [0.5, 1.0], [0.8, 0.2], [0.6, 0.7], [0.7, 0.4]
    beta = 3.0
    got = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (pw, pl, rw, rl)), beta)
    for i in range(2):
        gap = (pw[i] - rw[i]) - (pl[i] - rl[i])
        assert got[i].item() == pytest.approx(-math.log(_sigmoid(-beta * gap)), rel=1e-12)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    errors_w, errors_l = torch.rand(5), torch.rand(5)
    got = dpo_loss(errors_w, errors_l, errors_w.clone(), errors_l.clone(), beta=100.0)
    assert torch.allclose(got, torch.full((5,), math.log(2)))


def test_lowering_policy_winner_error_lowers_dpo_loss():
    policy_w = torch.tensor([0.5], requires_grad=True)
    loss = dpo_loss(policy_w, torch.tensor([0.5]), torch.tensor([0.4]), torch.tensor([0.6]), beta=2.0).sum()
    loss.backward()
    assert policy_w.grad.item() > 0  # d loss / d err_w > 0: a lower winner error lowers the loss
    lower = dpo_loss(policy_w.detach() - 0.1, torch.tensor([0.5]), torch.tensor([0.4]), torch.tensor([0.6]), 2.0)
    assert lower.item() < loss.item()


def test_kto_loss_matches_closed_form():
    policy, ref, label = [0.3, 0.9, 0.5, 0.2], [0.5, 0.6, 0.5, 0.4], [1, 0, 1, 0]
    beta, lam_d, lam_u = 2.0, 1.5, 0.5
    got = kto_loss(
        torch.tensor(policy, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), torch.tensor(label), beta,
        lam_d, lam_u,
    )
    rewards = [-(p - r) for p, r in zip(policy, ref)]
    z = max(0.0, sum(rewards) / len(rewards))
    for i, y in enumerate(label):
        value = _sigmoid(beta * (rewards[i] - z)) if y == 1 else _sigmoid(beta * (z - rewards[i]))
        assert got[i].item() == pytest.approx((lam_d if y == 1 else lam_u) * (1 - value), rel=1e-12)


def test_kto_reference_point_is_clamped_at_zero_and_can_be_given():
    policy, ref, label = torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2]), torch.tensor([1, 0])
    # every reward is negative -> z = 0
    got = kto_loss(policy, ref, label, beta=1.0)
    expected = torch.tensor([1 - _sigmoid(-0.8), 1 - _sigmoid(0.6)])
    assert torch.allclose(got, expected, atol=1e-6)
    given = kto_loss(policy, ref, label, beta=1.0, reference_point=0.5)
    assert torch.allclose(given, torch.tensor([1 - _sigmoid(-1.3), 1 - _sigmoid(1.1)]), atol=1e-6)


def test_losses_reject_bad_inputs():
    with pytest.raises(MugenError):
        dpo_loss(torch.rand(2), torch.rand(3), torch.rand(2), torch.rand(2), 1.0)
    with pytest.raises(MugenError):
        dpo_loss(torch.rand(2), torch.rand(2), torch.rand(2), torch.rand(2), 0.0)
    with pytest.raises(MugenError):
        kto_loss(torch.rand(2), torch.rand(2), torch.tensor([1, 2]), 1.0)
    with pytest.raises(MugenError):
        with_sft_regulariser(torch.tensor(1.0), torch.tensor(1.0), -1.0)
    assert with_sft_regulariser(torch.tensor(1.0), torch.tensor(2.0), 0.25).item() == pytest.approx(1.5)


# ------------------------------------------------------------------ tasks on a tiny MUG-DiT


def _models(seed: int = 0):
    torch.manual_seed(seed)
    policy = MUGDiT(dit_config("debug", depth=1, text_dim=TEXT_DIM))
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # make the policy differ from the reference everywhere
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return policy, reference


def _text(batch: int = SHAPE[0]) -> TextFeatures:
    gen = torch.Generator().manual_seed(7)
    return TextFeatures(torch.randn(batch, 3, TEXT_DIM, generator=gen), torch.ones(batch, 3, dtype=torch.bool))


def _dpo_batch(same: bool = False) -> dict:
    gen = torch.Generator().manual_seed(3)
    winner = torch.randn(SHAPE, generator=gen)
    loser = winner.clone() if same else torch.randn(SHAPE, generator=gen)
    text = _text()
    return {
        "latents_w": winner,
        "latents_l": loser,
        "text_states": text.states,
        "text_mask": text.mask,
        "fps": torch.tensor([24.0, 0.0]),
    }


def test_dpo_task_shares_noise_and_t_between_winner_and_loser():
    policy, reference = _models()
    task = FlowDPOTask(reference, PreferenceTaskConfig(beta=50.0, sft_weight=0.0))
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    out = task.compute_loss(policy, _dpo_batch(same=True), torch.Generator().manual_seed(1))
    # identical w and l at shared (noise, t): the preference term is exactly log 2 although policy != ref
    assert torch.allclose(out.per_sample, torch.full((SHAPE[0],), math.log(2)), atol=1e-6)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # with different w and l the loss moves away from log 2 and the SFT term adds the winner error
    out = task.compute_loss(policy, _dpo_batch(), torch.Generator().manual_seed(1))
    assert not torch.allclose(out.per_sample, torch.full((SHAPE[0],), math.log(2)), atol=1e-4)
    assert out.timesteps.shape == (SHAPE[0],)
    with_sft = FlowDPOTask(reference, PreferenceTaskConfig(beta=50.0, sft_weight=1.0))
    out_sft = with_sft.compute_loss(policy, _dpo_batch(), torch.Generator().manual_seed(1))
    assert out_sft.loss.item() == pytest.approx(out.loss.item() + out_sft.metrics["sft_loss"], rel=1e-5)


def test_dpo_task_uses_the_drawn_noise_for_policy_and_reference(monkeypatch):
    policy, reference = _models()
    calls = []
    original = preference.flow_errors

    def recording(model, latents, text, fps, t, noise):
        calls.append((model, t.clone(), noise.clone()))
        return original(model, latents, text, fps, t, noise)

    monkeypatch.setattr(preference, "flow_errors", recording)
    task = FlowDPOTask(reference, PreferenceTaskConfig(beta=10.0))
    task.compute_loss(policy, _dpo_batch(), torch.Generator().manual_seed(2))
    assert [call[0] for call in calls] == [policy, reference]
    (_, t_policy, noise_policy), (_, t_ref, noise_ref) = calls
    batch = SHAPE[0]
    assert torch.equal(t_policy, t_ref) and torch.equal(noise_policy, noise_ref)
    assert torch.equal(t_policy[:batch], t_policy[batch:])  # winner rows and loser rows share t
    assert torch.equal(noise_policy[:batch], noise_policy[batch:])  # ... and noise
    assert not torch.equal(noise_policy[0], noise_policy[1])  # but pairs differ from each other


def test_dpo_steps_increase_the_preference_margin():
    policy, reference = _models()
    batch = _dpo_batch()
    text = TextFeatures(batch["text_states"], batch["text_mask"])
    fps = torch.tensor([24.0, 24.0])
    eval_gen = torch.Generator().manual_seed(11)
    t = torch.rand(8, generator=eval_gen) * 0.8 + 0.1
    noise = torch.randn((8, *SHAPE[1:]), generator=eval_gen)

    def margin() -> float:
        with torch.no_grad():
            w = batch["latents_w"][:1].expand(8, -1, -1, -1, -1)
            lose = batch["latents_l"][:1].expand(8, -1, -1, -1, -1)
            text8 = TextFeatures(text.states[:1].expand(8, -1, -1), text.mask[:1].expand(8, -1))
            fps8 = fps[:1].expand(8)
            gap = (flow_errors(policy, w, text8, fps8, t, noise) - flow_errors(reference, w, text8, fps8, t, noise)) - (
                flow_errors(policy, lose, text8, fps8, t, noise) - flow_errors(reference, lose, text8, fps8, t, noise)
            )
            return float(-gap.mean())

    task = FlowDPOTask(reference, PreferenceTaskConfig(beta=20.0, sft_weight=0.0))
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    before = margin()
    generator = torch.Generator().manual_seed(5)
    for _ in range(6):
        optimizer.zero_grad()
        task.compute_loss(policy, batch, generator).loss.backward()
        optimizer.step()
    assert margin() > before + 1e-3


def test_kto_task_runs_and_rejects_bad_batches():
    policy, reference = _models()
    text = _text()
    batch = {
        "latents": torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)),
        "label": torch.tensor([1, 0]),
        "text_states": text.states,
        "text_mask": text.mask,
        "fps": torch.tensor([24.0, 24.0]),
    }
    task = FlowKTOTask(reference, PreferenceTaskConfig(beta=10.0, sft_weight=0.0))
    out = task.compute_loss(policy, batch, torch.Generator().manual_seed(1))
    assert out.per_sample.shape == (SHAPE[0],) and torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert all(p.grad is None for p in reference.parameters())
    # against the closed form with the errors at the task's (t, noise)
    gen = torch.Generator().manual_seed(1)
    t, noise = task.draw_time_and_noise(batch["latents"], gen)
    with torch.no_grad():
        p_err = flow_errors(policy, batch["latents"], text, batch["fps"], t, noise)
        r_err = flow_errors(reference, batch["latents"], text, batch["fps"], t, noise)
    assert torch.allclose(out.per_sample, kto_loss(p_err, r_err, batch["label"], 10.0), atol=1e-5)
    with pytest.raises(MugenError):
        task.compute_loss(policy, {k: v for k, v in batch.items() if k != "label"}, gen)
    with pytest.raises(MugenError):
        task.compute_loss(reference, batch, gen)


# ------------------------------------------------------------------ RDPO and interleaving


def test_build_rdpo_pairs_keys_and_shapes():
    policy, _ = _models()
    policy.train()
    latents = torch.randn(SHAPE)
    text = _text()
    pairs = build_rdpo_pairs(policy, latents, text, torch.tensor([24.0, 0.0]), 2, torch.Generator().manual_seed(0))
    assert set(pairs) == {"latents_w", "latents_l", "text_states", "text_mask", "fps"}
    assert torch.equal(pairs["latents_w"], latents)
    assert pairs["latents_l"].shape == latents.shape and not torch.equal(pairs["latents_l"], latents)
    assert torch.isfinite(pairs["latents_l"]).all()
    assert pairs["text_states"].shape == (2, 3, TEXT_DIM) and pairs["text_mask"].shape == (2, 3)
    assert policy.training  # mode restored
    again = build_rdpo_pairs(policy, latents, text, torch.tensor([24.0, 0.0]), 2, torch.Generator().manual_seed(0))
    assert torch.equal(again["latents_l"], pairs["latents_l"])
    out = FlowDPOTask(copy.deepcopy(policy), PreferenceTaskConfig(beta=10.0)).compute_loss(
        policy, pairs, torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(out.loss)


def _counting(name: str):
    index = 0
    while True:
        yield f"{name}{index}"
        index += 1


def test_interleave_sources_ratio_and_determinism():
    ratios = {"kto": 1.0, "dpo": 3.0}

    def draws(seed: int, count: int = 1000):
        stream = interleave_sources({name: _counting(name) for name in ratios}, ratios, seed)
        return [next(stream) for _ in range(count)]

    first = draws(0)
    share_dpo = sum(name == "dpo" for name, _ in first) / len(first)
    assert abs(share_dpo - 0.75) < 0.05
    assert [b for name, b in first if name == "kto"][:3] == ["kto0", "kto1", "kto2"]  # batches in order
    assert draws(0) == first
    assert draws(1) != first


def test_interleave_sources_stops_and_validates():
    stream = interleave_sources({"a": iter([1, 2])}, {"a": 1.0}, seed=0)
    assert list(stream) == [("a", 1), ("a", 2)]
    with pytest.raises(MugenError):
        interleave_sources({"a": iter([])}, {"b": 1.0}, seed=0)
    with pytest.raises(MugenError):
        interleave_sources({"a": iter([])}, {"a": 0.0}, seed=0)
