"""MUG-V 10B image-to-video at the release's 720p, 5 s shapes: per-step time, per-part time, whole video.

Random weights (bf16, built on the GPU from the meta device), the shapes of the release: latent
(1, 24, 14, 90, 160) = 14 x 45 x 80 + 2 = 50,402 tokens, classifier-free guidance as one forward
of batch 2, 300 text tokens (prompt 120 real, negative 60 real), first frame conditioned.

    PYTHONPATH=src python benchmarks/bench_mugv_10b_i2v.py --mode step --out results.json
    PYTHONPATH=src python benchmarks/bench_mugv_10b_i2v.py --mode video --out video.json

``--mode step``: (1) the SDPA backends (cuDNN, flash, memory-efficient) on one self-attention at
full size, their outputs against a float32 reference on a slice of queries; (2) one CFG step with
each usable backend (median of ``--repeats`` after a warm-up, CUDA events); (3) a profile of one
block split into attention, matmul and other kernels; (4) optionally the step with every block
``torch.compile``d from outside the model. ``--mode video``: the whole 25-step sampling
(``mugen.infer.release.release_sample``) plus the released VAE's encode of the reference image and
decode of 104 frames, wall time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mugen.infer.release import (
    RELEASE_GUIDANCE,
    release_latent_frames,
    release_sample,
    release_shift_ratio,
    release_timesteps,
    release_velocity,
)
from mugen.models.common.attention import set_sdpa_backend
from mugen.models.dit import MUGDiT
from mugen.models.dit.presets import dit_config
from mugen.models.text.base import TextFeatures

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    # FlashAttention-4 (optional package) for the unmasked self-attention, cuDNN for the rest
    "fa4": SDPBackend.CUDNN_ATTENTION,
}
HEIGHT, WIDTH, NUM_FRAMES = 720, 1280, 105
TEXT_TOKENS, PROMPT_TOKENS, NEGATIVE_TOKENS = 300, 120, 60


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_dit(device: torch.device) -> MUGDiT:
    """The 10B preset directly on the GPU in bf16, random fan-in-scaled weights (nothing zero)."""
    config = dit_config("10B")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = MUGDiT(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "scale_shift_table" not in name:
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()), generator=generator)
            elif name.endswith("norm.weight"):
                param.fill_(1.0)
            elif "scale_shift_table" in name:
                param.normal_(0.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)


def inputs(device: torch.device, dtype: torch.dtype):
    latent_frames = release_latent_frames(NUM_FRAMES)
    shape = (1, 24, latent_frames, HEIGHT // 8, WIDTH // 8)
    generator = torch.Generator(device).manual_seed(1)
    z = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    states = torch.randn(2, TEXT_TOKENS, 4096, generator=generator, device=device, dtype=dtype)
    mask = torch.zeros(2, TEXT_TOKENS, dtype=torch.bool, device=device)
    mask[0, :PROMPT_TOKENS] = True
    mask[1, :NEGATIVE_TOKENS] = True
    noisy = torch.ones(1, latent_frames, dtype=torch.bool, device=device)
    noisy[:, 0] = False
    return z, TextFeatures(states=states, mask=mask), noisy


def step_fn(model, z, text, noisy):
    device = z.device
    frames = z.shape[2]
    fps = torch.full((2,), 30.0, device=device)
    frame_indices = torch.arange(frames + 2, device=device).expand(2, -1)
    noisy_pair = torch.cat([noisy, noisy])
    t = torch.tensor([937.5], device=device)

    def run():
        return release_velocity(model, z, t, text, fps, frame_indices, noisy_pair, RELEASE_GUIDANCE)

    return run


def time_cuda(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return times


def attention_check(device: torch.device) -> dict:
    """Each backend on one full-size self-attention (B=2, 48 heads, N=50,402, hd=72)."""
    tokens = 14 * 45 * 80 + 2
    generator = torch.Generator(device).manual_seed(2)
    q, k, v = (torch.randn(2, 48, tokens, 72, generator=generator, device=device, dtype=torch.bfloat16) for _ in range(3))
    rows = torch.arange(0, tokens, tokens // 256, device=device)[:256]
    with torch.no_grad():  # float32 reference for 256 query rows of every head
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, rows].float(), k.float()) / math.sqrt(72)
        expected = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v.float())
        del scores
    flops = 4 * 2 * 48 * tokens * tokens * 72
    result = {}
    outputs = {}
    for name, backend in BACKENDS.items():
        try:
            if name == "fa4":
                from mugen.models.common.flash_attn4 import fa4_attention

                run = lambda: fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)  # noqa: E731
                out = run()
                times = time_cuda(run, repeats=3)
            else:
                with sdpa_kernel([backend]):
                    run = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
                    out = run()
                    times = time_cuda(run, repeats=3)
        except Exception as error:  # noqa: BLE001 (a backend missing here is a result, not a crash)
            result[name] = {"error": str(error).splitlines()[0][:200]}
            log(f"attention {name}: unavailable ({result[name]['error']})")
            continue
        seconds = statistics.median(times)
        error = ((out[:, :, rows].float() - expected).abs().max() / expected.abs().max()).item()
        outputs[name] = out
        result[name] = {"seconds": seconds, "tflops": flops / seconds / 1e12, "max_rel_error_vs_fp32": error}
        log(f"attention {name}: {seconds * 1e3:.1f} ms, {flops / seconds / 1e12:.0f} TFLOP/s, rel err vs fp32 {error:.2e}")
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = ((outputs[a].float() - outputs[b].float()).abs().max() / outputs[b].float().abs().max()).item()
            result[f"{a}_vs_{b}_max_rel_diff"] = diff
            log(f"attention {a} vs {b}: max rel diff {diff:.2e}")
    return result


def profile_block(model, z, text, noisy, backend) -> dict:
    """Kernel time of 2 full-size blocks, split into attention, matmul and everything else."""
    from torch.profiler import ProfilerActivity, profile

    run = step_fn(model, z, text, noisy)
    blocks = model.blocks
    model.blocks = blocks[:2]
    try:
        with sdpa_kernel([backend]):
            run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
    finally:
        model.blocks = blocks
    parts = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    top = []
    for event in prof.key_averages():
        micros = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        if micros <= 0:
            continue
        name = event.key.lower()
        if any(word in name for word in ("flash", "fmha", "cudnn", "attention", "attn", "sdpa")) and "gemm" not in name:
            part = "attention"
        elif any(word in name for word in ("gemm", "sm90", "cutlass", "nvjet", "xmma", "matmul", "s16816", "wgmma")):
            part = "matmul"
        else:
            part = "other"
        parts[part] += micros / 1e6
        top.append((micros / 1e6, part, event.key[:120]))
    top.sort(reverse=True)
    total = sum(parts.values())
    log("profile of 2 blocks + embed/head: " + ", ".join(f"{k} {v * 1e3:.0f} ms ({v / total:.0%})" for k, v in parts.items()))
    for seconds, part, key in top[:12]:
        log(f"  {seconds * 1e3:8.1f} ms  {part:9s} {key}")
    return {"parts_seconds": parts, "top_kernels": [{"seconds": s, "part": p, "name": k} for s, p, k in top[:20]]}


def mode_step(args, device) -> dict:
    record = {"attention": attention_check(device)}
    log("building the 10B DiT")
    model = build_dit(device)
    record["parameters"] = model.num_parameters
    record["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    log(f"10B DiT: {model.num_parameters / 1e9:.2f} B parameters, {record['weights_gib']:.1f} GiB")
    z, text, noisy = inputs(device, torch.bfloat16)
    run = step_fn(model, z, text, noisy)
    steps = {}
    outputs = {}
    for name in args.backends:
        torch.cuda.reset_peak_memory_stats()
        set_sdpa_backend(name)  # the model's attention modules follow the same choice
        try:
            with sdpa_kernel([BACKENDS[name], SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
                times = time_cuda(run, repeats=args.repeats)
                outputs[name] = run().float()
        except RuntimeError as error:
            steps[name] = {"error": str(error).splitlines()[0][:200]}
            log(f"step {name}: failed ({steps[name]['error']})")
            continue
        steps[name] = {"seconds": times, "median_seconds": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        log(f"CFG step, {name}: median {statistics.median(times):.2f} s of {['%.2f' % t for t in times]}, peak {steps[name]['peak_gib']:.1f} GiB")
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = ((outputs[a] - outputs[b]).abs().max() / outputs[b].abs().max()).item()
            steps[f"{a}_vs_{b}_velocity_max_rel_diff"] = diff
            log(f"guided velocity {a} vs {b}: max rel diff {diff:.2e}")
    record["step"] = steps
    best = min((n for n in names), key=lambda n: steps[n]["median_seconds"])
    record["best_backend"] = best
    record["profile"] = profile_block(model, z, text, noisy, BACKENDS[best])
    if args.compile:
        log("compiling every block (torch.compile, from outside the model)")
        eager_blocks = list(model.blocks)
        for block in model.blocks:
            block.compile()
        torch.cuda.reset_peak_memory_stats()
        set_sdpa_backend(best)
        start = time.perf_counter()
        with sdpa_kernel([BACKENDS[best], SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
            compiled_out = run().float()
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            times = time_cuda(run, repeats=args.repeats, warmup=0)
        diff = ((compiled_out - outputs[best]).abs().max() / outputs[best].abs().max()).item()
        record["compiled"] = {"first_call_seconds": first, "seconds": times, "median_seconds": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "max_rel_diff_vs_eager": diff}
        log(f"CFG step compiled ({best}): median {statistics.median(times):.2f} s, first call {first:.0f} s, rel diff vs eager {diff:.2e}")
        del eager_blocks
    return record


def mode_video(args, device) -> dict:
    from mugen.models.vae.official import build_released_vae_random  # noqa: PLC0415 (R1's class)

    record = {}
    torch.cuda.reset_peak_memory_stats()
    wall = time.perf_counter()
    model = build_dit(device)
    vae = build_released_vae_random(device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    record["build_seconds"] = time.perf_counter() - wall
    z, text, noisy = inputs(device, torch.bfloat16)
    latent_frames = z.shape[2]
    generator = torch.Generator("cpu").manual_seed(0)
    image = torch.rand(1, 3, 8, HEIGHT, WIDTH, generator=generator).to(device, torch.bfloat16) * 2 - 1
    backend = BACKENDS[args.backends[0]]
    set_sdpa_backend(args.backends[0])

    torch.cuda.synchronize()
    start = time.perf_counter()
    image_latent = vae.encode(image, generator=generator)
    torch.cuda.synchronize()
    record["vae_encode_seconds"] = time.perf_counter() - start
    noise_generator = torch.Generator(device).manual_seed(0)
    start_latents = torch.randn(z.shape, generator=noise_generator, device=device, dtype=torch.bfloat16)
    start_latents[:, :, :1] = image_latent
    noise = torch.randn(z.shape, generator=noise_generator, device=device, dtype=torch.bfloat16)
    timesteps = release_timesteps(args.steps, release_shift_ratio(HEIGHT, WIDTH, latent_frames, torch.bfloat16, device))
    if args.compile:
        for block in model.blocks:
            block.compile()  # from outside the model; the first step pays the compilation
    step_ends = []

    class StepClock(list):  # release_sample's trace hook: one entry per step, timed as it arrives
        def append(self, item):
            torch.cuda.synchronize()
            step_ends.append(time.perf_counter())
            super().append(None)

    start = time.perf_counter()
    with sdpa_kernel([backend, SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
        latents = release_sample(model, text, start_latents, noise, noisy, timesteps, noise_generator, show_progress=True, trace=StepClock())
    torch.cuda.synchronize()
    record["sampling_seconds"] = time.perf_counter() - start
    marks = [start, *step_ends, time.perf_counter()]
    record["per_step_seconds"] = [b - a for a, b in zip(marks[1:-1], marks[2:])]  # DiT input of step i -> i + 1
    record["compiled"] = bool(args.compile)
    record["dit_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log(f"{args.steps} steps: {record['sampling_seconds']:.1f} s ({record['sampling_seconds'] / args.steps:.2f} s/step), peak {record['dit_peak_gib']:.1f} GiB")
    del model
    torch.cuda.empty_cache()
    start = time.perf_counter()
    frames = vae.decode(latents[:, :, 1:].to(torch.bfloat16), num_frames=NUM_FRAMES - 1)
    torch.cuda.synchronize()
    record["vae_decode_seconds"] = time.perf_counter() - start
    record["decoded_shape"] = list(frames.shape)
    record["finite"] = bool(torch.isfinite(frames).all())
    record["video_seconds"] = record["vae_encode_seconds"] + record["sampling_seconds"] + record["vae_decode_seconds"]
    record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log(f"VAE decode of {NUM_FRAMES - 1} frames: {record['vae_decode_seconds']:.1f} s; video (encode + sampling + decode) {record['video_seconds']:.1f} s; peak {record['peak_gib']:.1f} GiB")
    return record


def plot(record: dict, path: Path) -> None:
    """Bar chart of one CFG step: the reference figure, eager per backend, compiled; split by part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = record["step"]["step"]
    parts = record["step"]["profile"]["parts_seconds"]
    blocks = 56 / 2  # the profile covers 2 of the 56 blocks
    attention, matmul = parts["attention"] * blocks, parts["matmul"] * blocks
    rows = [("reference (issue figure)", 17.3, None)]
    for name in ("flash", "cudnn"):
        if "median_seconds" in step.get(name, {}):
            rows.append((f"mugen eager, {name}", step[name]["median_seconds"], name == record["step"]["best_backend"]))
    if "compiled" in record["step"]:
        rows.append(("mugen compiled, cudnn", record["step"]["compiled"]["median_seconds"], True))
    figure, axis = plt.subplots(figsize=(8, 3.2))
    for index, (label, total, split) in enumerate(rows):
        if split:
            axis.barh(index, attention, color="#d62728", label="attention" if index == len(rows) - 1 else None)
            axis.barh(index, matmul, left=attention, color="#1f77b4", label="matmul" if index == len(rows) - 1 else None)
            axis.barh(index, total - attention - matmul, left=attention + matmul, color="#aaaaaa", label="other" if index == len(rows) - 1 else None)
        else:
            axis.barh(index, total, color="#cccccc" if split is None else "#888888")
        axis.text(total + 0.2, index, f"{total:.2f} s", va="center")
    axis.axvline(14.5, color="black", linestyle="--", linewidth=1)
    axis.text(14.5, len(rows) - 0.4, " target 14.5 s", fontsize=8)
    axis.set_yticks(range(len(rows)), [row[0] for row in rows])
    axis.set_xlabel("seconds per CFG step (720p 5 s I2V, 50,402 tokens, batch 2)")
    axis.set_xlim(0, max(row[1] for row in rows) * 1.2)
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title(f"MUG-DiT 10B, {record['step']['device']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    if sys.argv[1:2] == ["plot"]:  # plot RESULTS.json OUT.png
        plot(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("step", "video"), default="step")
    parser.add_argument("--backends", nargs="+", default=["cudnn", "flash"], choices=list(BACKENDS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--compile", action="store_true", help="also time the step with every block compiled")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    record = {
        "mode": args.mode,
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shapes": {"latent": [1, 24, release_latent_frames(NUM_FRAMES), HEIGHT // 8, WIDTH // 8], "tokens": 14 * 45 * 80 + 2, "cfg_batch": 2, "text_tokens": TEXT_TOKENS},
    }
    commit_file = Path(__file__).resolve().parents[1] / "COMMIT"  # a staged copy without .git carries its commit here
    try:
        record["commit"] = commit_file.read_text().strip() if commit_file.is_file() else (
            subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
        )
    except OSError:
        record["commit"] = None
    with torch.no_grad():
        record.update(mode_step(args, device) if args.mode == "step" else mode_video(args, device))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
