"""Time one MUG-DiT block forward + backward on a GPU (bf16), check it against an fp32 reference.

Issue 5's block targets (official figures from shared/GPU.md, H100, torch 2.11):
    10B width 3456 / 48 heads, N = 17,482 video tokens (+2), 300 text tokens: official 93.3 ms eager,
    82.9 ms compiled, target <= 68 ms;  2B width 1728 / 24 heads, N = 7,362 (+2): 12.4 / 9.8 ms,
    target <= 7.5 ms.

Parts (all by default):
    attention  SDPA head dim 72 fwd+bwd per backend (cuDNN, flash, efficient), TFLOP/s, and each
               backend's error against an fp32 math reference on fresh random inputs;
    kernels    mugen.kernels on real shapes, bf16 and fp32, forward and backward, against their torch
               references computed in fp32;
    block      the block's variants (torch / fused kernels, eager / per-block compile, SDPA backend):
               median fwd+bwd time, and the error of output and gradients against the fp32 torch
               block on the same random inputs (kernels off, fp32 weights);
    profile    torch.profiler table of the fastest variant, top kernels by CUDA time.

    PYTHONPATH=src python benchmarks/bench_dit_block.py --json block.json --profile-dir .
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

import mugen.kernels as kernels
from mugen.models.common.attention import set_sdpa_backend
from mugen.models.common.rope import rope_rotations, video_rope_angles
from mugen.models.dit.model import MUGDiTBlock

SIZES = {  # name: (width, heads, video tokens)
    "10B": (3456, 48, 17482),
    "2B": (1728, 24, 7362),
    "1B": (1152, 16, 9202),
}
OFFICIAL_MS = {"10B": (93.3, 82.9, 68.0), "2B": (12.4, 9.8, 7.5)}  # eager, compiled, target (GPU.md, issue 5)
VARIANTS = {  # name: (fused kernels, per-block compile, SDPA backend)
    "torch-eager-default": (False, False, "default"),
    "torch-eager-flash": (False, False, "flash"),
    "torch-eager-cudnn": (False, False, "cudnn"),
    "fused-eager-cudnn": (True, False, "cudnn"),
    "fused-eager-cudnn-bhnd": (True, False, "cudnn"),  # q/k/v written heads-first contiguous
    "compiled-cudnn": (False, True, "cudnn"),
    # FlashAttention-4 for the self-attention (optional package, mugen.models.common.flash_attn4)
    "fused-eager-fa4": (True, False, "fa4"),
    "compiled-fa4": (False, True, "fa4"),
    # the compiled block's fwd+bwd replayed from one CUDA graph: no CPU launch overhead (GPU time alone)
    "compiled-fa4-graph": (False, True, "fa4"),
    "compiled-cudnn-graph": (False, True, "cudnn"),
}
TEXT_TOKENS = 300
HEAD_DIM = 72


def cuda_time_ms(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return times


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------- attention


def attention_part(args) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    results = []
    generator = torch.Generator(device="cuda").manual_seed(11)
    # correctness at a size where the fp32 math reference fits: fresh random q, k, v
    # bf16-valued inputs, so the errors below are the backends' own, not the inputs' rounding
    q, k, v = (torch.randn(2, 4, 1031, HEAD_DIM, device="cuda", generator=generator).bfloat16().float() for _ in range(3))
    grad = torch.randn(2, 4, 1031, HEAD_DIM, device="cuda", generator=generator).bfloat16().float()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(*leaves)
    expected.backward(grad)
    expected_grads = [t.grad for t in leaves]
    errors = {}
    for name, backend in backends.items():
        leaves_bf16 = [t.bfloat16().requires_grad_(True) for t in (q, k, v)]
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*leaves_bf16)
        out.backward(grad.bfloat16())
        errors[name] = {
            "out": relative_error(out, expected),
            **{f"d{n}": relative_error(t.grad, g) for n, t, g in zip("qkv", leaves_bf16, expected_grads)},
        }
    print(json.dumps({"attention_errors_vs_fp32_math": errors}), flush=True)
    for size in args.sizes:
        width, heads, tokens = SIZES[size]
        n = tokens + 2
        q, k, v = (torch.randn(1, heads, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        flops = 4 * n * n * HEAD_DIM * heads * 3.5  # fwd 4 N^2 d; bwd 2.5x fwd (recomputes the scores)
        outputs = {}
        for name, backend in backends.items():
            def step():
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v)
                out.backward(grad)
                return out

            with sdpa_kernel(backend):
                outputs[name] = F.scaled_dot_product_attention(q, k, v).detach()
            times = cuda_time_ms(step, 2, args.iters)
            median = statistics.median(times)
            results.append({"size": size, "heads": heads, "tokens": n, "backend": name, "median_ms": round(median, 3),
                            "tflops": round(flops / median / 1e9, 1), "error_vs_fp32_math": errors[name]})
            print(json.dumps(results[-1]), flush=True)
        # cuDNN and flash on (B, heads, N, hd) views of (B, N, heads, hd) tensors (the torch path's layout)
        q_t, k_t, v_t = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
        for name in ("cudnn", "flash"):
            def step_views():
                with sdpa_kernel(backends[name]):
                    out = F.scaled_dot_product_attention(q_t, k_t, v_t)
                out.transpose(1, 2).backward(grad.transpose(1, 2).contiguous())

            median = statistics.median(cuda_time_ms(step_views, 2, args.iters))
            results.append({"size": size, "heads": heads, "tokens": n, "backend": name, "layout": "bnhd views",
                            "median_ms": round(median, 3), "tflops": round(flops / median / 1e9, 1)})
            print(json.dumps(results[-1]), flush=True)
        for name in ("flash", "efficient"):
            results[-1].setdefault("full_size_difference_vs_cudnn", {})[name] = relative_error(outputs[name], outputs["cudnn"])
        del q, k, v, grad, outputs
        torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------------- kernels


def kernels_part(args) -> list[dict]:
    """The three kernels on real shapes (2B width) against their torch references in fp32."""
    results = []
    width, heads, tokens = SIZES["2B"]
    n = tokens + 2
    generator = torch.Generator(device="cuda").manual_seed(3)

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, device="cuda", generator=generator) * scale + shift

    use_t0 = torch.rand(1, n, device="cuda", generator=generator) > 0.7
    rotations = rope_rotations(video_rope_angles(torch.arange(15, device="cuda")[None], 30, 20, HEAD_DIM)[:, :n])
    cases = {
        "gated_residual": (
            lambda x, y, b, g, g0: kernels.gated_residual(x, y, b, g, g0, use_t0),
            lambda x, y, b, g, g0: kernels.gated_residual_reference(x, y, b, g, g0, use_t0),
            [randn(1, n, width), randn(1, n, width), randn(width), randn(1, width), randn(1, width)],
        ),
        "layernorm_modulate": (
            lambda x, s, c, s0, c0: kernels.layernorm_modulate(x, s, c, s0, c0, use_t0),
            lambda x, s, c, s0, c0: kernels.layernorm_modulate_reference(x, s, c, s0, c0, use_t0),
            [randn(1, n, width, scale=3, shift=0.5), randn(1, width), randn(1, width), randn(1, width), randn(1, width)],
        ),
        "qk_norm_rope": (
            lambda qkv, wq, wk: kernels.qk_norm_rope(qkv, wq, wk, rotations),
            lambda qkv, wq, wk: kernels.qk_norm_rope_reference(qkv, wq, wk, rotations),
            [randn(1, n, 3, heads, HEAD_DIM, scale=2), randn(HEAD_DIM, scale=0.3, shift=1), randn(HEAD_DIM, scale=0.3, shift=1)],
        ),
        "rms_norm": (
            kernels.rms_norm,
            kernels.rms_norm_reference,
            [randn(1, n, heads, HEAD_DIM, scale=2), randn(HEAD_DIM, scale=0.3, shift=1)],
        ),
    }
    for name, (fused, reference, inputs) in cases.items():
        for dtype in (torch.float32, torch.bfloat16):
            fused_in = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
            ref_in = [t.detach().float().requires_grad_(True) for t in fused_in]
            with kernels.enabled(True):
                outs = fused(*fused_in)
            with kernels.enabled(False):
                refs = reference(*ref_in)
            outs = outs if isinstance(outs, tuple) else (outs,)
            refs = refs if isinstance(refs, tuple) else (refs,)
            upstream = [torch.randn(r.shape, device="cuda", generator=generator).to(dtype) for r in refs]
            torch.autograd.backward([o.float() for o in outs], [u.float() for u in upstream])
            torch.autograd.backward(list(refs), [u.float() for u in upstream])
            errors = {f"out{i}": relative_error(o, r) for i, (o, r) in enumerate(zip(outs, refs))}
            errors.update({f"grad{i}": relative_error(a.grad, b.grad) for i, (a, b) in enumerate(zip(fused_in, ref_in))})
            # the same reference run in dtype, as a yardstick for bf16
            with kernels.enabled(False):
                refs_low = reference(*[t.detach() for t in fused_in])
            refs_low = refs_low if isinstance(refs_low, tuple) else (refs_low,)
            errors.update({f"torch_{dtype_name(dtype)}_out{i}": relative_error(o, r) for i, (o, r) in enumerate(zip(refs_low, refs))})
            results.append({"kernel": name, "dtype": dtype_name(dtype), "relative_errors": {k: float(f"{v:.3g}") for k, v in errors.items()}})
            print(json.dumps(results[-1]), flush=True)
    return results


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------- block


def block_inputs(width: int, tokens: int, seed: int):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    n = tokens + 2
    x = torch.randn(1, n, width, device="cuda", generator=generator)
    text = torch.randn(1, TEXT_TOKENS, width, device="cuda", generator=generator)
    t_mod = 0.5 * torch.randn(1, 6 * width, device="cuda", generator=generator)
    t0_mod = 0.5 * torch.randn(1, 6 * width, device="cuda", generator=generator)
    # a token grid of N tokens: 2 frames of 1 x N/2 (RoPE positions only; the cost does not depend on them)
    angles = video_rope_angles(torch.arange(4, device="cuda")[None], 1, tokens // 2, HEAD_DIM)
    rope = rope_rotations(angles)  # (1, 1, N + 2, hd / 2)
    grad = torch.randn(1, n, width, device="cuda", generator=generator)
    return x, text, t_mod, t0_mod, rope, grad


def make_block(width: int, heads: int, seed: int) -> MUGDiTBlock:
    torch.manual_seed(seed)
    block = MUGDiTBlock(width, heads)
    with torch.no_grad():
        for parameter in block.parameters():  # every weight non-zero, RMSNorm weights off 1
            parameter.add_(0.02 * torch.randn_like(parameter))
    return block.cuda()


def run_block(block, inputs, dtype, want_grads: bool):
    x, text, t_mod, t0_mod, rope, grad = inputs
    x = x.detach().to(dtype).requires_grad_(True)
    out = block(x, text.to(dtype), None, t_mod.to(dtype), t0_mod.to(dtype), None, rope)
    out.backward(grad.to(dtype))
    if not want_grads:
        return None
    grads = {"x": x.grad, **{name: p.grad for name, p in block.named_parameters()}}
    return out.detach(), grads


def graphed_block_step(block, inputs, dtype):
    """The block's forward + backward captured once in a CUDA graph (PyTorch's whole-network capture: warm-up
    on a side stream, gradients None at capture so each replay writes them afresh); returns the replay."""
    x, text, t_mod, t0_mod, rope, grad = inputs
    x = x.detach().to(dtype).requires_grad_(True)
    text, t_mod, t0_mod, grad = text.to(dtype), t_mod.to(dtype), t0_mod.to(dtype), grad.to(dtype)

    def forward_backward():
        block(x, text, None, t_mod, t0_mod, None, rope).backward(grad)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward_backward()
            block.zero_grad(set_to_none=True)
            x.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward_backward()
    return graph.replay


def in_bf16(inputs):
    """The block inputs in bf16, RoPE rotations (complex) as they are."""
    return tuple(t if t.is_complex() else t.to(torch.bfloat16) for t in inputs)


def block_part(args) -> tuple[list[dict], dict]:
    results, best = [], {}
    for size in args.sizes:
        width, heads, tokens = SIZES[size]
        master = make_block(width, heads, seed=5)
        inputs = block_inputs(width, tokens, seed=6)
        half_inputs = in_bf16(inputs)  # cast once: the timed step is the block's fwd+bwd, not input casts
        # fp32 reference: torch path, fp32 weights and inputs, TF32 off
        reference = copy.deepcopy(master).float()
        torch.backends.cuda.matmul.allow_tf32 = False
        with kernels.enabled(False):
            ref_out, ref_grads = run_block(reference, inputs, torch.float32, True)
        del reference
        torch.cuda.empty_cache()
        for variant in args.variants:
            fused, compiled, backend = VARIANTS[variant]
            block = copy.deepcopy(master).to(torch.bfloat16)
            set_sdpa_backend(backend)
            from mugen.kernels import triton_kernels

            triton_kernels.QKV_LAYOUT = "bhnd" if variant.endswith("-bhnd") else "bnhd"
            if compiled:
                block.compile()
            with kernels.enabled(None if fused else False):
                start = time.perf_counter()
                out, grads = run_block(block, half_inputs, torch.bfloat16, True)
                first_call_s = time.perf_counter() - start
                errors = {"out": relative_error(out, ref_out)}
                errors.update({f"grad_{name}": relative_error(grads[name], ref_grads[name]) for name in args.checked_grads})
                block.zero_grad(set_to_none=True)

                def step():
                    run_block(block, half_inputs, torch.bfloat16, False)
                    block.zero_grad(set_to_none=True)

                try:
                    if variant.endswith("-graph"):
                        step = graphed_block_step(block, half_inputs, torch.bfloat16)
                    torch.cuda.reset_peak_memory_stats()
                    times = cuda_time_ms(step, args.warmup, args.iters)
                except Exception as error:  # keep the other variants' figures
                    results.append({"size": size, "variant": variant, "error": repr(error)})
                    print(json.dumps(results[-1]), flush=True)
                    del block
                    torch.cuda.empty_cache()
                    continue
            median = statistics.median(times)
            official = OFFICIAL_MS.get(size)
            results.append({
                "size": size, "width": width, "heads": heads, "tokens": tokens + 2, "variant": variant,
                "median_ms": round(median, 2), "min_ms": round(min(times), 2),
                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "first_call_s": round(first_call_s, 1),
                "official_eager_ms": official[0] if official else None,
                "official_compiled_ms": official[1] if official else None,
                "target_ms": official[2] if official else None,
                "relative_error_vs_fp32": {k: float(f"{v:.3g}") for k, v in errors.items()},
            })
            print(json.dumps(results[-1]), flush=True)
            if size not in best or median < best[size][1]:
                best[size] = (variant, median)
            del block
            torch.cuda.empty_cache()
        set_sdpa_backend("auto")
    return results, best


def profile_part(args, size: str, variant: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    width, heads, tokens = SIZES[size]
    fused, compiled, backend = VARIANTS[variant]
    block = make_block(width, heads, seed=5).to(torch.bfloat16)
    inputs = in_bf16(block_inputs(width, tokens, seed=6))
    set_sdpa_backend(backend)
    if compiled:
        block.compile()
    with kernels.enabled(None if fused else False):
        for _ in range(3):
            run_block(block, inputs, torch.bfloat16, False)
            block.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=args.profile_stacks) as prof:
            for _ in range(args.profile_iters):
                run_block(block, inputs, torch.bfloat16, False)
                block.zero_grad(set_to_none=True)  # as the timed steps do (no gradient accumulation)
            torch.cuda.synchronize()
    set_sdpa_backend("auto")
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile_rows, max_name_column_width=90)
    if args.profile_stacks:  # where the eager (uncompiled) kernels are launched from
        table += "\n" + prof.key_averages(group_by_stack_n=6).table(
            sort_by="cuda_time_total", row_limit=args.profile_rows, max_name_column_width=90
        )
    return f"# {size} block, variant {variant}, {args.profile_iters} iterations of fwd+bwd\n\n{table}\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="attention,kernels,block,profile", help="comma-separated parts to run")
    parser.add_argument("--sizes", default="10B,2B", help="comma-separated block sizes (10B, 2B, 1B)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated block variants of {', '.join(VARIANTS)}")
    parser.add_argument("--checked-grads", default="x,attn.qkv.weight,attn.q_norm.weight,mlp.fc2.bias,scale_shift_table",
                        help="gradients compared with the fp32 reference")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--profile-iters", type=int, default=3, help="profiled iterations")
    parser.add_argument("--profile-rows", type=int, default=25, help="rows of the profiler table")
    parser.add_argument("--profile-dir", default=None, help="write profiler tables here")
    parser.add_argument("--profile-stacks", action="store_true", help="also a table grouped by Python call stack")
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args()
    args.sizes = args.sizes.split(",")
    args.variants = args.variants.split(",")
    args.checked_grads = args.checked_grads.split(",")
    parts = args.parts.split(",")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    import triton

    report["triton"] = triton.__version__
    for part, fn in (("attention", attention_part), ("kernels", kernels_part)):
        if part in parts:
            try:
                report[part] = fn(args)
            except Exception as error:  # keep the other parts' figures
                report[part + "_error"] = repr(error)
                print(f"{part} failed: {error!r}", flush=True)
    if "block" in parts:
        try:
            report["block"], best = block_part(args)
        except Exception as error:
            report["block_error"] = repr(error)
            print(f"block failed: {error!r}", flush=True)
            best = {}
        if "profile" in parts and args.profile_dir:
            for size, (variant, _) in best.items():
                try:
                    table = profile_part(args, size, variant)
                    with open(f"{args.profile_dir}/dit_block_{size}_profile.txt", "w") as handle:
                        handle.write(table)
                    print(table, flush=True)
                except Exception as error:
                    print(f"profile failed: {error!r}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
