"""Triton kernels and their ``autograd.Function`` wrappers (imported lazily by ``mugen.kernels``).

All arithmetic is float32 in registers; tensors are read and written in their own dtypes. Reductions
over tokens in the backward passes (gradients of the broadcast gate / shift / scale / bias and of
the RMSNorm weights) are written as per-program partial sums and finished with one ``torch.sum``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 32  # tokens per program in the reducing backward kernels


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def _selection(use_t0: torch.Tensor | None, batch: int, tokens: int, device) -> torch.Tensor:
    """(B, T) bool -> contiguous int8 flags, or a 1-element dummy when there is no selection."""
    if use_t0 is None:
        return torch.zeros(1, dtype=torch.int8, device=device)
    return use_t0.reshape(batch, tokens).to(torch.int8).contiguous()


# ---------------------------------------------------------------- (a) bias + gated residual add


@triton.jit
def _gated_residual_fwd(
    X, Y, BIAS, GATE, GATE0, SEL, OUT,
    T, D,
    HAS_BIAS: tl.constexpr, HAS_SEL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # over B * T; x, y, out are contiguous (B, T, D); gates contiguous (B, D)
    b = row // T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SEL:
        gate0 = tl.load(GATE0 + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        use0 = tl.load(SEL + row).to(tl.int32)
        gate = tl.where(use0 != 0, gate0, gate)
    tl.store(OUT + row * D + cols, (x + gate * y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd(
    DOUT, Y, BIAS, GATE, GATE0, SEL, DY, PARTIAL,
    T, D, NUM_BLOCKS,
    HAS_BIAS: tl.constexpr, HAS_SEL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)  # token block
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
    gate0 = gate
    if HAS_SEL:
        gate0 = tl.load(GATE0 + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_gate0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ROWS):
        t = block * ROWS + i
        valid = t < T
        row = b * T + t
        mask = cmask & ((cols * 0 + t) < T)
        dout = tl.load(DOUT + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32) + bias
        use0 = tl.full([], 0, tl.int32)
        if HAS_SEL:
            use0 = tl.load(SEL + row, mask=valid, other=0).to(tl.int32)
        g = tl.where(use0 != 0, gate0, gate)
        dy = dout * g
        tl.store(DY + row * D + cols, dy.to(DY.dtype.element_ty), mask=mask)
        acc_bias += dy
        contribution = dout * y
        acc_gate += tl.where(use0 != 0, 0.0, contribution)
        acc_gate0 += tl.where(use0 != 0, contribution, 0.0)
    base = PARTIAL + ((b * NUM_BLOCKS + block) * 3) * D  # partial sums (B, blocks, 3, D)
    tl.store(base + cols, acc_bias, mask=cmask)
    tl.store(base + D + cols, acc_gate, mask=cmask)
    tl.store(base + 2 * D + cols, acc_gate0, mask=cmask)


class GatedResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, bias, gate, gate0, use_t0, out_dtype):
        batch, tokens, dim = x.shape
        gate_shape, gate0_shape = gate.shape, None if gate0 is None else gate0.shape
        x, y = x.contiguous(), y.contiguous()
        gate = gate.reshape(batch, dim).contiguous()
        has_sel = use_t0 is not None
        gate0 = gate0.reshape(batch, dim).contiguous() if has_sel else gate
        sel = _selection(use_t0, batch, tokens, x.device)
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        block = triton.next_power_of_2(dim)
        bias_arg = bias if bias is not None else gate
        _gated_residual_fwd[(batch * tokens,)](
            x, y, bias_arg, gate, gate0, sel, out, tokens, dim,
            HAS_BIAS=bias is not None, HAS_SEL=has_sel, BLOCK_D=block, num_warps=_warps(block),
        )
        ctx.save_for_backward(y, bias, gate, gate0, sel)
        ctx.has_sel = has_sel
        ctx.gate_shapes = (gate_shape, gate0_shape)
        ctx.dtypes = (x.dtype, gate.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        y, bias, gate, gate0, sel = ctx.saved_tensors
        batch, tokens, dim = y.shape
        dout = dout.contiguous()
        x_dtype, gate_dtype, bias_dtype = ctx.dtypes
        num_blocks = triton.cdiv(tokens, ROWS_PER_PROGRAM)
        dy = torch.empty_like(y)
        partial = torch.empty(batch, num_blocks, 3, dim, dtype=torch.float32, device=y.device)
        block = triton.next_power_of_2(dim)
        _gated_residual_bwd[(num_blocks, batch)](
            dout, y, bias if bias is not None else gate, gate, gate0, sel, dy, partial, tokens, dim, num_blocks,
            HAS_BIAS=bias is not None, HAS_SEL=ctx.has_sel, ROWS=ROWS_PER_PROGRAM, BLOCK_D=block,
            num_warps=_warps(block),
        )
        sums = partial.sum(1)  # (B, 3, D)
        dx = dout if dout.dtype == x_dtype else dout.to(x_dtype)
        dbias = sums[:, 0].sum(0).to(bias_dtype) if bias is not None and ctx.needs_input_grad[2] else None
        gate_shape, gate0_shape = ctx.gate_shapes
        dgate = sums[:, 1].to(gate_dtype).reshape(gate_shape)
        dgate0 = sums[:, 2].to(gate_dtype).reshape(gate0_shape) if ctx.has_sel else None
        return dx, dy, dbias, dgate, dgate0, None, None


# ---------------------------------------------------------------- (b) LayerNorm + adaLN modulation


@triton.jit
def _layernorm_modulate_fwd(
    X, OUT, SHIFT, SCALE, SHIFT0, SCALE0, SEL, MEAN, RSTD,
    T, D, eps,
    HAS_SEL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # over B * T; x, out contiguous (B, T, D); shift/scale contiguous (B, D)
    b = row // T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(mask, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    normed = centred * rstd
    shift = tl.load(SHIFT + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SEL:
        use0 = tl.load(SEL + row).to(tl.int32)
        shift0 = tl.load(SHIFT0 + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        scale0 = tl.load(SCALE0 + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.where(use0 != 0, shift0, shift)
        scale = tl.where(use0 != 0, scale0, scale)
    tl.store(OUT + row * D + cols, (normed * (1.0 + scale) + shift).to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layernorm_modulate_bwd(
    X, DOUT, DX, SCALE, SCALE0, SEL, MEAN, RSTD, PARTIAL,
    T, D, NUM_BLOCKS,
    HAS_SEL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    scale = tl.load(SCALE + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
    scale0 = scale
    if HAS_SEL:
        scale0 = tl.load(SCALE0 + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_shift0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ROWS):
        t = block * ROWS + i
        valid = t < T
        row = b * T + t
        mask = cmask & ((cols * 0 + t) < T)
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row, mask=valid, other=0.0)
        rstd = tl.load(RSTD + row, mask=valid, other=0.0)
        normed = tl.where(mask, (x - mean) * rstd, 0.0)
        use0 = tl.full([], 0, tl.int32)
        if HAS_SEL:
            use0 = tl.load(SEL + row, mask=valid, other=0).to(tl.int32)
        g = dout * (1.0 + tl.where(use0 != 0, scale0, scale))
        mean_g = tl.sum(g, axis=0) / D
        mean_gn = tl.sum(g * normed, axis=0) / D
        dx = (g - mean_g - normed * mean_gn) * rstd
        tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dscale = dout * normed
        acc_shift += tl.where(use0 != 0, 0.0, dout)
        acc_scale += tl.where(use0 != 0, 0.0, dscale)
        acc_shift0 += tl.where(use0 != 0, dout, 0.0)
        acc_scale0 += tl.where(use0 != 0, dscale, 0.0)
    base = PARTIAL + ((b * NUM_BLOCKS + block) * 4) * D  # partial sums (B, blocks, 4, D)
    tl.store(base + cols, acc_shift, mask=cmask)
    tl.store(base + D + cols, acc_scale, mask=cmask)
    tl.store(base + 2 * D + cols, acc_shift0, mask=cmask)
    tl.store(base + 3 * D + cols, acc_scale0, mask=cmask)


class LayerNormModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, shift0, scale0, use_t0, eps, out_dtype):
        batch, tokens, dim = x.shape
        ctx.param_shapes = (shift.shape, scale.shape, None if shift0 is None else shift0.shape, None if scale0 is None else scale0.shape)
        x = x.contiguous()
        shift, scale = shift.reshape(batch, dim).contiguous(), scale.reshape(batch, dim).contiguous()
        has_sel = use_t0 is not None
        if has_sel:
            shift0, scale0 = shift0.reshape(batch, dim).contiguous(), scale0.reshape(batch, dim).contiguous()
        else:
            shift0, scale0 = shift, scale
        sel = _selection(use_t0, batch, tokens, x.device)
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        mean = torch.empty(batch * tokens, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block = triton.next_power_of_2(dim)
        _layernorm_modulate_fwd[(batch * tokens,)](
            x, out, shift, scale, shift0, scale0, sel, mean, rstd, tokens, dim, eps,
            HAS_SEL=has_sel, BLOCK_D=block, num_warps=_warps(block),
        )
        ctx.save_for_backward(x, scale, scale0, sel, mean, rstd)
        ctx.has_sel = has_sel
        ctx.param_dtype = shift.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        x, scale, scale0, sel, mean, rstd = ctx.saved_tensors
        batch, tokens, dim = x.shape
        dout = dout.contiguous()
        num_blocks = triton.cdiv(tokens, ROWS_PER_PROGRAM)
        dx = torch.empty_like(x)
        partial = torch.empty(batch, num_blocks, 4, dim, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(dim)
        _layernorm_modulate_bwd[(num_blocks, batch)](
            x, dout, dx, scale, scale0, sel, mean, rstd, partial, tokens, dim, num_blocks,
            HAS_SEL=ctx.has_sel, ROWS=ROWS_PER_PROGRAM, BLOCK_D=block, num_warps=_warps(block),
        )
        sums = partial.sum(1).to(ctx.param_dtype)  # (B, 4, D)
        shapes = ctx.param_shapes
        dshift, dscale = sums[:, 0].reshape(shapes[0]), sums[:, 1].reshape(shapes[1])
        if ctx.has_sel:
            return dx, dshift, dscale, sums[:, 2].reshape(shapes[2]), sums[:, 3].reshape(shapes[3]), None, None, None
        return dx, dshift, dscale, None, None, None, None, None


# ---------------------------------------------------------------- (c) QK RMSNorm + 3D RoPE


@triton.jit
def _qk_norm_rope_fwd(
    QKV, ROT, QW, KW, OUT_Q, OUT_K, OUT_V,
    R, N, H, HALF, HD,
    s_b, s_n, s_w, s_h,  # qkv (B, N, 3, H, hd) strides; the head-dim stride is 1
    r_b, r_n,  # rotations (B, N, hd/2, 2) float32 strides; (cos, sin) pairs contiguous
    o_b, o_n, o_h,  # output strides (shared by q, k, v); the head-dim stride is 1
    eps,
    ROUND_PRODUCT: tl.constexpr, ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    which = tl.program_id(1)  # 0: q, 1: k, 2: v (copied into the output layout)
    rows = pid * ROWS + tl.arange(0, ROWS)  # row = (b * N + n) * H + h
    rmask = rows < R
    h = rows % H
    n = (rows // H) % N
    b = rows // (H * N)
    pairs = tl.arange(0, BLOCK_HALF)
    pmask = pairs < HALF
    mask = rmask[:, None] & pmask[None, :]
    src = QKV + (b * s_b + n * s_n + which * s_w + h * s_h)[:, None] + 2 * pairs[None, :]
    x_even = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # (ROWS, HALF) channels 2i
    x_odd = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)  # channels 2i + 1
    dst = (b * o_b + n * o_n + h * o_h)[:, None] + 2 * pairs[None, :]
    if which == 2:
        tl.store(OUT_V + dst, x_even.to(OUT_V.dtype.element_ty), mask=mask)
        tl.store(OUT_V + dst + 1, x_odd.to(OUT_V.dtype.element_ty), mask=mask)
    else:
        # RMSNorm in fp32, rounded back to the input dtype (as RMSNorm does), then the weight.
        rstd = 1.0 / tl.sqrt(tl.sum(x_even * x_even + x_odd * x_odd, axis=1) / HD + eps)
        n_even = (x_even * rstd[:, None]).to(QKV.dtype.element_ty).to(tl.float32)
        n_odd = (x_odd * rstd[:, None]).to(QKV.dtype.element_ty).to(tl.float32)
        if which == 0:
            w_even = tl.load(QW + 2 * pairs, mask=pmask, other=0.0).to(tl.float32)
            w_odd = tl.load(QW + 2 * pairs + 1, mask=pmask, other=0.0).to(tl.float32)
        else:
            w_even = tl.load(KW + 2 * pairs, mask=pmask, other=0.0).to(tl.float32)
            w_odd = tl.load(KW + 2 * pairs + 1, mask=pmask, other=0.0).to(tl.float32)
        a = n_even * w_even[None, :]
        c = n_odd * w_odd[None, :]
        if ROUND_PRODUCT:  # weight and input both low precision: the product is rounded too
            a = a.to(QW.dtype.element_ty).to(tl.float32)
            c = c.to(QW.dtype.element_ty).to(tl.float32)
        rot = ROT + (b * r_b + n * r_n)[:, None] + 2 * pairs[None, :]
        cos = tl.load(rot, mask=mask, other=1.0)
        sin = tl.load(rot + 1, mask=mask, other=0.0)
        out_even = a * cos - c * sin  # (a + ic)(cos + i sin), interleaved pairs
        out_odd = a * sin + c * cos
        if which == 0:
            tl.store(OUT_Q + dst, out_even.to(OUT_Q.dtype.element_ty), mask=mask)
            tl.store(OUT_Q + dst + 1, out_odd.to(OUT_Q.dtype.element_ty), mask=mask)
        else:
            tl.store(OUT_K + dst, out_even.to(OUT_K.dtype.element_ty), mask=mask)
            tl.store(OUT_K + dst + 1, out_odd.to(OUT_K.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_bwd(
    QKV, ROT, QW, KW, DQ, DK, DV, DQKV, PARTIAL,
    R, N, H, HALF, HD, NUM_BLOCKS,
    s_b, s_n, s_w, s_h,
    r_b, r_n,
    g_b, g_n, g_h,  # batch, token and head strides of the incoming gradients (shared by dq, dk, dv)
    eps,
    ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    which = tl.program_id(1)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < R
    h = rows % H
    n = (rows // H) % N
    b = rows // (H * N)
    pairs = tl.arange(0, BLOCK_HALF)
    pmask = pairs < HALF
    mask = rmask[:, None] & pmask[None, :]
    grad_offset = (b * g_b + n * g_n + h * g_h)[:, None] + 2 * pairs[None, :]
    dst = DQKV + (b * (3 * N * H * HD) + n * (3 * H * HD) + which * (H * HD) + h * HD)[:, None] + 2 * pairs[None, :]
    if which == 2:
        dv_even = tl.load(DV + grad_offset, mask=mask, other=0.0)
        dv_odd = tl.load(DV + grad_offset + 1, mask=mask, other=0.0)
        tl.store(dst, dv_even.to(DQKV.dtype.element_ty), mask=mask)
        tl.store(dst + 1, dv_odd.to(DQKV.dtype.element_ty), mask=mask)
    else:
        if which == 0:
            g_even = tl.load(DQ + grad_offset, mask=mask, other=0.0).to(tl.float32)
            g_odd = tl.load(DQ + grad_offset + 1, mask=mask, other=0.0).to(tl.float32)
            w_even = tl.load(QW + 2 * pairs, mask=pmask, other=0.0).to(tl.float32)
            w_odd = tl.load(QW + 2 * pairs + 1, mask=pmask, other=0.0).to(tl.float32)
        else:
            g_even = tl.load(DK + grad_offset, mask=mask, other=0.0).to(tl.float32)
            g_odd = tl.load(DK + grad_offset + 1, mask=mask, other=0.0).to(tl.float32)
            w_even = tl.load(KW + 2 * pairs, mask=pmask, other=0.0).to(tl.float32)
            w_odd = tl.load(KW + 2 * pairs + 1, mask=pmask, other=0.0).to(tl.float32)
        rot = ROT + (b * r_b + n * r_n)[:, None] + 2 * pairs[None, :]
        cos = tl.load(rot, mask=mask, other=1.0)
        sin = tl.load(rot + 1, mask=mask, other=0.0)
        # Inverse rotation: multiply the gradient by conj(rotation).
        d_a = g_even * cos + g_odd * sin
        d_c = g_odd * cos - g_even * sin
        src = QKV + (b * s_b + n * s_n + which * s_w + h * s_h)[:, None] + 2 * pairs[None, :]
        x_even = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x_odd = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x_even * x_even + x_odd * x_odd, axis=1) / HD + eps)
        xhat_even = x_even * rstd[:, None]
        xhat_odd = x_odd * rstd[:, None]
        n_even = xhat_even.to(QKV.dtype.element_ty).to(tl.float32)
        n_odd = xhat_odd.to(QKV.dtype.element_ty).to(tl.float32)
        # Weight gradient partial sums over this program's rows.
        part = PARTIAL + (which * NUM_BLOCKS + pid) * HD + 2 * pairs
        tl.store(part, tl.sum(d_a * n_even, axis=0), mask=pmask)
        tl.store(part + 1, tl.sum(d_c * n_odd, axis=0), mask=pmask)
        # Through the weight, the rounding (straight through) and the RMSNorm.
        dn_even = d_a * w_even[None, :]
        dn_odd = d_c * w_odd[None, :]
        proj = tl.sum(dn_even * xhat_even + dn_odd * xhat_odd, axis=1) / HD
        dx_even = (dn_even - xhat_even * proj[:, None]) * rstd[:, None]
        dx_odd = (dn_odd - xhat_odd * proj[:, None]) * rstd[:, None]
        tl.store(dst, dx_even.to(DQKV.dtype.element_ty), mask=mask)
        tl.store(dst + 1, dx_odd.to(DQKV.dtype.element_ty), mask=mask)


QK_ROWS = 16
# Layout of the q, k, v the kernel writes, seen by SDPA as (B, heads, N, hd): "bnhd" = views of
# (B, N, heads, hd) contiguous tensors (the torch path's layout: the attention output's head merge
# is then a view); "bhnd" = heads-first contiguous. cuDNN runs both at the same speed (dit_block.md).
QKV_LAYOUT = "bnhd"


class QKNormRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, q_weight, k_weight, rotations, eps, out_dtype):
        # qkv (B, N, 3, H, hd); rotations (B, N, hd/2, 2) float32 (cos, sin)
        batch, tokens, _, heads, head_dim = qkv.shape
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        half = head_dim // 2
        rows = batch * tokens * heads
        if QKV_LAYOUT == "bhnd":
            q = torch.empty(batch, heads, tokens, head_dim, dtype=out_dtype, device=qkv.device)
        else:
            q = torch.empty(batch, tokens, heads, head_dim, dtype=out_dtype, device=qkv.device).transpose(1, 2)
        k, v = torch.empty_like(q), torch.empty_like(q)  # empty_like keeps q's strides
        block_half = triton.next_power_of_2(half)
        round_product = q_weight.dtype != torch.float32 and qkv.dtype != torch.float32
        _qk_norm_rope_fwd[(triton.cdiv(rows, QK_ROWS), 3)](
            qkv, rotations, q_weight, k_weight, q, k, v,
            rows, tokens, heads, half, head_dim,
            qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3),
            rotations.stride(0), rotations.stride(1), q.stride(0), q.stride(2), q.stride(1), eps,
            ROUND_PRODUCT=round_product, ROWS=QK_ROWS, BLOCK_HALF=block_half, num_warps=4,
        )
        # Keep only the q and k parts (v is not needed for the backward pass), so the qkv projection's
        # output can be freed once SDPA holds its own v: one bf16 copy of 2d per token saved.
        ctx.save_for_backward(qkv[:, :, :2].contiguous(), q_weight, k_weight, rotations)
        ctx.eps = eps
        return q, k, v  # each (B, H, N, hd)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        qk, q_weight, k_weight, rotations = ctx.saved_tensors  # qk (B, N, 2, H, hd) contiguous
        batch, tokens, _, heads, head_dim = qk.shape
        half = head_dim // 2
        rows = batch * tokens * heads
        grads = [g if g is not None else torch.zeros(batch, heads, tokens, head_dim, device=qk.device) for g in (dq, dk, dv)]
        # The kernel takes one set of strides for the three gradients (SDPA gives them one layout).
        if grads[0].stride(-1) != 1 or any(g.stride() != grads[0].stride() for g in grads):
            grads = [g.contiguous() for g in grads]
        dq, dk, dv = grads
        num_blocks = triton.cdiv(rows, QK_ROWS)
        dqkv = torch.empty(batch, tokens, 3, heads, head_dim, dtype=qk.dtype, device=qk.device)
        partial = torch.zeros(2, num_blocks, head_dim, dtype=torch.float32, device=qk.device)
        _qk_norm_rope_bwd[(num_blocks, 3)](
            qk, rotations, q_weight, k_weight, dq, dk, dv, dqkv, partial,
            rows, tokens, heads, half, head_dim, num_blocks,
            qk.stride(0), qk.stride(1), qk.stride(2), qk.stride(3),
            rotations.stride(0), rotations.stride(1),
            dq.stride(0), dq.stride(2), dq.stride(1), ctx.eps,
            ROWS=QK_ROWS, BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
        )
        weight_grads = partial.sum(1)  # (2, hd)
        return dqkv, weight_grads[0].to(q_weight.dtype), weight_grads[1].to(k_weight.dtype), None, None, None


# ---------------------------------------------------------------- RMSNorm (cross-attention QK-norm)


@triton.jit
def _rms_norm_fwd(X, W, OUT, R, D, eps, ROUND_PRODUCT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # x, out contiguous (R, D)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    offsets = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    normed = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)  # rounded back, as RMSNorm does
    out = normed * tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if ROUND_PRODUCT:
        out = out.to(W.dtype.element_ty).to(tl.float32)
    tl.store(OUT + offsets, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(X, W, DOUT, DX, PARTIAL, R, D, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < R)[:, None] & cmask[None, :]
    offsets = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offsets, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    xhat = x * rstd[:, None]
    tl.store(PARTIAL + pid * D + cols, tl.sum(dout * xhat.to(X.dtype.element_ty).to(tl.float32), axis=0), mask=cmask)
    dn = dout * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    proj = tl.sum(dn * xhat, axis=1) / D
    tl.store(DX + offsets, ((dn - xhat * proj[:, None]) * rstd[:, None]).to(DX.dtype.element_ty), mask=mask)


RMS_ROWS = 32


class RMSNormTritonFunction(torch.autograd.Function):
    """RMSNorm over the last dim of a contiguous tensor; keeps only x (and the weight)."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        dim = x.shape[-1]
        rows = x.numel() // dim
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        round_product = weight.dtype != torch.float32 and x.dtype != torch.float32
        block = triton.next_power_of_2(dim)
        _rms_norm_fwd[(triton.cdiv(rows, RMS_ROWS),)](
            x, weight, out, rows, dim, eps, ROUND_PRODUCT=round_product, ROWS=RMS_ROWS, BLOCK_D=block, num_warps=4
        )
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        dim = x.shape[-1]
        rows = x.numel() // dim
        dout = dout.contiguous()
        num_blocks = triton.cdiv(rows, RMS_ROWS)
        dx = torch.empty_like(x)
        partial = torch.empty(num_blocks, dim, dtype=torch.float32, device=x.device)
        _rms_norm_bwd[(num_blocks,)](
            x, weight, dout, dx, partial, rows, dim, ctx.eps, ROWS=RMS_ROWS, BLOCK_D=triton.next_power_of_2(dim), num_warps=4
        )
        return dx, partial.sum(0).to(weight.dtype), None, None
