"""`mugen plan`: memory per GPU and estimated step time of MUG-DiT training layouts, with a recommendation."""

from __future__ import annotations

import json

from mugen.errors import MugenError


def _latent_shape(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise MugenError(f"--latent-shape {text!r}: give TxHxW latent sizes, e.g. 10x45x80")
    return values


def register(commands) -> None:
    parser = commands.add_parser(
        "plan",
        help="estimate memory per GPU and step time of training layouts (DP/FSDP/TP/CP/PP, recompute) and pick one",
        description="Estimate the memory per GPU and the step time of MUG-DiT training layouts and recommend the "
        "fastest one that fits. Estimates: eager bf16 autocast + fp32 AdamW as `mugen train` runs; times are floors "
        "at measured H100 kernel rates plus communication at the stated link bandwidths.",
    )
    parser.add_argument("--preset", default="10B", help="DiT preset: debug, 1B, 2B, 4B, 10B, 18B")
    parser.add_argument("--resolution", default="720p", help="240p/360p/480p/540p/720p/1080p or HxW in pixels")
    duration = parser.add_mutually_exclusive_group()
    duration.add_argument("--frames", type=int, default=None, help="video frames (8 per latent frame)")
    duration.add_argument("--latent-frames", type=int, default=None, help="latent frames (default 10)")
    parser.add_argument("--latent-shape", default=None, help="TxHxW latent shape (overrides --resolution and duration)")
    parser.add_argument("--text-tokens", type=int, default=300, help="text tokens per sample (T5: 300 slots)")
    parser.add_argument("--text-dim", type=int, default=4096, help="text feature width (T5-XXL: 4096)")
    parser.add_argument("--gpu", default="h100", help="h100 or h200")
    parser.add_argument("--gpus", type=int, default=8, help="number of GPUs")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (TP and CP stay inside a node)")
    parser.add_argument("--global-batch", type=int, default=None, help="samples per optimizer step (default: one per GPU)")
    parser.add_argument("--intra-node-gbps", type=float, default=360.0, help="per-GPU collective bandwidth inside a node, GB/s (NVLink)")
    parser.add_argument("--inter-node-gbps", type=float, default=45.0, help="per-GPU collective bandwidth across nodes, GB/s (network)")
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="memory kept free for the CUDA context and fragmentation")
    parser.add_argument("--top", type=int, default=12, help="rows to show (fitting layouts first, fastest first)")
    parser.add_argument("--json", default=None, help="also write every candidate to this JSON file")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from mugen.atomic import write_text_atomically
    from mugen.distributed.plan import GPUS, Links, build_workload, gpu_for_attention_backend, plan_layouts
    from mugen.models.common.attention import get_sdpa_backend
    from mugen.models.dit import dit_config

    if args.gpu.lower() not in GPUS:
        raise MugenError(f"--gpu {args.gpu!r}: choose one of {', '.join(GPUS)}")
    if args.gpus_per_node < 1:
        raise MugenError(f"--gpus-per-node {args.gpus_per_node} must be at least 1")
    config = dit_config(args.preset, text_dim=args.text_dim)
    workload = build_workload(
        config,
        resolution=args.resolution,
        frames=args.frames,
        latent_frames=args.latent_frames,
        latent_shape=_latent_shape(args.latent_shape) if args.latent_shape else None,
        text_tokens=args.text_tokens,
        global_batch=args.global_batch or args.gpus,
    )
    links = Links(args.intra_node_gbps, args.inter_node_gbps, args.gpus_per_node)
    gpu = gpu_for_attention_backend(GPUS[args.gpu.lower()], get_sdpa_backend())  # `mugen --attention fa4 plan ...`
    result = plan_layouts(workload, gpu, args.gpus, links, reserve_gib=args.reserve_gib)
    print_plan(result, args.preset, args.top)
    if args.json:
        write_text_atomically(args.json, json.dumps(plan_record(result, args.preset), indent=1))
    return 0


