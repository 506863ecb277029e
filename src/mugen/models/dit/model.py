"""MUG-DiT: the video diffusion transformer of the MUG-V report (seed §3.2).

Single-device model code. Parallelism, activation checkpointing and compilation are applied from
outside (see DESIGN.md); nothing here knows about process groups.

Sequence layout: ``[start_token, video tokens in (T, H, W) order, end_token]``.
Block (LLM-like, full attention):
    x = x + gate_msa * SelfAttn(adaLN(LN(x); shift_msa, scale_msa))    # qkv bias, RMS QK-norm, 3D RoPE
    x = x + CrossAttn(LN_affine(x), text)                               # RMS QK-norm, padded text masked
    x = x + gate_mlp * MLP(adaLN(LN(x); shift_mlp, scale_mlp))
Global signals (seed §3.2 "Global signal embedding", adaLN-single): sinusoidal timestep and fps
embeddings through MLPs, summed, one shared ``SiLU -> Linear(d, 6d)``, plus each block's own
learnable ``[6, d]`` table.
Frame conditioning (seed §3.2 "Image/frame conditioning"): tokens of conditioned frames hold clean
latents and take the t = 0 modulation; everything else takes the sample's t, except the start and end
tokens, which always take the t = 0 modulation, as in the release (its forward always receives a
frame mask, all-noisy for text-to-video, and gives the two boundary tokens t = 0).

Parameter names and shapes follow the released ``dit.pt`` so it loads strictly into the 10B preset.

Speed (seed §5.3): with ``mugen.kernels`` on (the default for CUDA tensors) a block runs
``forward_fused``: Triton kernels for LayerNorm + modulation, QK RMSNorm + RoPE and bias + gate +
residual, with the per-token t = 0 choice made inside them. Compiled blocks run the same
formulation with the torch references. With the kernels off (and on the CPU) ``forward`` is the
plain torch code that the reference-parity tests check exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mugen import kernels
from mugen.models.common.attention import ScaledDotProductAttention
from mugen.models.common.layers import MLP, RMSNorm, ScalarEmbedder, modulate
from mugen.models.common.rope import apply_rope, rope_rotations, video_rope_angles


@dataclass
class MUGDiTConfig:
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    latent_channels: int = 24
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    qk_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_time: int = 480  # frame indices are clamped below this (the release's table size)
    default_fps: float = 30.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def output_channels(self) -> int:
        # The release predicts 2 x C channels; the first C are the velocity.
        return 2 * self.latent_channels

    def to_dict(self) -> dict:
        data = asdict(self)
        data["patch_size"] = list(self.patch_size)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "MUGDiTConfig":
        data = dict(data)
        data["patch_size"] = tuple(data.get("patch_size", (1, 2, 2)))
        return cls(**data)


class SelfAttention(nn.Module):
    """Full bidirectional attention over the video sequence with QK RMSNorm and 3D RoPE.

    Heads are formed and merged with ``num_heads * head_dim`` (not the input width), so tensor
    parallelism can set ``num_heads`` to the local head count from outside; ``attention_op`` can be
    swapped (e.g. for ring attention) from outside as well.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.attention_op = ScaledDotProductAttention()

    def forward(self, x: Tensor, rope: Tensor, proj_bias: bool = True) -> Tensor:
        """x (B, N, d) -> (B, N, d). ``proj_bias=False`` leaves the output projection's bias to the
        caller (the fused gated residual adds it)."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim)
        if isinstance(self.q_norm, RMSNorm) and kernels.use_kernels(qkv) and plain_tensors(self.q_norm.weight):
            # One fused pass: RMSNorm of q and k, 3D RoPE, q/k/v in SDPA's layout (seed §5.3).
            q, k, v = kernels.qk_norm_rope(qkv, self.q_norm.weight, self.k_norm.weight, rope, self.q_norm.eps)
        else:
            q, k, v = qkv.unbind(2)  # each (B, N, heads, hd)
            q, k = self.q_norm(q), self.k_norm(k)
            # RoPE in this token-major layout (rotations viewed (B, N, 1, hd/2)): the norm, the rotation and the
            # bf16 cast read and write in one order, which torch.compile fuses into a coalesced kernel; attention
            # takes heads-first views of the token-major tensors (the layout the fused kernel writes too).
            rope_token_major = rope.transpose(1, 2)
            q, k = apply_rope(q, rope_token_major), apply_rope(k, rope_token_major)
            q, k, v = (tensor.transpose(1, 2) for tensor in (q, k, v))  # (B, heads, N, hd) views
        out = self.attention_op(q, k, v)  # (B, heads, N, hd)
        out = out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.proj(out) if proj_bias else F.linear(out, self.proj.weight)


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens; padded text tokens are masked out.

    Like :class:`SelfAttention`: heads from ``num_heads * head_dim``, a replaceable ``attention_op``.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.attention_op = ScaledDotProductAttention()

    def forward(self, x: Tensor, text: Tensor, text_attn_mask: Tensor | None) -> Tensor:
        batch, tokens, _ = x.shape
        text_len = text.shape[1]
        q = self.q_linear(x).view(batch, tokens, self.num_heads, self.head_dim)
        k, v = self.kv_linear(text).view(batch, text_len, 2, self.num_heads, self.head_dim).unbind(2)
        if isinstance(self.q_norm, RMSNorm) and kernels.use_kernels(q) and plain_tensors(self.q_norm.weight):
            q = kernels.rms_norm(q, self.q_norm.weight, self.q_norm.eps)  # keeps only q for backward
            k = kernels.rms_norm(k, self.k_norm.weight, self.k_norm.eps)
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (tensor.transpose(1, 2) for tensor in (q, k, v))  # (B, heads, len, hd)
        out = self.attention_op(q, k, v, attn_mask=text_attn_mask)  # mask (B, 1, 1, L)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim))


def select_modulation(table: Tensor, t_mod: Tensor, t0_mod: Tensor, clean_tokens: Tensor | None, count: int):
    """adaLN parameters for the sample's t and for t = 0.

    table: (count, d) learnable; t_mod, t0_mod: (B, count * d); clean_tokens: (B, N, 1) bool or None.
    Returns (params, params_clean): ``count`` tensors each. Without clean tokens both are (B, 1, d)
    (the caller fixes the two boundary tokens itself); with them, ``params`` is per token (B, N, d),
    t = 0 where ``clean_tokens`` is set, and ``params_clean`` is unused.
    """
    batch = t_mod.shape[0]
    params = (table[None] + t_mod.view(batch, count, -1)).chunk(count, dim=1)  # each (B, 1, d)
    params_clean = (table[None] + t0_mod.view(batch, count, -1)).chunk(count, dim=1)
    if clean_tokens is None:
        return params, params_clean
    return tuple(torch.where(clean_tokens, p0, p) for p, p0 in zip(params, params_clean)), params_clean


def plain_tensors(*tensors: Tensor) -> bool:
    """True unless a tensor is a DTensor (tensor parallel): the fused kernels take local tensors only."""
    return not any(isinstance(tensor, DTensor) for tensor in tensors)


def plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself (not a LoRA wrapper or a subclass) holding local tensors."""
    return type(module) is nn.Linear and plain_tensors(module.weight)


