"""3D rotary position embedding for video tokens (seed §3.2, "3D RoPE encoding for visual tokens").

The head dimension is split into three equal parts that rotate with the token's height, width and
time position. Channel pairs are interleaved, ``(x[2i], x[2i+1])`` forms the i-th complex number,
and the per-axis frequencies are ``theta ** (-6k / head_dim)`` for ``k < head_dim // 6``; the
rotation angles of one token are ``[h * f, w * f, t * f]`` concatenated (height, width, time).
These are the conventions of the released MUG-V weights, so the same numbers come out.

The sequence holds a learnable start token, the video tokens in (T, H, W) order, and an end token.
Time positions come from ``frame_indices`` (B, T + 2): entry 0 belongs to the start token, entries
1..T to the frames, the last to the end token. The start token sits at spatial position (0, 0) and
the end token at (H - 1, W - 1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_frequencies(head_dim: int, theta: float = 10000.0, device=None) -> Tensor:
    """Per-axis angular frequencies, (head_dim // 6,) float32."""
    if head_dim % 6 != 0:
        raise ValueError(f"3D RoPE needs a head dim divisible by 6 (3 axes x complex pairs), got {head_dim}")
    exponents = torch.arange(0, head_dim, 6, device=device, dtype=torch.float32)[: head_dim // 6] / head_dim
    return 1.0 / (theta**exponents)


def video_rope_angles(
    frame_indices: Tensor,
    height: int,
    width: int,
    head_dim: int,
    theta: float = 10000.0,
    max_time_position: int | None = None,
) -> Tensor:
    """Rotation angles for [start, video tokens (T, H, W), end].

    frame_indices: (B, T + 2) integer time positions.
    Returns (B, T * H * W + 2, head_dim // 2) float32 angles.
    """
    batch, time_slots = frame_indices.shape
    frames = time_slots - 2
    device = frame_indices.device
    freqs = rope_frequencies(head_dim, theta, device=device)  # (F,)
    num_freqs = freqs.numel()
    positions = frame_indices.to(torch.float32)
    if max_time_position is not None:
        positions = positions.clamp(0, max_time_position - 1)

    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    h_angles = (rows[:, None] * freqs).view(1, 1, height, 1, num_freqs).expand(batch, frames, height, width, num_freqs)
    w_angles = (cols[:, None] * freqs).view(1, 1, 1, width, num_freqs).expand(batch, frames, height, width, num_freqs)
    t_angles = (positions[:, 1:-1, None] * freqs).view(batch, frames, 1, 1, num_freqs)
    t_angles = t_angles.expand(batch, frames, height, width, num_freqs)
    video = torch.cat([h_angles, w_angles, t_angles], dim=-1).reshape(batch, frames * height * width, 3 * num_freqs)

    zero = torch.zeros(batch, 1, num_freqs, device=device)
    start = torch.cat([zero, zero, positions[:, :1, None] * freqs], dim=-1)  # (B, 1, 3F) at (h, w) = (0, 0)
    end = torch.cat(
        [
            ((height - 1) * freqs).expand(batch, 1, num_freqs),
            ((width - 1) * freqs).expand(batch, 1, num_freqs),
            positions[:, -1:, None] * freqs,
        ],
        dim=-1,
    )  # (B, 1, 3F) at (h, w) = (H - 1, W - 1)
    return torch.cat([start, video, end], dim=1)


def rope_rotations(angles: Tensor) -> Tensor:
    """(B, N, D/2) angles -> unit complex rotations (B, 1, N, D/2) complex64 for heads-first tensors."""
    return torch.polar(torch.ones_like(angles), angles).unsqueeze(1)


def apply_rope(x: Tensor, rotations: Tensor) -> Tensor:
    """Rotate interleaved channel pairs of x (B, heads, N, D) as complex numbers; computed in fp32.

    One complex multiply is a single fused kernel in eager mode (cheaper than cos/sin arithmetic on
    separate real tensors, measured on the H100 in benchmarks/results/). Under ``torch.compile`` the
    same product is written in real arithmetic instead: the compiler generates no code for complex
    tensors (it launches the eager complex kernels, 4 per block, plus copies into complex layout),
    while real arithmetic fuses with the RMSNorm before it into one kernel.
    """
    if torch.compiler.is_compiling():
        return apply_rope_real(x, rotations)
    x_complex = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, heads, N, D/2)
    return torch.view_as_real(x_complex * rotations).flatten(-2).type_as(x)


def apply_rope_real(x: Tensor, rotations: Tensor) -> Tensor:
    """:func:`apply_rope` as (a + ib)(c + is) = (ac - bs) + i(as + bc) on real tensors, in fp32."""
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (B, heads, N, D/2)
    cos, sin = torch.view_as_real(rotations).unbind(-1)  # each (B, 1, N, D/2)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)  # (B, heads, N, D/2, 2)
    return rotated.flatten(-2).type_as(x)
