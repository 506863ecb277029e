"""Training logs: TensorBoard scalars, ``metrics.jsonl``, a tqdm bar and a loss-curve PNG.

Per optimizer step the trainer hands over one record (``step``, ``loss``, ``lr``, ``grad_norm``,
``skipped``, task metrics) plus the per-sample losses and flow times of its micro-batches. Every
``log_every`` steps the window is summarised: means over the steps that were applied, the last
learning rate, the number of skipped steps, and the mean loss per flow-time bin (losses differ by
an order of magnitude across t, so one mean hides where the model is still poor).

Speed figures are logged to TensorBoard every step (``perf/*``: step time, the fraction of it spent
waiting for data, model TFLOP/s per GPU and MFU) and summarised per window as ratios of sums (the
window's data wait over its time, its FLOPs over its time), counting skipped steps too: they cost
the same time.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_STANDARD_FIELDS = ("step", "loss", "lr", "grad_norm", "skipped")
# Per-step speed fields of a record: logged every step, summarised over all steps of a window.
PERF_FIELDS = (
    "step_time_s", "data_wait_s", "data_wait_fraction", "model_flops", "hardware_flops",
    "model_tflops", "hardware_tflops", "mfu", "hfu", "rank_cost_imbalance", "micro_batch_cost_imbalance",
)


def timestep_bin_sums(per_sample: Tensor, timesteps: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Sum and count of per-sample losses in ``bins`` equal bins of t in [0, 1]; both (bins,)."""
    per_sample = per_sample.detach().float().reshape(-1).cpu()  # (B,)
    timesteps = timesteps.detach().float().reshape(-1).cpu()  # (B,)
    bin_index = (timesteps.clamp(0.0, 1.0) * bins).long().clamp(max=bins - 1)  # t = 1 goes in the last bin
    sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_index, per_sample.double())
    counts = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_index, torch.ones_like(per_sample).double())
    return sums, counts


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Collects per-step records and writes window summaries every ``log_every`` steps."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        total_steps: int,
        start_step: int = 0,
        log_every: int = 10,
        timestep_bins: int = 10,
        peak_tflops: float | None = None,
    ):
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log_every = max(1, int(log_every))
        self.timestep_bins = int(timestep_bins)
        self.peak_tflops = peak_tflops
        self.metrics_path = self.output_dir / METRICS_FILE
        self._drop_records_after(start_step)
        # Events of steps after the resumed checkpoint came from a run that was cut off: purge them.
        self.writer = SummaryWriter(
            log_dir=str(self.output_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step > 0 else None
        )
        self.progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._reset_window()

    def _drop_records_after(self, step: int) -> None:
        """Keep only ``metrics.jsonl`` lines of steps up to ``step`` (all of them gone for a fresh run)."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            if line.strip() and json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
        descriptor, temp_name = tempfile.mkstemp(prefix=".tmp-metrics-", dir=self.output_dir)
        with os.fdopen(descriptor, "w") as handle:
            handle.writelines(kept)
        os.replace(temp_name, self.metrics_path)

    def _reset_window(self) -> None:
        self._sums: dict[str, float] = {}
        self._applied_steps = 0
        self._skipped_steps = 0
        self._window_steps = 0
        self._last_lr = float("nan")
        self._bin_sums = torch.zeros(self.timestep_bins, dtype=torch.float64)
        self._bin_counts = torch.zeros(self.timestep_bins, dtype=torch.float64)
        self._window_start = time.perf_counter()
        self._perf_sums: dict[str, float] = {}
        self._perf_max: dict[str, float] = {}

    def log_step(
        self, record: dict, per_sample: Sequence[Tensor] = (), timesteps: Sequence[Tensor] = ()
    ) -> dict | None:
        """Add one step; returns the window summary when this step closes a window."""
        self._window_steps += 1
        self._last_lr = record["lr"]
        if record["skipped"]:
            self._skipped_steps += 1
        else:
            self._applied_steps += 1
            for name, value in record.items():
                if name not in ("step", "lr", "skipped") and name not in PERF_FIELDS and isinstance(value, (int, float)):
                    self._sums[name] = self._sums.get(name, 0.0) + float(value)
            for losses, times in zip(per_sample, timesteps):
                sums, counts = timestep_bin_sums(losses, times, self.timestep_bins)
                self._bin_sums += sums
                self._bin_counts += counts
        for name in PERF_FIELDS:
            if name in record:
                value = float(record[name])
                self._perf_sums[name] = self._perf_sums.get(name, 0.0) + value
                self._perf_max[name] = max(self._perf_max.get(name, value), value)
                if name not in ("model_flops", "hardware_flops") and math.isfinite(value):
                    self.writer.add_scalar(f"perf/{name}", value, record["step"])
        self.progress.update(1)
        if math.isfinite(record["loss"]):
            postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
            if "data_wait_fraction" in record:
                postfix["data_wait"] = f"{100 * record['data_wait_fraction']:.1f}%"
            if "mfu" in record:
                postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
            elif "model_tflops" in record:
                postfix["TFLOP/s"] = f"{record['model_tflops']:.3g}"
            self.progress.set_postfix(postfix, refresh=False)
        if record["step"] % self.log_every == 0:
            return self.flush(record["step"])
        return None

    def flush(self, step: int) -> dict | None:
        """Write the current window to TensorBoard and ``metrics.jsonl``."""
        if self._window_steps == 0:
            return None
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        summary: dict = {"step": step}
        applied = max(self._applied_steps, 1)
        for name in ("loss", "grad_norm"):
            summary[name] = self._sums.pop(name, float("nan")) / applied if self._applied_steps else float("nan")
        summary["lr"] = self._last_lr
        summary["skipped_steps"] = self._skipped_steps
        summary["steps_per_s"] = self._window_steps / elapsed
        for name, total in sorted(self._sums.items()):
            summary[name] = total / applied
        summary.update(self._perf_summary())
        loss_by_t = {}
        for index in range(self.timestep_bins):
            if self._bin_counts[index] > 0:
                loss_by_t[f"bin_{index}"] = float(self._bin_sums[index] / self._bin_counts[index])
        summary["loss_by_t"] = loss_by_t

        for name, value in summary.items():
            if name in ("step", "loss_by_t"):
                continue
            if math.isfinite(float(value)):
                self.writer.add_scalar(f"train/{name}", float(value), step)
        for name, value in loss_by_t.items():
            self.writer.add_scalar(f"loss_by_t/{name}", value, step)
        with self.metrics_path.open("a") as handle:
            clean = {name: _finite_or_none(value) for name, value in summary.items()}
            handle.write(json.dumps(clean) + "\n")
        self._reset_window()
        return summary

    def _perf_summary(self) -> dict:
        """Window speed figures: ratios of sums over every step of the window."""
        sums = self._perf_sums
        summary: dict = {}
        seconds = sums.get("step_time_s", 0.0)
        if seconds <= 0:
            return summary
        summary["step_time_s"] = seconds / self._window_steps
        if "data_wait_s" in sums:
            summary["data_wait_fraction"] = sums["data_wait_s"] / seconds
            summary["data_wait_fraction_max"] = self._perf_max.get("data_wait_fraction", float("nan"))
        for kind in ("model", "hardware"):
            if f"{kind}_flops" in sums:
                tflops = sums[f"{kind}_flops"] / seconds / 1e12
                summary[f"{kind}_tflops"] = tflops
                if self.peak_tflops:
                    summary["mfu" if kind == "model" else "hfu"] = tflops / self.peak_tflops
        if sums.get("hardware_flops", 0.0) <= sums.get("model_flops", 0.0):  # no recomputation: hardware = model
            summary.pop("hardware_tflops", None)
            summary.pop("hfu", None)
        for name in ("rank_cost_imbalance", "micro_batch_cost_imbalance"):
            if name in sums:
                summary[name] = sums[name] / self._window_steps
                summary[f"{name}_max"] = self._perf_max[name]
        return summary

    def warn(self, message: str) -> None:
        """Print a warning above the progress bar and keep it in TensorBoard's text log."""
        self.progress.write(f"WARNING: {message}", file=sys.stderr)
        self.writer.add_text("warnings", message)

    def close(self, step: int) -> None:
        self.flush(step)
        self.writer.flush()
        self.writer.close()
        self.progress.close()


def write_loss_curve_png(records: Sequence[dict], path: str | os.PathLike, smoothing: float = 0.9) -> Path:
    """Plot loss against step: the raw per-step losses and an exponentially smoothed line.

    Skipped (non-finite) steps are left out. The smoothed line is a debiased EMA, like TensorBoard's.
    The y axis is logarithmic when every loss is positive. The file is written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    points = [
        (record["step"], record["loss"])
        for record in records
        if not record.get("skipped", False) and math.isfinite(record["loss"])
    ]
    steps = [step for step, _ in points]
    losses = [loss for _, loss in points]
    smoothed, average = [], 0.0
    for count, loss in enumerate(losses, start=1):
        average = smoothing * average + (1.0 - smoothing) * loss
        smoothed.append(average / (1.0 - smoothing**count))

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    if points:
        axes.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss (per step)")
        axes.plot(steps, smoothed, color="tab:blue", linewidth=1.8, label=f"loss (EMA {smoothing})")
        if min(losses) > 0:
            axes.set_yscale("log")
        axes.legend(loc="upper right")
    else:
        axes.text(0.5, 0.5, "no finite losses", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=".tmp-" + path.name + "-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            figure.savefig(handle, format="png")
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path
