"""FlashAttention-4 against cuDNN SDPA at MUG-DiT's head dim 72 (bf16, one GPU).

Shapes: the 10B release's 720p 5 s CFG self-attention (B 2, 48 heads, N 50,402; forward only, as in
sampling) and the self-attention of issue 5's block benchmarks (10B: 48 heads, N 17,484; 2B: 24 heads,
N 7,364; 1B: 16 heads, N 9,204; forward + backward). Correctness first: each backend's output and
gradients against a float32 math reference on fresh random inputs (B 2, 4 heads, N 1,031), and the
full-size outputs of the two backends against each other. Medians of CUDA-event timings after warm-up.

    PYTHONPATH=src python benchmarks/bench_fa4_attention.py --json fa4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mugen.models.common.flash_attn4 import fa4_attention

HEAD_DIM = 72
SHAPES = {  # name: (batch, heads, tokens, with backward)
    "i2v_10b_720p_5s_cfg": (2, 48, 14 * 45 * 80 + 2, False),
    "block_10B": (1, 48, 17482 + 2, True),
    "block_2B": (1, 24, 7362 + 2, True),
    "block_1B": (1, 16, 9202 + 2, True),
}


def cudnn(q, k, v):  # (B, heads, N, hd)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


def fa4(q, k, v):  # (B, heads, N, hd) views, as the model calls it
    return fa4_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


BACKENDS = {"cudnn": cudnn, "fa4": fa4}


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def cuda_ms(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def correctness() -> dict:
    generator = torch.Generator("cuda").manual_seed(3)
    # bf16-valued inputs, so the errors are the kernels' own
    q, k, v, grad = (torch.randn(2, 4, 1031, HEAD_DIM, device="cuda", generator=generator).bfloat16().float() for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    errors = {}
    for name, fn in BACKENDS.items():
        inputs = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        start = time.perf_counter()
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, grad.bfloat16())
        torch.cuda.synchronize()
        errors[name] = {
            "first_call_s": round(time.perf_counter() - start, 1),  # includes FA4's JIT compilation
            "out": relative_error(out, expected),
            **{f"d{n}": relative_error(g, e) for n, g, e in zip("qkv", grads, expected_grads)},
        }
        print(json.dumps({"correctness": name, **errors[name]}), flush=True)
    return errors


def masked_correctness() -> dict:
    """Cross-attention to padded text: 1,031 queries, 300 text keys of which 120 and 60 are real (B 2)."""
    generator = torch.Generator("cuda").manual_seed(5)
    q, grad = (torch.randn(2, 4, 1031, HEAD_DIM, device="cuda", generator=generator).bfloat16().float() for _ in range(2))
    k, v = (torch.randn(2, 4, 300, HEAD_DIM, device="cuda", generator=generator).bfloat16().float() for _ in range(2))
    keep = torch.arange(300, device="cuda")[None, :] < torch.tensor([[120], [60]], device="cuda")  # (B, L)
    mask = keep[:, None, None, :]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    errors = {}
    for name in ("cudnn", "fa4"):
        inputs = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        if name == "cudnn":
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out = F.scaled_dot_product_attention(*inputs, attn_mask=mask)
        else:
            out = fa4_attention(*(t.transpose(1, 2) for t in inputs), key_padding_mask=keep).transpose(1, 2)
        grads = torch.autograd.grad(out, inputs, grad.bfloat16())
        errors[name] = {"out": relative_error(out, expected), **{f"d{n}": relative_error(g, e) for n, g, e in zip("qkv", grads, expected_grads)}}
        errors[name]["padded_key_grads_zero"] = bool((grads[1][~mask[:, 0, 0, :][:, None, :, None].expand_as(grads[1])] == 0).all())
        print(json.dumps({"cross_attention_padded_text": name, **errors[name]}), flush=True)
    return errors


def timing(name: str, args) -> dict:
    batch, heads, tokens, backward = SHAPES[name]
    generator = torch.Generator("cuda").manual_seed(4)
    q, k, v = (torch.randn(batch, heads, tokens, HEAD_DIM, device="cuda", generator=generator, dtype=torch.bfloat16) for _ in range(3))
    forward_flops = 4 * batch * heads * tokens * tokens * HEAD_DIM
    flops = forward_flops * (3.5 if backward else 1.0)  # backward = 2.5x forward (recomputes the scores)
    result = {"shape": name, "batch": batch, "heads": heads, "tokens": tokens, "backward": backward}
    outputs = {}
    for backend, fn in BACKENDS.items():
        leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
        grad = torch.randn_like(q)

        def step():
            out = fn(*leaves)
            if backward:
                torch.autograd.grad(out, leaves, grad)
            return out

        with torch.no_grad():
            outputs[backend] = fn(*leaves).detach()
        times = cuda_ms(step, args.warmup, args.iters)
        median = statistics.median(times)
        result[backend] = {"median_ms": round(median, 2), "min_ms": round(min(times), 2), "tflops": round(flops / median / 1e9, 1)}
    result["fa4_vs_cudnn_out_max_rel_diff"] = relative_error(outputs["fa4"], outputs["cudnn"])
    result["speedup_fa4_over_cudnn"] = round(result["cudnn"]["median_ms"] / result["fa4"]["median_ms"], 3)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    record = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        from importlib.metadata import version

        record["flash_attn_4"] = version("flash-attn-4")
        record["nvidia_cutlass_dsl"] = version("nvidia-cutlass-dsl")
    except Exception as error:  # noqa: BLE001
        record["versions_error"] = str(error)
    record["correctness_vs_fp32_math"] = correctness()
    record["cross_attention_padded_text_vs_fp32_math"] = masked_correctness()
    record["timings"] = [timing(name, args) for name in args.shapes.split(",")]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
