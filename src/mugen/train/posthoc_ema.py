"""Post-hoc EMA: average saved snapshots after training instead of choosing an EMA length up front.

seed §4.2.3 "Annealed SFT with post-EMA": instead of Karras et al.'s post-hoc EMA the report
approximates it "by exponentially decayed model ensembling": snapshot i gets a weight proportional
to ``0.5 ** ((last_step - step_i) / half_life)`` (``ensemble_weights``).

EDM2's post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", §3 and appendix C) is here too. A power-function EMA with exponent ``gamma``,
seen at step ``t``, weighs the weights of step ``tau`` by the profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 < tau <= t

and is tracked online with ``beta_t = (1 - 1/t)^(gamma + 1)`` (``power_function_beta``). Its width
relative to ``t`` is ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``. Given
snapshots of such EMAs, a target profile is approximated by the least-squares combination of the
snapshot profiles under the L2 inner product on [0, inf) (``solve_posthoc_ema_weights``); the same
weights then combine the snapshot tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from mugen.atomic import write_atomically
from mugen.errors import MugenError

POSTHOC_METHODS = ("exponential", "power")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_MODEL_FILE = "model.safetensors"  # mugen.train.checkpoint.MODEL_FILE


# ------------------------------------------------------------------ (a) the report's approximation
def ensemble_weights(steps: list[int], half_life_steps: float) -> Tensor:
    """(N,) float64 weights summing to 1, ``w_i ∝ 0.5 ** ((max(steps) - steps[i]) / half_life_steps)``.

    seed §4.2.3: exponentially decayed model ensembling. A snapshot ``half_life_steps`` older than
    the newest counts half as much.
    """
    if not steps:
        raise MugenError("ensemble_weights: steps is empty; pass the step of every snapshot to combine")
    if not half_life_steps > 0:
        raise MugenError(f"ensemble_weights: half_life_steps={half_life_steps} must be positive")
    steps_tensor = torch.tensor([float(step) for step in steps], dtype=torch.float64)  # (N,)
    weights = torch.pow(0.5, (steps_tensor.max() - steps_tensor) / half_life_steps)  # (N,)
    return weights / weights.sum()


def _weighted_average(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """sum_i weights[i] * tensors[i], accumulated in float64, returned in the last tensor's dtype."""
    total = torch.zeros(tensors[-1].shape, dtype=torch.float64)
    for tensor, weight in zip(tensors, weights.tolist()):
        total.add_(tensor.detach().to("cpu", torch.float64), alpha=weight)
    return total.to(tensors[-1].dtype)


def combine_state_dicts(state_dicts: Sequence[dict[str, Tensor]], weights: Tensor | Sequence[float]) -> dict[str, Tensor]:
    """Weighted average of floating-point tensors; other tensors (step counters, ids) from the last dict."""
    weights = torch.as_tensor(weights, dtype=torch.float64).flatten()  # (N,)
    if len(state_dicts) == 0 or len(state_dicts) != weights.numel():
        raise MugenError(
            f"combine_state_dicts: {len(state_dicts)} state dicts but {weights.numel()} weights; pass one weight per state dict"
        )
    last = state_dicts[-1]
    for index, state in enumerate(state_dicts):
        if state.keys() != last.keys():
            difference = sorted(state.keys() ^ last.keys())[:3]
            raise MugenError(f"combine_state_dicts: state dict {index} has other keys than the last ({difference}); combine snapshots of one model")
        for name, tensor in state.items():
            if tensor.shape != last[name].shape:
                raise MugenError(
                    f"combine_state_dicts: {name} is {tuple(tensor.shape)} in state dict {index} but "
                    f"{tuple(last[name].shape)} in the last; combine snapshots of one model"
                )
    combined = {}
    for name, tensor in last.items():
        if tensor.is_floating_point():
            combined[name] = _weighted_average([state[name] for state in state_dicts], weights)
        else:
            combined[name] = tensor.clone()
    return combined


