import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mugen.errors import MugenError
from mugen.train.posthoc_ema import (
    combine_state_dicts,
    ensemble_weights,
    gamma_from_sigma_rel,
    posthoc_ema_from_checkpoints,
    power_function_beta,
    sigma_rel_from_gamma,
    solve_posthoc_ema_weights,
)


# ------------------------------------------------------------------------ exponential ensembling
def test_ensemble_weights_halve_per_half_life():
    weights = ensemble_weights([10, 20, 30], half_life_steps=10)
    torch.testing.assert_close(weights, torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64) / 1.75)
    # Order does not matter: the weight depends on the distance to the newest step.
    torch.testing.assert_close(ensemble_weights([30, 10], 10), torch.tensor([1.0, 0.25], dtype=torch.float64) / 1.25)
    with pytest.raises(MugenError, match="half_life_steps"):
        ensemble_weights([1, 2], 0)


def test_combine_state_dicts_is_the_weighted_average():
    generator = torch.Generator().manual_seed(0)
    states = [
        {
            "weight": torch.randn(3, 2, generator=generator),
            "half": torch.randn(4, generator=generator).to(torch.bfloat16),
            "count": torch.tensor(index),
        }
        for index in range(3)
    ]
    weights = [0.2, 0.3, 0.5]
    combined = combine_state_dicts(states, weights)
    expected = 0.2 * states[0]["weight"] + 0.3 * states[1]["weight"] + 0.5 * states[2]["weight"]
    torch.testing.assert_close(combined["weight"], expected, rtol=1e-6, atol=1e-6)
    expected_half = sum(w * s["half"].double() for w, s in zip(weights, states)).to(torch.bfloat16)
    assert combined["half"].dtype == torch.bfloat16 and torch.equal(combined["half"], expected_half)
    assert combined["count"].item() == 2  # non-float tensors come from the last state dict
    with pytest.raises(MugenError, match="2 weights"):
        combine_state_dicts(states, [0.5, 0.5])


# -------------------------------------------------------------------------- power-function EMA
def test_sigma_rel_of_gamma_and_its_inverse():
    # gamma = 1: sqrt(2 / (9 * 4)) = sqrt(1/18)
    assert sigma_rel_from_gamma(1.0) == pytest.approx(math.sqrt(1 / 18))
    # gamma = 0 (uniform average): sqrt(1 / (4 * 3)) = the std of U(0, 1)
    assert sigma_rel_from_gamma(0.0) == pytest.approx(math.sqrt(1 / 12))
    for sigma_rel in (0.05, 0.1, 0.2, 0.29):
        assert sigma_rel_from_gamma(gamma_from_sigma_rel(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-10)
    assert gamma_from_sigma_rel(math.sqrt(1 / 18)) == pytest.approx(1.0)
    assert gamma_from_sigma_rel(0.05) > gamma_from_sigma_rel(0.1)  # shorter EMA, larger exponent
    with pytest.raises(MugenError, match="sigma_rel=0.4"):
        gamma_from_sigma_rel(0.4)


def test_solve_puts_all_weight_on_a_snapshot_that_matches_the_target():
    steps = [100, 200, 300, 300]
    gammas = [6.94, 6.94, 6.94, 16.97]
    weights = solve_posthoc_ema_weights(steps, gammas, target_step=300, target_sigma_rel=sigma_rel_from_gamma(16.97))
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-6, rtol=0)


def power_ema_trajectory(trajectory, gamma, save_steps):
    """Run the online power-function EMA over a 1-parameter trajectory; return its value at save_steps."""
    average, saved = 0.0, {}
    for step, value in enumerate(trajectory, start=1):
        beta = power_function_beta(step, gamma)
        average = beta * average + (1 - beta) * value
        if step in save_steps:
            saved[step] = average
    return saved


