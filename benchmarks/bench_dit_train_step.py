"""Time one MUG-DiT training step (forward + backward + AdamW) on a GPU.

The issue's reference point: the official 1B model (1.21B params) at 360p with 10 latent frames
(N = 9,202 tokens), AdamW, bf16 autocast took 760 ms eager / 507 ms with per-block compile on an
H100 (shared/GPU.md). 360p latents are padded to 46 x 80 by the release (45 -> 46), which gives
10 * 23 * 40 + 2 = 9,202 tokens; we feed 46 x 80 latents directly.

Variants name the eager/compiled mode, mugen.kernels on/off and the SDPA backend, e.g.
``eager-torch-default`` (the torch path, torch's SDPA choice: as before this work),
``eager-fused-cudnn`` (Triton kernels + cuDNN attention), ``compiled-cudnn`` (per-block
torch.compile; inside compiled code inductor fuses the elementwise work itself).
Before timing, each variant's bf16 forward is compared with the fp32 torch model (kernels off, no
autocast) on the same random inputs.

    PYTHONPATH=src python benchmarks/bench_dit_train_step.py --preset 1B --variants eager-torch-default,eager-fused-auto,compiled-auto
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import mugen.kernels as kernels
from mugen.models.common.attention import set_sdpa_backend
from mugen.models.dit import MUGDiT, dit_config


def parse_variant(name: str) -> tuple[bool, bool, str]:
    """'eager-fused-cudnn' -> (compile_blocks=False, fused kernels=True, backend='cudnn')."""
    parts = name.split("-")
    compile_blocks = parts[0] == "compiled"
    fused = "fused" in parts
    backend = parts[-1]
    return compile_blocks, fused, backend


def forward_error(model, inputs) -> float:
    """Relative error of the bf16-autocast forward against the fp32 torch model (kernels off)."""
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(*inputs)
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        with kernels.enabled(False):
            set_sdpa_backend("default")
            expected = model(*inputs)
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return ((out - expected).abs().max() / expected.abs().max()).item()


def run(args, variant: str, fused_adam: bool) -> dict:
    compile_blocks, fused_kernels, backend = parse_variant(variant)
    kernels.set_enabled(None if fused_kernels else False)
    set_sdpa_backend(backend)
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = MUGDiT(dit_config(args.preset, text_dim=args.text_dim)).to(device)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    for block in model.blocks:  # cross-attention output projections start at zero: make them matter
        torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.02)
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adam)
    b, t, h, w = args.batch, args.latent_frames, args.latent_height, args.latent_width
    x0 = torch.randn(b, 24, t, h, w, device=device)
    text = torch.randn(b, args.text_len, args.text_dim, device=device)
    mask = torch.ones(b, args.text_len, dtype=torch.bool, device=device)
    mask[:, args.text_len // 2 :] = False  # realistic padding: half the prompt slots are padding
    fps = torch.full((b,), 30.0, device=device)
    tokens = t * (h // 2) * (w // 2) + 2

    error = None
    if args.check and not compile_blocks:  # compiled blocks: checked in bench_dit_block.py
        generator = torch.Generator(device=device).manual_seed(1)
        check_inputs = (torch.randn(x0.shape, device=device, generator=generator), torch.rand(b, device=device, generator=generator) * 1000, text, mask, fps)
        error = forward_error(model, check_inputs)
        kernels.set_enabled(None if fused_kernels else False)
        set_sdpa_backend(backend)

    def step():
        noise = torch.randn_like(x0)
        time_ = torch.rand(b, device=device)
        x_t = (1 - time_.view(-1, 1, 1, 1, 1)) * x0 + time_.view(-1, 1, 1, 1, 1) * noise
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x_t, time_ * 1000, text, mask, fps)
        loss = (out[:, :24] - (x0 - noise)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    d, depth, m = model.config.hidden_size, model.config.depth, args.text_len
    n = tokens
    # DESIGN.md: per block forward = 2N*14d^2 + 4M*d^2 + 4N^2*d + 4NM*d; backward = 2x forward.
    flops = 3 * b * depth * (2 * n * 14 * d * d + 4 * m * d * d + 4 * n * n * d + 4 * n * m * d)
    median_ms = statistics.median(times)
    profile_table = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            step()
            torch.cuda.synchronize()
        profile_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90)
    result = {
        "variant": variant,
        "preset": args.preset,
        "params": model.num_parameters,
        "tokens": n,
        "batch": b,
        "compile_blocks": compile_blocks,
        "fused_adamw": fused_adam,
        "activation_memory_budget": args.activation_memory_budget if compile_blocks else None,
        "median_step_ms": round(median_ms, 1),
        "min_step_ms": round(min(times), 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "model_tflops_per_s": round(flops / (median_ms / 1e3) / 1e12, 1),
        "warmup_s": round(warmup_s, 1),
        "forward_relative_error_vs_fp32": None if error is None else float(f"{error:.3g}"),
    }
    del model, optimizer
    torch.cuda.empty_cache()
    kernels.set_enabled(None)
    set_sdpa_backend("auto")
    return result, profile_table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1B", help="DiT preset name")
    parser.add_argument("--latent-frames", type=int, default=10, help="latent frames (T/8)")
    parser.add_argument("--latent-height", type=int, default=46, help="latent height (H/8)")
    parser.add_argument("--latent-width", type=int, default=80, help="latent width (W/8)")
    parser.add_argument("--text-len", type=int, default=300, help="text tokens (T5: 300)")
    parser.add_argument("--text-dim", type=int, default=4096, help="text feature width (T5-XXL: 4096)")
    parser.add_argument("--batch", type=int, default=1, help="samples per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--variants",
        default="eager-torch-default,eager-fused-auto,compiled-default,compiled-auto",
        help="comma-separated (eager|compiled)[-torch|-fused]-(auto|default|cudnn|flash|efficient) variants",
    )
    parser.add_argument("--fused-adam", choices=["no", "yes", "both"], default="yes", help="fused AdamW")
    parser.add_argument(
        "--activation-memory-budget",
        type=float,
        default=None,
        help="compiled variants: torch._functorch activation_memory_budget (1.0 = default partitioner; lower "
        "recomputes cheap pointwise ops in the backward to keep fewer activations; no block recompute)",
    )
    parser.add_argument("--check", action="store_true", help="compare each variant's forward with the fp32 model first")
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of the last variant's step here")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()
    fused_options = {"no": [False], "yes": [True], "both": [False, True]}[args.fused_adam]
    if args.activation_memory_budget is not None:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = args.activation_memory_budget
    results = []
    variants = args.variants.split(",")
    for variant in variants:
        for fused in fused_options:
            wants_profile = args.profile is not None and variant == variants[-1] and fused == fused_options[-1]
            args_for_run = argparse.Namespace(**{**vars(args), "profile": wants_profile})
            try:
                result, table = run(args_for_run, variant, fused)
            except torch.cuda.OutOfMemoryError as error:
                result, table = {"variant": variant, "fused_adamw": fused, "error": f"out of memory: {error}"[:300]}, None
                torch.cuda.empty_cache()
            print(json.dumps(result), flush=True)
            results.append(result)
            if table is not None:
                with open(args.profile, "w") as handle:
                    handle.write(f"# {args.preset} training step, variant {variant}, fused AdamW {fused}\n\n{table}\n")
                print(table, flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