# ------------------------------------------------------------------- (b) EDM2 power-function EMA
def power_function_beta(step: int, gamma: float) -> float:
    """EDM2 eq. (2)-(3): the decay ``(1 - 1/t)^(gamma + 1)`` of the ``t``-th update (t >= 1).

    Updating ``ema <- beta_t ema + (1 - beta_t) theta_t`` gives theta_tau the weight
    ``(tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)``: the profile integrated over (tau-1, tau].
    """
    if step < 1:
        raise MugenError(f"power_function_beta: step={step} must be >= 1 (the first update has beta 0)")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def sigma_rel_from_gamma(gamma: float) -> float:
    """Standard deviation of the profile p_{t,gamma} divided by t (EDM2 eq. (4))."""
    if not gamma > -1:
        raise MugenError(f"sigma_rel_from_gamma: gamma={gamma} must be > -1 for the profile to be normalisable")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """Inverse of ``sigma_rel_from_gamma``: the largest real root of the cubic it gives.

    sigma^2 (gamma+2)^2 (gamma+3) = gamma + 1  <=>  gamma^3 + 7 gamma^2 + (16 - 1/sigma^2) gamma + (12 - 1/sigma^2) = 0.
    The largest root is the branch where longer EMAs (larger sigma_rel) have smaller gamma.
    """
    if not 0 < sigma_rel < 0.3:  # the profile is widest, sigma_rel 0.3003, at gamma -0.38
        raise MugenError(
            f"gamma_from_sigma_rel: sigma_rel={sigma_rel} is out of range; use 0 < sigma_rel < 0.3 (EDM2 uses 0.05 to 0.2)"
        )
    inverse_square = 1.0 / sigma_rel**2
    roots = np.roots([1.0, 7.0, 16.0 - inverse_square, 12.0 - inverse_square])
    gamma = float(max(root.real for root in roots if abs(root.imag) < 1e-9))
    return gamma


def power_profile_inner_products(
    steps_a: Tensor, gammas_a: Tensor, steps_b: Tensor, gammas_b: Tensor
) -> Tensor:
    """(A, B) matrix of <p_{t_a,g_a}, p_{t_b,g_b}> = ∫ p_a(tau) p_b(tau) dtau.

    Both profiles are nonzero on (0, min(t_a, t_b)], so the integral is
    (g_a+1)(g_b+1) / (g_a+g_b+1) * m^(g_a+g_b+1) / (t_a^(g_a+1) t_b^(g_b+1)), m = min(t_a, t_b);
    evaluated in log space so large steps do not overflow.
    """
    t_a, g_a = steps_a.double()[:, None], gammas_a.double()[:, None]  # (A, 1)
    t_b, g_b = steps_b.double()[None, :], gammas_b.double()[None, :]  # (1, B)
    overlap_end = torch.minimum(t_a, t_b)  # (A, B)
    exponent = g_a + g_b + 1.0  # (A, B)
    log_value = exponent * overlap_end.log() - (g_a + 1.0) * t_a.log() - (g_b + 1.0) * t_b.log()
    return (g_a + 1.0) * (g_b + 1.0) / exponent * log_value.exp()  # (A, B)


def solve_posthoc_ema_weights(
    snapshot_steps: Sequence[int],
    snapshot_gammas: Sequence[float],
    target_step: int,
    target_sigma_rel: float,
) -> Tensor:
    """(N,) float64 weights x minimising || sum_i x_i p_i - p_target ||_2 (EDM2 appendix C.3).

    Normal equations: A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>. Weights may be
    negative and need not sum to exactly 1 (they do closely when the fit is good).
    """
    if len(snapshot_steps) == 0 or len(snapshot_steps) != len(snapshot_gammas):
        raise MugenError(
            f"solve_posthoc_ema_weights: {len(snapshot_steps)} snapshot steps and {len(snapshot_gammas)} gammas; "
            "pass one gamma per snapshot"
        )
    if min(snapshot_steps) < 1 or target_step < 1:
        raise MugenError("solve_posthoc_ema_weights: steps must be >= 1 (a profile at step 0 is empty)")
    if min(snapshot_gammas) <= -1:
        raise MugenError(f"solve_posthoc_ema_weights: snapshot_gammas {list(snapshot_gammas)} must all be > -1")
    steps = torch.tensor([float(step) for step in snapshot_steps], dtype=torch.float64)  # (N,)
    gammas = torch.tensor([float(gamma) for gamma in snapshot_gammas], dtype=torch.float64)  # (N,)
    target_gamma = torch.tensor([gamma_from_sigma_rel(target_sigma_rel)], dtype=torch.float64)  # (1,)
    gram = power_profile_inner_products(steps, gammas, steps, gammas)  # (N, N)
    projections = power_profile_inner_products(steps, gammas, torch.tensor([float(target_step)], dtype=torch.float64), target_gamma)  # (N, 1)
    # lstsq instead of solve: snapshots with near-identical profiles make the Gram matrix singular.
    return torch.linalg.lstsq(gram, projections, driver="gelsd").solution[:, 0]  # (N,)


# -------------------------------------------------------------------------- (c) from checkpoints
def _step_of(checkpoint_dir: Path) -> int:
    match = _STEP_DIR.match(checkpoint_dir.name)
    if match is None:
        raise MugenError(
            f"posthoc_ema_from_checkpoints: {checkpoint_dir} is not a step directory; pass folders like checkpoints/step_00000500"
        )
    return int(match.group(1))