def test_solve_reconstructs_an_ema_from_snapshots_of_two_other_emas():
    total_steps = 400
    generator = torch.Generator().manual_seed(0)
    steps = torch.arange(1, total_steps + 1, dtype=torch.float64)
    # A noisy trajectory that drifts: the averages of different lengths differ clearly.
    trajectory = (torch.sin(steps / 40) + steps / 200 + 0.3 * torch.randn(total_steps, generator=generator, dtype=torch.float64)).tolist()

    save_steps = set(range(20, total_steps + 1, 20))
    gamma_short, gamma_long = gamma_from_sigma_rel(0.05), gamma_from_sigma_rel(0.10)
    short = power_ema_trajectory(trajectory, gamma_short, save_steps)
    long = power_ema_trajectory(trajectory, gamma_long, save_steps)
    snapshot_steps = sorted(save_steps) * 2
    snapshot_gammas = [gamma_short] * len(save_steps) + [gamma_long] * len(save_steps)
    snapshot_values = torch.tensor([short[s] for s in sorted(save_steps)] + [long[s] for s in sorted(save_steps)], dtype=torch.float64)

    target_sigma_rel = 0.075
    direct = power_ema_trajectory(trajectory, gamma_from_sigma_rel(target_sigma_rel), {total_steps})[total_steps]
    weights = solve_posthoc_ema_weights(snapshot_steps, snapshot_gammas, total_steps, target_sigma_rel)
    reconstructed = float(weights @ snapshot_values)

    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-3)
    # Tolerance: 1% of the gap between the two stored EMAs, which are 0.05 and 0.10 wide.
    gap = abs(short[total_steps] - long[total_steps])
    assert gap > 0.02
    assert abs(reconstructed - direct) < 0.01 * gap
    # Using only the final snapshots (no history) is far worse: the solve uses the intermediate ones.
    assert abs(0.5 * (short[total_steps] + long[total_steps]) - direct) > 5 * abs(reconstructed - direct)


# ------------------------------------------------------------------------------- checkpoints
def write_step(root, step, tensors):
    folder = root / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"mugen_aliases": json.dumps({"tied": "weight"})})
    return folder


def test_posthoc_ema_from_checkpoints_writes_the_combined_weights(tmp_path):
    generator = torch.Generator().manual_seed(0)
    states = {step: {"weight": torch.randn(2, 3, generator=generator), "step": torch.tensor(step)} for step in (10, 20, 30)}
    folders = [write_step(tmp_path, step, tensors) for step, tensors in states.items()]
    output = tmp_path / "ema" / "model.safetensors"

    weights = posthoc_ema_from_checkpoints(list(reversed(folders)), "exponential", output, half_life_steps=10)
    torch.testing.assert_close(weights, torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64) / 1.75)
    with safe_open(str(output), framework="pt") as handle:
        combined = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
        metadata = handle.metadata()
    expected = (0.25 * states[10]["weight"] + 0.5 * states[20]["weight"] + states[30]["weight"]) / 1.75
    torch.testing.assert_close(combined["weight"], expected, rtol=1e-6, atol=1e-6)
    assert combined["step"].item() == 30
    assert json.loads(metadata["mugen_aliases"]) == {"tied": "weight"}
    assert json.loads(metadata["mugen_posthoc_ema"])["steps"] == [10, 20, 30]
    assert [p.name for p in output.parent.iterdir()] == ["model.safetensors"]  # no temporary left

    power = posthoc_ema_from_checkpoints(
        folders, "power", tmp_path / "power.safetensors", snapshot_gammas=[1.0, 1.0, 1.0], target_sigma_rel=math.sqrt(1 / 18)
    )
    torch.testing.assert_close(power, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-6, rtol=0)

    with pytest.raises(MugenError, match="needs half_life_steps"):
        posthoc_ema_from_checkpoints(folders, "exponential", output)
    with pytest.raises(MugenError, match="not a step directory"):
        posthoc_ema_from_checkpoints([tmp_path], "exponential", output, half_life_steps=5)