def plan_record(result, preset: str) -> dict:
    from dataclasses import asdict

    return {
        "preset": preset,
        "workload": result.workload.label,
        "parameters": result.workload.parameters,
        "gpu": result.gpu.name,
        "gpus": result.gpus,
        "usable_gib": result.usable_gib,
        "recommended": result.recommended.layout.name if result.recommended else None,
        "candidates": [
            {
                "layout": candidate.layout.name,
                **asdict(candidate.layout),
                "micro_batches": candidate.micro_batches,
                "fits": candidate.fits,
                "peak_gib": candidate.memory.peak / 2**30,
                "memory_gib": {name: value / 2**30 for name, value in asdict(candidate.memory).items()},
                "time_s": asdict(candidate.time),
                "mfu": candidate.time.mfu(result.gpu.peak_tflops),
            }
            for candidate in result.candidates
        ],
    }


def print_plan(result, preset: str, top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    gib = 2**30
    workload = result.workload
    console = Console()
    console.print(
        f"[bold]MUG-DiT {preset}[/bold] ({workload.parameters / 1e9:.2f}B parameters), {workload.label}, "
        f"{workload.text_tokens} text tokens, global batch {workload.global_batch}; "
        f"{result.gpus} x {result.gpu.name} ({result.usable_gib:.1f} GiB usable each)"
    )
    links = result.links
    console.print(
        f"[dim]rates: matmul {result.gpu.matmul_tflops:.0f}, attention {result.gpu.attention_tflops:.0f} TFLOP/s, "
        f"{result.gpu.memory_gbps:.0f} GB/s ({result.gpu.source}); links (assumed): {links.intra_node_gbps:.0f} GB/s "
        f"inside a {links.gpus_per_node}-GPU node, {links.inter_node_gbps:.0f} GB/s across nodes, per GPU[/dim]"
    )
    table = Table(show_lines=False, header_style="bold")
    for title in ("layout", "µb", "params", "grads", "optim", "bf16 w", "act/blk", "acts", "attn ws", "peak GiB", "fits",
                  "compute ms", "comm ms", "bubble ms", "step ms", "MFU"):
        table.add_column(title, justify="left" if title == "layout" else "right")
    recommended = result.recommended
    for candidate in result.candidates[:top]:
        memory, timing = candidate.memory, candidate.time
        compute_ms = 1e3 * (timing.matmul_s + timing.attention_s + timing.elementwise_s)
        comm_ms = 1e3 * (timing.tp_comm_s + timing.cp_comm_exposed_s + timing.dp_comm_exposed_s)
        style = "bold green" if candidate is recommended else (None if candidate.fits else "dim")
        table.add_row(
            candidate.layout.name,
            str(candidate.micro_batches),
            f"{memory.parameters / gib:.1f}",
            f"{memory.gradients / gib:.1f}",
            f"{memory.optimizer / gib:.1f}",
            f"{memory.compute_weights / gib:.1f}",
            f"{memory.activations_per_block / gib:.2f}",
            f"{memory.activations / gib:.1f}",
            f"{memory.attention_workspace / gib:.2f}",
            f"{memory.peak / gib:.1f}",
            "yes" if candidate.fits else "no",
            f"{compute_ms:.0f}",
            f"{comm_ms:.0f}",
            f"{1e3 * timing.bubble_s:.0f}",
            f"{1e3 * timing.step_s:.0f}",
            f"{100 * timing.mfu(result.gpu.peak_tflops):.0f}%",
            style=style,
        )
    console.print(table)
    if recommended is None:
        console.print(
            "[bold red]no layout fits[/bold red]: use more GPUs, a GPU with more memory (--gpu h200), a shorter "
            "sequence, or fewer text tokens"
        )
        return
    layout = recommended.layout
    console.print(
        f"recommended: [bold]{layout.name}[/bold] ({recommended.micro_batches} micro-batch(es) per step): "
        f"{recommended.memory.peak / gib:.1f} GiB per GPU, ~{1e3 * recommended.time.step_s:.0f} ms per step "
        f"(estimated MFU {100 * recommended.time.mfu(result.gpu.peak_tflops):.0f}%)"
    )
    console.print(
        "[dim]Times are floors (kernel rates measured on an H100, communication at the stated bandwidths); an eager "
        "1B step measured 2.1x its floor. Memory: eager bf16 autocast + fp32 AdamW, activations counted from the "
        "tensors autograd saves; see benchmarks/results/plan_vs_measured.md.[/dim]"
    )