def posthoc_ema_from_checkpoints(
    checkpoint_dirs: Sequence[str | os.PathLike],
    method: str,
    output_path: str | os.PathLike,
    *,
    half_life_steps: float | None = None,
    snapshot_gammas: Sequence[float] | None = None,
    target_sigma_rel: float | None = None,
    target_step: int | None = None,
    weights_file: str = _MODEL_FILE,
) -> Tensor:
    """Combine ``weights_file`` of Trainer step folders into one safetensors file at ``output_path``.

    ``method="exponential"`` (seed §4.2.3, needs ``half_life_steps``) averages the raw weights with
    ``ensemble_weights``. ``method="power"`` (EDM2, needs ``snapshot_gammas`` and
    ``target_sigma_rel``; ``target_step`` defaults to the newest step) expects each file to hold a
    power-function EMA with the given gamma. Tensors are combined one name at a time, so only one
    tensor per checkpoint is in memory. The file is written atomically; returns the (N,) weights.
    """
    if method not in POSTHOC_METHODS:
        raise MugenError(f"posthoc_ema_from_checkpoints: method={method!r} must be one of {POSTHOC_METHODS}")
    if not checkpoint_dirs:
        raise MugenError("posthoc_ema_from_checkpoints: checkpoint_dirs is empty; pass the step folders to combine")
    if method == "exponential" and half_life_steps is None:
        raise MugenError("posthoc_ema_from_checkpoints: method='exponential' needs half_life_steps")
    if method == "power":
        if snapshot_gammas is None or target_sigma_rel is None:
            raise MugenError("posthoc_ema_from_checkpoints: method='power' needs snapshot_gammas and target_sigma_rel")
        if len(snapshot_gammas) != len(checkpoint_dirs):
            raise MugenError(
                f"posthoc_ema_from_checkpoints: {len(snapshot_gammas)} snapshot_gammas for {len(checkpoint_dirs)} "
                "checkpoints; pass one gamma per checkpoint"
            )
    gammas_given = list(snapshot_gammas) if snapshot_gammas is not None else [0.0] * len(checkpoint_dirs)
    # Oldest first, each directory keeping its own gamma.
    snapshots = sorted(((_step_of(Path(path)), Path(path), gamma) for path, gamma in zip(checkpoint_dirs, gammas_given)), key=lambda item: item[0])
    steps = [step for step, _, _ in snapshots]
    files = [directory / weights_file for _, directory, _ in snapshots]
    for path in files:
        if not path.is_file():
            raise MugenError(f"posthoc_ema_from_checkpoints: {path} does not exist; pass complete checkpoint folders")

    if method == "exponential":
        weights = ensemble_weights(steps, half_life_steps)
    else:
        gammas = [gamma for _, _, gamma in snapshots]
        weights = solve_posthoc_ema_weights(steps, gammas, target_step or max(steps), target_sigma_rel)

    combine_safetensors_files(files, weights, output_path, {"method": method, "steps": steps})
    return weights


def combine_safetensors_files(files: Sequence[Path], weights: Tensor, output_path, record: dict) -> None:
    """Write ``sum_i weights[i] * files[i]`` (floating-point tensors; others from the last file) atomically.

    One tensor name at a time, so only one tensor per file is in memory. ``record`` (with the
    weights added) goes into the safetensors metadata under ``mugen_posthoc_ema``.
    """
    handles = [safe_open(str(path), framework="pt", device="cpu") for path in files]
    names = list(handles[-1].keys())
    for path, handle in zip(files, handles):
        if set(handle.keys()) != set(names):
            raise MugenError(f"post-hoc EMA: {path} holds other tensors than {files[-1]}; combine snapshots of one model")
    metadata = handles[-1].metadata() or {}  # keeps the tied-weight aliases of mugen checkpoints
    combined = {}
    for name in tqdm(names, desc=f"post-hoc EMA ({record.get('method')})", unit="tensor"):
        tensors = [handle.get_tensor(name) for handle in handles]
        if any(tensor.shape != tensors[-1].shape for tensor in tensors):
            raise MugenError(f"post-hoc EMA: {name} has different shapes across snapshots; combine snapshots of one model")
        combined[name] = _weighted_average(tensors, weights) if tensors[-1].is_floating_point() else tensors[-1]
    metadata = {**metadata, "mugen_posthoc_ema": json.dumps({**record, "weights": weights.tolist()})}
    write_atomically(output_path, lambda temporary: save_file(combined, str(temporary), metadata=metadata))


