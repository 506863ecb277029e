"""Compare `mugen plan`'s estimates with the committed 1B training-step measurement.

Reads benchmarks/results/dit_1b_train_step_h100.json (measured on an H100; see
dit_1b_train_step.md for its command and commit) and writes benchmarks/results/plan_vs_measured.md
and .json. No GPU is used here: the estimate is computed, the measurement is read.

    PYTHONPATH=src python benchmarks/plan_vs_measured.py
"""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

from mugen.atomic import write_text_atomically
from mugen.distributed.plan import GIB, GPUS, Layout, Links, build_workload, estimate_memory, estimate_time
from mugen.models.dit import dit_config

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    measured = json.loads((RESULTS / "dit_1b_train_step_h100.json").read_text())
    config = dit_config("1B", text_dim=4096)
    # The benchmark: batch 1, latents 24 x 10 x 46 x 80 (N = 9,202), 300 text slots, one GPU, no recompute.
    workload = build_workload(config, latent_shape=(10, 46, 80), text_tokens=300, global_batch=1)
    layout = Layout(dp=1)
    memory = estimate_memory(workload, layout, micro_batches=1)
    timing = estimate_time(workload, layout, 1, GPUS["h100"], Links())
    rows = []
    for run in measured["results"]:
        eager = not run["compile_blocks"]
        rows.append(
            {
                "variant": f"{'eager' if eager else 'per-block compile'}, {'fused' if run['fused_adamw'] else 'default'} AdamW",
                "measured_peak_gib": run["peak_mem_gib"],
                "estimated_peak_gib": round(memory.peak / GIB, 2),
                "memory_error_pct": round(100 * (memory.peak / GIB - run["peak_mem_gib"]) / run["peak_mem_gib"], 1),
                "measured_step_ms": run["median_step_ms"],
                "estimated_step_ms": round(1e3 * timing.step_s, 1),
                "measured_over_estimate": round(run["median_step_ms"] / (1e3 * timing.step_s), 2),
                "modelled": eager,
            }
        )
    assert workload.sequence_tokens == measured["results"][0]["tokens"]
    assert workload.parameters == measured["results"][0]["params"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    breakdown = {
        "parameters (fp32)": memory.parameters,
        "AdamW moments (fp32)": memory.optimizer,
        "bf16 compute weights (autocast cache)": memory.compute_weights,
        "activations (56 blocks + outside)": memory.activations,
        "backward working set (incl. attention workspace)": memory.working_set,
        "gradients (fp32; not live at the peak)": memory.gradients,
    }
    lines = [
        "# `mugen plan` estimate vs a measured training step",
        "",
        f"- date: {datetime.date.today().isoformat()}; estimate computed at commit {commit} (CPU, no GPU used)",
        "- command: `PYTHONPATH=src python benchmarks/plan_vs_measured.py`",
        "- measurement: `benchmarks/results/dit_1b_train_step_h100.json` (H100 80GB HBM3, torch 2.11; command, commit",
        "  and setup in `dit_1b_train_step.md`): 1B preset (1,208,059,968 parameters), batch 1, latents 24 x 10 x 46 x 80",
        "  (N = 9,202), 300 text slots, fp32 weights, bf16 autocast, AdamW, `torch.cuda.max_memory_allocated` peak.",
        "- estimate: `mugen.distributed.plan.estimate_memory` / `estimate_time` for layout `dp1` (one GPU, no recompute);",
        "  the same numbers `mugen plan --preset 1B --latent-shape 10x46x80 --gpus 1` prints.",
        "",
        "| variant | measured peak | estimated peak | error | measured step | estimated floor | measured / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        note = "" if row["modelled"] else " (not modelled: compile)"
        lines.append(
            f"| {row['variant']}{note} | {row['measured_peak_gib']} GiB | {row['estimated_peak_gib']} GiB | "
            f"{row['memory_error_pct']:+.1f}% | {row['measured_step_ms']} ms | {row['estimated_step_ms']} ms | "
            f"{row['measured_over_estimate']}x |"
        )
    lines += ["", "Estimated peak, by part:", "", "| part | GiB |", "|---|---|"]
    lines += [f"| {name} | {value / GIB:.2f} |" for name, value in breakdown.items()]
    lines += [
        f"| **peak** = parameters + moments + compute weights + max(activations + working set, gradients) | **{memory.peak / GIB:.2f}** |",
        "",
        "## What was calibrated on what",
        "",
        "- Nothing in the memory model was fitted to this GPU run. The activation coefficients (80 B per channel, 20 B per",
        "  head and 24 B per token and block; 12 B per channel and 4 B per head per text token and block) were counted",
        "  from the tensors autograd saves for MUG-DiT blocks under bf16 autocast on the CPU (`saved_tensors_hooks`);",
        "  `tests/unit/distributed/test_plan.py::test_activation_count_matches_what_autograd_saves` re-counts them on two",
        "  small widths. The backward working set (two fp32 (N, d) gradients, the attention kernel's fp32 dq",
        "  accumulator, one block's weight gradients) is a modelling assumption, also not fitted.",
        "- So the eager rows are a check, but a check on one configuration only: one GPU, one sequence length, no",
        "  FSDP/TP/CP/PP, no recompute. The parallel layouts' memory and all communication times are unvalidated",
        "  (no multi-GPU measurement exists here). The counts come from CPU autocast; that CUDA autocast saves the same",
        "  tensors for this block is suggested by the agreement above, not checked op by op on a GPU.",
        "- In fairness: the model's structure (which parts are live at the peak) was written knowing the 60.8 GiB figure,",
        "  so a 0.2% match on this one run is better than the model's real accuracy should be expected to be.",
        "- The compiled rows are outside the model (`torch.compile` fuses element-wise ops and saves fewer tensors):",
        "  the estimate is for eager training and overstates compiled memory.",
        "- Step time: the estimate is a floor (matmul at 772 and attention at 330 TFLOP/s, element-wise traffic of",
        f"  {4} x the saved activations at 2,885 GB/s). The eager step is {rows[1]['measured_over_estimate']}x that floor with fused",
        "  AdamW: small kernels and non-peak matmul shapes (N x 1152) are not modelled. No efficiency factor was fitted",
        "  to this run; plan's times rank layouts, they do not predict wall time.",
    ]
    write_text_atomically(RESULTS / "plan_vs_measured.md", "\n".join(lines) + "\n")
    write_text_atomically(
        RESULTS / "plan_vs_measured.json",
        json.dumps({"commit": commit, "rows": rows, "estimate_gib": {k: v / GIB for k, v in breakdown.items()}}, indent=1) + "\n",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