def tokens_taking_t0(clean_tokens: Tensor | None, batch: int, tokens: int, device) -> Tensor:
    """Tokens that take the t = 0 modulation, (B, N + 2) bool: the start and end tokens, and the
    conditioned frames' tokens when ``clean_tokens`` (B, N + 2, 1) is given (it includes the ends)."""
    if clean_tokens is not None:
        return clean_tokens[..., 0]
    use_t0 = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    use_t0[:, 0] = use_t0[:, -1] = True
    return use_t0


def boundary(x: Tensor) -> Tensor:
    """View of the start and end tokens, (B, 2, d), of a (B, N + 2, d) sequence."""
    return x[:, :: x.shape[1] - 1]


class MUGDiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm)
        self.cross_attn_norm = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=True)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm=qk_norm)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(
        self,
        x: Tensor,  # (B, N + 2, d)
        text: Tensor,  # (B, L, d)
        text_attn_mask: Tensor | None,  # (B, 1, 1, L) bool
        t_mod: Tensor,  # (B, 6d)
        t0_mod: Tensor,  # (B, 6d), the t = 0 modulation (conditioned frames, start/end tokens)
        clean_tokens: Tensor | None,  # (B, N + 2, 1) bool, or None when no frame is conditioned
        rope: Tensor,  # (B, 1, N + 2, hd / 2) complex rotations
    ) -> Tensor:
        if torch.compiler.is_compiling() or (kernels.use_kernels(x) and plain_tensors(self.scale_shift_table)):
            # Compiled blocks take this formulation too (with the torch references inside): its
            # per-token selection has no in-place boundary fix for the compiler to get wrong.
            return self.forward_fused(x, text, text_attn_mask, t_mod, t0_mod, clean_tokens, rope)
        params, params_clean = select_modulation(self.scale_shift_table, t_mod, t0_mod, clean_tokens, 6)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = params
        fix = clean_tokens is None  # broadcast parameters: give the two boundary tokens t = 0 in place
        shift0_msa, scale0_msa, gate0_msa, shift0_mlp, scale0_mlp, gate0_mlp = params_clean

        normed = self.norm(x)
        h = modulate(normed, shift_msa, scale_msa)
        if fix:  # in place on 2 tokens: autograd-safe (add/mul keep their inputs, not outputs)
            boundary(h).copy_(modulate(boundary(normed), shift0_msa, scale0_msa))
        y = self.attn(h, rope)
        gated = gate_msa * y
        if fix:
            boundary(gated).copy_(gate0_msa * boundary(y))
        x = x + gated
        x = x + self.cross_attn(self.cross_attn_norm(x), text, text_attn_mask)
        normed = self.norm(x)
        h = modulate(normed, shift_mlp, scale_mlp)
        if fix:
            boundary(h).copy_(modulate(boundary(normed), shift0_mlp, scale0_mlp))
        y = self.mlp(h)
        gated = gate_mlp * y
        if fix:
            boundary(gated).copy_(gate0_mlp * boundary(y))
        return x + gated

    def forward_fused(self, x, text, text_attn_mask, t_mod, t0_mod, clean_tokens, rope) -> Tensor:
        """The same block with the Triton kernels of ``mugen.kernels`` (seed §5.3): LayerNorm +
        modulation in one pass, proj / fc2 biases moved into one bias + gate + residual pass, and
        the per-token choice of the t = 0 modulation made inside the kernels. A LoRA-wrapped proj
        or fc2 keeps its own bias (there is no plain bias to move)."""
        batch, tokens, _ = x.shape
        use_t0 = tokens_taking_t0(clean_tokens, batch, tokens, x.device)  # (B, N + 2)
        params = self.scale_shift_table[None] + t_mod.view(batch, 6, -1)  # (B, 6, d)
        params_t0 = self.scale_shift_table[None] + t0_mod.view(batch, 6, -1)  # (B, 6, d)
        shift, scale, gate = params[:, 0], params[:, 1], params[:, 2]
        shift0, scale0, gate0 = params_t0[:, 0], params_t0[:, 1], params_t0[:, 2]
        h = kernels.layernorm_modulate(x, shift, scale, shift0, scale0, use_t0, self.norm.eps)
        proj_bias_fused = plain_linear(self.attn.proj)
        y = self.attn(h, rope, proj_bias=not proj_bias_fused)
        x = kernels.gated_residual(x, y, self.attn.proj.bias if proj_bias_fused else None, gate, gate0, use_t0)
        x = x + self.cross_attn(self.cross_attn_norm(x), text, text_attn_mask)
        shift, scale, gate = params[:, 3], params[:, 4], params[:, 5]
        shift0, scale0, gate0 = params_t0[:, 3], params_t0[:, 4], params_t0[:, 5]
        h = kernels.layernorm_modulate(x, shift, scale, shift0, scale0, use_t0, self.norm.eps)
        hidden = self.mlp.fc1(h)  # (B, N + 2, 4d), before the GELU
        fc2_bias_fused = plain_linear(self.mlp.fc2)
        if fc2_bias_fused and isinstance(self.mlp.act, nn.GELU) and self.mlp.act.approximate == "tanh":
            y = kernels.gelu_linear(hidden, self.mlp.fc2.weight)  # GELU recomputed in backward
        else:
            y = self.mlp.fc2(self.mlp.act(hidden))
            fc2_bias_fused = False
        return kernels.gated_residual(x, y, self.mlp.fc2.bias if fc2_bias_fused else None, gate, gate0, use_t0)