# ------------------------------------------------------------------ (d) from a run's snapshots
SNAPSHOTS_DIR = "snapshots"  # mugen.train.runs.SNAPSHOTS_DIR
_POWER_FILE = re.compile(r"^power_ema_(\d+\.\d+)\.safetensors$")  # mugen.train.ema.power_ema_file_name


def run_snapshots(run_dir: str | os.PathLike) -> list[Path]:
    """The snapshot folders of a `mugen train dit --snapshot-every` run, oldest first."""
    root = Path(run_dir) / SNAPSHOTS_DIR
    found = sorted(
        (int(m.group(1)), child) for child in (root.iterdir() if root.is_dir() else []) if (m := _STEP_DIR.match(child.name)) and child.is_dir()
    )
    if not found:
        raise MugenError(
            f"post-hoc EMA: {root} holds no snapshots (step_* folders); train with `mugen train dit --snapshot-every N`"
        )
    return [path for _, path in found]


def posthoc_ema_from_run(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    method: str,
    *,
    half_life_steps: float | None = None,
    sigma_rel: float | None = None,
    target_step: int | None = None,
) -> dict:
    """Combine a run's snapshots into ``output_dir`` (model_config.json + model.safetensors + posthoc_ema.json).

    ``method="ensemble"`` (seed §4.2.3): the raw weights of the snapshots, weighted by
    ``ensemble_weights(steps, half_life_steps)``. ``method="power"`` (EDM2): the power-function
    EMAs stored in the snapshots (every tracked width at every snapshot step), weighted by the
    least-squares fit of the target profile ``sigma_rel`` at ``target_step`` (default: newest).
    The output loads like a run folder (`mugen generate --checkpoint OUT`). Returns the record
    written to posthoc_ema.json (method, files, steps, weights).
    """
    from mugen.atomic import write_text_atomically

    run_dir, output_dir = Path(run_dir), Path(output_dir)
    config_file = run_dir / "model_config.json"  # mugen.models.dit.io.RUN_CONFIG_FILE
    if not config_file.is_file():
        raise MugenError(f"post-hoc EMA: {config_file} is missing; --run must be the folder `mugen train dit` wrote")
    snapshots = run_snapshots(run_dir)
    if method == "ensemble":
        if half_life_steps is None:
            raise MugenError("post-hoc EMA: --method ensemble needs --half-life-steps")
        files = [snapshot / _MODEL_FILE for snapshot in snapshots]
        steps = [_step_of(snapshot) for snapshot in snapshots]
        gammas = None
        weights = ensemble_weights(steps, half_life_steps)
    elif method == "power":
        if sigma_rel is None:
            raise MugenError("post-hoc EMA: --method power needs --sigma-rel (e.g. 0.05 to 0.2)")
        files, steps, gammas = [], [], []
        for snapshot in snapshots:
            for child in sorted(snapshot.iterdir()):
                match = _POWER_FILE.match(child.name)
                if match:
                    files.append(child)
                    steps.append(_step_of(snapshot))
                    gammas.append(gamma_from_sigma_rel(float(match.group(1))))
        if not files:
            raise MugenError(
                f"post-hoc EMA: the snapshots in {run_dir / SNAPSHOTS_DIR} hold no power_ema_*.safetensors; "
                "train with --snapshot-every and --power-ema-sigma-rel, or use --method ensemble"
            )
        weights = solve_posthoc_ema_weights(steps, gammas, target_step or max(steps), sigma_rel)
    else:
        raise MugenError(f"post-hoc EMA: --method {method!r}; use 'ensemble' or 'power'")
    for path in files:
        if not path.is_file():
            raise MugenError(f"post-hoc EMA: {path} does not exist; the snapshot is incomplete")
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "method": method,
        "run": str(run_dir),
        "files": [str(path.relative_to(run_dir)) for path in files],
        "steps": steps,
        "gammas": gammas,
        "half_life_steps": half_life_steps,
        "sigma_rel": sigma_rel,
        "target_step": (target_step or max(steps)) if method == "power" else None,
    }
    combine_safetensors_files(files, weights, output_dir / _MODEL_FILE, record)
    record["weights"] = weights.tolist()
    run_record = json.loads(config_file.read_text(encoding="utf-8"))
    run_record["posthoc_ema"] = {key: value for key, value in record.items() if key != "files"}
    write_text_atomically(output_dir / "model_config.json", json.dumps(run_record, indent=2) + "\n")
    write_text_atomically(output_dir / "posthoc_ema.json", json.dumps(record, indent=2) + "\n")
    return record