class TextEmbedder(nn.Module):
    """LayerNorm (no affine) -> MLP -> LayerNorm (no affine) (seed §3.2 "Normalisations")."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.pre_norm = nn.LayerNorm(text_dim, eps=1e-6, elementwise_affine=False)
        self.y_proj = MLP(text_dim, hidden_size, hidden_size)
        self.post_norm = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)

    def forward(self, text_states: Tensor) -> Tensor:
        return self.post_norm(self.y_proj(self.pre_norm(text_states)))


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, latents: Tensor) -> Tensor:
        return self.proj(latents).flatten(2).transpose(1, 2)  # (B, C, T, H, W) -> (B, T*h*w, d)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_volume: int, output_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, patch_volume * output_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, t_emb: Tensor, t0_emb: Tensor, clean_tokens: Tensor | None) -> Tensor:
        # t_emb (B, d) is used as is (not through t_block), twice: [shift, scale] = table + [t, t].
        if kernels.use_kernels(x) and plain_tensors(self.scale_shift_table):
            shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).unbind(1)  # (B, d) each
            shift0, scale0 = (self.scale_shift_table[None] + t0_emb[:, None]).unbind(1)
            use_t0 = None if clean_tokens is None else clean_tokens[..., 0]
            if use_t0 is None:
                shift0 = scale0 = None
            h = kernels.layernorm_modulate(x, shift, scale, shift0, scale0, use_t0, self.norm_final.eps)
            return self.linear(h)
        (shift, scale), _ = select_modulation(self.scale_shift_table, t_emb.repeat(1, 2), t0_emb.repeat(1, 2), clean_tokens, 2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MUGDiT(nn.Module):
    def __init__(self, config: MUGDiTConfig):
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
        if config.head_dim % 6:
            raise ValueError(f"head dim {config.head_dim} must be divisible by 6 for 3D RoPE")
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed3D(config.patch_size, config.latent_channels, d)
        self.t_embedder = ScalarEmbedder(d)
        self.fps_embedder = ScalarEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.y_embedder = TextEmbedder(config.text_dim, d)
        self.blocks = nn.ModuleList(
            [MUGDiTBlock(d, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth)]
        )
        self.start_token = nn.Parameter(torch.zeros(d))
        self.end_token = nn.Parameter(torch.zeros(d))
        patch_volume = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
        self.final_layer = FinalLayer(d, patch_volume, config.output_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT/PixArt-style initialisation.

        Linear layers: Xavier uniform, zero bias. Patch embed: Xavier on the flattened kernel (as a
        linear layer). Scalar embedders and t_block: N(0, 0.02), as PixArt-alpha does for adaLN-single.
        Cross-attention output projections are zero so the text path starts as a no-op, and the
        output head is zero so the first prediction is 0 (a loss of E|x0 - eps|^2 = 2 on unit latents)
        and early training is stable. Start/end tokens: N(0, 0.02).
        """
        if any(p.is_meta for p in self.parameters()):
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for embedder in (self.t_embedder, self.fps_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        nn.init.normal_(self.start_token, std=0.02)
        nn.init.normal_(self.end_token, std=0.02)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def patch_grid(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(T, H, W) of latents -> (T, h, w) token grid (the release pads up to a patch multiple)."""
        return tuple(-(-size // patch) for size, patch in zip(latent_shape, self.config.patch_size))

    def forward(
        self,
        latents: Tensor,  # (B, C, T, H, W) noisy latents
        timestep: Tensor,  # (B,) in [0, 1000]; 1000 = pure noise
        text_states: Tensor,  # (B, L, text_dim)
        text_mask: Tensor | None = None,  # (B, L) bool, True = real token
        fps: Tensor | None = None,  # (B,)
        frame_cond_mask: Tensor | None = None,  # (B, T) bool, True = clean conditioning frame
        frame_indices: Tensor | None = None,  # (B, T + 2) time positions of [start, frames, end]
    ) -> Tensor:  # (B, 2C, T, H, W) float32; channels [:C] are the velocity x0 - eps
        cfg = self.config
        dtype = self.x_embedder.proj.weight.dtype
        batch, _, frames, height, width = latents.shape
        latents = latents.to(dtype)
        grid_t, grid_h, grid_w = self.patch_grid((frames, height, width))
        pad = (0, grid_w * cfg.patch_size[2] - width, 0, grid_h * cfg.patch_size[1] - height, 0, grid_t * cfg.patch_size[0] - frames)
        if any(pad):
            latents = F.pad(latents, pad)

        # Global signals (adaLN-single): t and fps embeddings summed, one shared projection to 6d.
        if fps is None:
            fps = torch.full((batch,), cfg.default_fps, device=latents.device)
        fps_emb = self.fps_embedder(fps.reshape(batch))
        # The release rounds t to the weights' dtype before embedding (bf16: 937.3 -> 936); do the same
        # so bf16 weights give its numbers. A no-op for fp32 weights (mixed-precision training).
        timestep = timestep.reshape(batch).to(dtype)
        t_emb = self.t_embedder(timestep) + fps_emb  # (B, d)
        t_mod = self.t_block(t_emb)  # (B, 6d)

        # The release always embeds t = 0 too: conditioned frames and the start/end tokens use it.
        t0_emb = self.t_embedder(torch.zeros_like(timestep)) + fps_emb
        t0_mod = self.t_block(t0_emb)  # (B, 6d)
        clean_tokens = None
        if frame_cond_mask is not None and bool(frame_cond_mask.any()):
            if frame_cond_mask.shape != (batch, frames):
                raise ValueError(f"frame_cond_mask has shape {tuple(frame_cond_mask.shape)}, expected {(batch, frames)}")
            frame_clean = frame_cond_mask.to(latents.device, torch.bool)
            if grid_t * cfg.patch_size[0] != frames:
                frame_clean = F.pad(frame_clean, (0, grid_t * cfg.patch_size[0] - frames))
            frame_clean = frame_clean[:, :: cfg.patch_size[0]]  # (B, T') per token frame
            video_clean = frame_clean[:, :, None].expand(batch, grid_t, grid_h * grid_w).reshape(batch, -1)
            edge = torch.ones(batch, 1, dtype=torch.bool, device=latents.device)  # start/end: always t = 0
            clean_tokens = torch.cat([edge, video_clean, edge], dim=1)[..., None]  # (B, N+2, 1)

        # Text (seed §3.2 normalisations); padded tokens are masked out of cross-attention.
        text = self.y_embedder(text_states.to(dtype))  # (B, L, d)
        text_attn_mask = None
        if text_mask is not None:
            text_mask = text_mask.to(text.device, torch.bool)
            if not bool(text_mask.any(dim=1).all()):
                raise ValueError("every sample needs at least one real text token (text_mask row is all False)")
            if not bool(text_mask.all()):
                text_attn_mask = text_mask[:, None, None, :]  # (B, 1, 1, L)

        # Video tokens framed by learnable start and end tokens.
        x = self.x_embedder(latents)  # (B, N, d)
        x = torch.cat([self.start_token.expand(batch, 1, -1), x, self.end_token.expand(batch, 1, -1)], dim=1)

        if frame_indices is None:
            frame_indices = torch.arange(grid_t + 2, device=x.device).expand(batch, -1)
        angles = video_rope_angles(
            frame_indices.to(x.device), grid_h, grid_w, cfg.head_dim, cfg.rope_theta, cfg.rope_max_time
        )
        rope = rope_rotations(angles)  # (B, 1, N + 2, hd / 2) complex

        for block in self.blocks:
            x = block(x, text, text_attn_mask, t_mod, t0_mod, clean_tokens, rope)

        x = x[:, 1:-1]  # drop start/end tokens
        video_clean_tokens = None if clean_tokens is None else clean_tokens[:, 1:-1]
        x = self.final_layer(x, t_emb, t0_emb, video_clean_tokens)  # (B, N, p_t*p_h*p_w*C_out)
        out = self.unpatchify(x, grid_t, grid_h, grid_w)
        return out[:, :, :frames, :height, :width].float()

    def unpatchify(self, x: Tensor, grid_t: int, grid_h: int, grid_w: int) -> Tensor:
        """(B, T*h*w, p_t*p_h*p_w*C) -> (B, C, T*p_t, h*p_h, w*p_w); channel order (p_t, p_h, p_w, C)."""
        p_t, p_h, p_w = self.config.patch_size
        channels = self.config.output_channels
        batch = x.shape[0]
        x = x.view(batch, grid_t, grid_h, grid_w, p_t, p_h, p_w, channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T, p_t, h, p_h, w, p_w)
        return x.reshape(batch, channels, grid_t * p_t, grid_h * p_h, grid_w * p_w)
