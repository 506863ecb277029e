"""Width expansion of a trained MUG-DiT (seed §4.2.1 "Parameter Expansion", eq. 2).

The report trains a 2B model (hidden 1728, depth 56, head dim 72), then grows the hidden size by an
integer factor ``e`` (e = 2: 1728 -> 3456, the 10B preset) and continues training. Every hidden
vector of the expanded model is the old one replicated, ``x' = [x; ...; x]`` (e copies), and every
layer is rewritten so that replicated inputs give replicated outputs (HyperCloning-style):

* Linear, input and output in the hidden space: ``W' = tile(W, e x e) / e``, ``b' = tile(b, e)``.
  Each output copy sums e copies of ``W x / e``, i.e. ``W x``. (Eq. 2 writes ``b' = tile(b) / e``;
  the bias must be tiled *without* dividing for the outputs to be preserved, so it is here.)
* Linear whose output is the hidden space but input is not (scalar embedders 256 -> d, text
  embedder text_dim -> d), and the Conv3d patch embed: output rows tiled, nothing divided.
* Linear whose input is the hidden space but output is not (the output head): ``W' = tile(W) / e``,
  bias unchanged.
* Outputs made of several width-d chunks are tiled chunk by chunk: ``qkv`` is ``[q; k; v]``,
  ``kv_linear`` is ``[k; v]``, ``t_block`` gives 6 adaLN chunks. Tiling the q chunk of width
  ``heads * hd`` makes new head ``j`` a copy of old head ``j mod heads``; k and v get the same order,
  so each new head computes exactly one old head's attention (head dim, QK RMSNorm weights, the
  softmax scale 1/sqrt(hd) and the 3D RoPE angles are all unchanged). The concatenated head outputs
  are then ``[out; ...; out]``, a replicated hidden vector, and the output projection (tiled, / e)
  maps it back to replicated ``proj(out)``.
* The MLP's inner width 4d is replicated the same way (fc1 and fc2 both tiled / e on their inputs);
  GELU and SiLU act elementwise, so they keep replication.
* LayerNorm without affine: a replicated vector has the same mean and variance, nothing to do. With
  affine (``cross_attn_norm``): weight and bias tiled.
* adaLN tables ``[6, d]`` / ``[2, d]``, start/end tokens: tiled along d.

Perturbation: eq. 2 subtracts a small random matrix from the tiled weights to break the symmetry
between copies (otherwise the copies receive identical gradients forever). Here every tiled weight
matrix or kernel (Linear and Conv3d weights, not biases, norms, tables or tokens) gets
``eps ~ N(0, (perturbation * std(W))^2)`` with ``std(W)`` the original tensor's standard deviation
(default ``perturbation = 1e-4``; all-zero weights stay zero). ``perturbation = 0`` gives an exact,
output-preserving copy.

Only weights are transferred: the optimizer state restarts fresh after expansion (the report
transfers the 2B model's hyper-parameters and resumes training, seed §4.2.1).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from mugen.errors import MugenError
from mugen.train.checkpoint import state_dict_differences
from mugen.models.dit.model import MUGDiT, MUGDiTConfig

DEFAULT_PERTURBATION = 1e-4  # noise std relative to each original weight's std


@dataclass(frozen=True)
class TileRule:
    """How one tensor grows: which dims live in the hidden space, and how they are tiled.

    out_chunks: number of width-d chunks along dim 0, each tiled e times in place; 0 = dim 0 kept.
    tile_dim1: dim 1 is a hidden axis (a Linear's input, or an adaLN table's d) and is tiled e times.
    divide: dim 1 takes a replicated input, so the tiled weight is divided by e (eq. 2).
    perturb: the tensor is a tiled weight matrix/kernel that gets symmetry-breaking noise.
    """

    out_chunks: int = 0
    tile_dim1: bool = False
    divide: bool = False
    perturb: bool = False


HIDDEN_VECTOR = TileRule(out_chunks=1)  # biases of hidden outputs, tokens, affine LayerNorm
UNCHANGED = TileRule()  # per-head RMSNorm weights, output-head bias
TO_HIDDEN = TileRule(out_chunks=1, perturb=True)  # input not hidden: rows tiled, nothing divided
SQUARE = TileRule(out_chunks=1, tile_dim1=True, divide=True, perturb=True)  # hidden -> hidden Linear
TABLE = TileRule(tile_dim1=True)  # adaLN tables (rows, d): added to hidden vectors, not divided


def chunked(chunks: int) -> TileRule:
    """hidden -> ``chunks`` x hidden Linear weight ([q; k; v], [k; v], the 6 adaLN chunks)."""
    return TileRule(out_chunks=chunks, tile_dim1=True, divide=True, perturb=True)


# (name pattern, rule); the first full match wins. Every tensor of MUGDiT must match one.
RULES: list[tuple[str, TileRule]] = [
    (r"x_embedder\.proj\.weight", TO_HIDDEN),  # Conv3d (d, C, pt, ph, pw)
    (r"(t|fps)_embedder\.mlp\.0\.weight", TO_HIDDEN),  # (d, 256)
    (r"(t|fps)_embedder\.mlp\.2\.weight", SQUARE),
    (r"t_block\.1\.weight", chunked(6)),  # (6d, d)
    (r"t_block\.1\.bias", TileRule(out_chunks=6)),
    (r"y_embedder\.y_proj\.fc1\.weight", TO_HIDDEN),  # (d, text_dim)
    (r"y_embedder\.y_proj\.fc2\.weight", SQUARE),
    (r"blocks\.\d+\.attn\.qkv\.weight", chunked(3)),  # (3d, d)
    (r"blocks\.\d+\.attn\.qkv\.bias", TileRule(out_chunks=3)),
    (r"blocks\.\d+\.cross_attn\.kv_linear\.weight", chunked(2)),  # (2d, d)
    (r"blocks\.\d+\.cross_attn\.kv_linear\.bias", TileRule(out_chunks=2)),
    (r"blocks\.\d+\.(attn|cross_attn)\.[qk]_norm\.weight", UNCHANGED),  # (hd,): head dim unchanged
    (r"blocks\.\d+\.(attn\.proj|cross_attn\.(q_linear|proj)|mlp\.fc[12])\.weight", SQUARE),
    (r"(blocks\.\d+|final_layer)\.scale_shift_table", TABLE),  # (6, d) and (2, d)
    (r"final_layer\.linear\.weight", TileRule(tile_dim1=True, divide=True, perturb=True)),  # (p * 2C, d)
    (r"final_layer\.linear\.bias", UNCHANGED),
    (r".*\.bias|start_token|end_token|blocks\.\d+\.cross_attn_norm\.weight", HIDDEN_VECTOR),
]


def expanded_config(config: MUGDiTConfig, factor: int) -> MUGDiTConfig:
    """Config with hidden size and heads times ``factor``; depth, head dim and MLP ratio kept."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise MugenError(f"expansion factor {factor!r} must be an integer >= 2 (e = 2 takes 2B to 10B)")
    if config.hidden_size % config.num_heads:
        raise MugenError(
            f"config hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}; "
            "expand a config the model can be built with"
        )
    new = dataclasses.replace(config, hidden_size=config.hidden_size * factor, num_heads=config.num_heads * factor)
    old_mlp, new_mlp = int(config.hidden_size * config.mlp_ratio), int(new.hidden_size * new.mlp_ratio)
    if new_mlp != factor * old_mlp:
        raise MugenError(
            f"mlp_ratio {config.mlp_ratio} gives an MLP width {new_mlp} after expansion, not {factor} x {old_mlp}; "
            "use an mlp_ratio with hidden_size * mlp_ratio an integer"
        )
    return new


def _rule_for(name: str) -> TileRule:
    for pattern, rule in RULES:
        if re.fullmatch(pattern, name):
            return rule
    raise MugenError(f"state dict tensor {name!r} is not part of MUG-DiT; expand a state dict of mugen's MUGDiT")


def _tile_chunks(tensor: Tensor, dim: int, chunks: int, factor: int) -> Tensor:
    """Along ``dim``: split into ``chunks`` equal parts, repeat each part ``factor`` times in place.

    (3d, ...) with chunks 3 -> [q q; k k; v v] for factor 2, i.e. (3 * e * d, ...).
    """
    parts = tensor.unflatten(dim, (chunks, -1))  # (..., chunks, d, ...)
    repeats = [1] * parts.dim()
    repeats[dim + 1] = factor
    return parts.repeat(repeats).flatten(dim, dim + 1)  # (..., chunks * e * d, ...)


def _expand_tensor(name: str, tensor: Tensor, factor: int, perturbation: float, generator) -> Tensor:
    rule = _rule_for(name)
    original = tensor
    if rule.out_chunks:
        tensor = _tile_chunks(tensor, 0, rule.out_chunks, factor)
    if rule.tile_dim1:
        tensor = _tile_chunks(tensor, 1, 1, factor)
    if rule.divide:
        tensor = tensor / factor  # seed §4.2.1 eq. 2: the input is replicated e times
    if rule.perturb and perturbation > 0 and not tensor.is_meta:
        # seed §4.2.1 eq. 2: random perturbation breaks gradient duplication between copies.
        sigma = perturbation * original.float().std().item()
        if sigma > 0:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * sigma
            tensor = (tensor.float() + noise.to(tensor.device)).to(tensor.dtype)
    return tensor.contiguous()


def expand_dit_state_dict(
    state_dict: dict[str, Tensor],
    config: MUGDiTConfig,
    factor: int,
    perturbation: float = DEFAULT_PERTURBATION,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[dict[str, Tensor], MUGDiTConfig]:
    """Expand a MUGDiT state dict by ``factor`` in width (seed §4.2.1, eq. 2).

    Returns (new state dict, new config). Works on any device, meta included (no noise on meta).
    ``generator`` is a CPU generator for the perturbation (noise is drawn on CPU and moved).
    The optimizer state is not expanded: training restarts with a fresh optimizer.
    """
    new_config = expanded_config(config, factor)
    if perturbation < 0:
        raise MugenError(f"perturbation {perturbation} must be >= 0 (a std relative to each weight's std)")
    with torch.device("meta"):
        expected_new = MUGDiT(new_config).state_dict()
        expected_old = MUGDiT(config).state_dict()
    missing, unexpected, _ = state_dict_differences(state_dict, expected_old)  # shapes: checked per tensor below
    if missing or unexpected:
        raise MugenError(
            f"state dict does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "pass the config the weights were trained with"
        )
    new_state: dict[str, Tensor] = {}
    for name in tqdm(expected_old, desc=f"expanding x{factor}", disable=not progress, unit="tensor"):
        tensor = state_dict[name]
        if tensor.shape != expected_old[name].shape:
            raise MugenError(
                f"tensor {name} has shape {tuple(tensor.shape)}, the config expects {tuple(expected_old[name].shape)}; "
                "pass the config the weights were trained with"
            )
        new_state[name] = _expand_tensor(name, tensor, factor, perturbation, generator)
        if new_state[name].shape != expected_new[name].shape:  # a rule table bug, not a user error
            raise AssertionError(f"{name}: expanded to {tuple(new_state[name].shape)}, expected {tuple(expected_new[name].shape)}")
    return new_state, new_config


def expand_dit(
    model: MUGDiT,
    factor: int,
    perturbation: float = DEFAULT_PERTURBATION,
    generator: torch.Generator | None = None,
) -> MUGDiT:
    """A new MUGDiT ``factor`` times wider whose output equals ``model``'s (up to the perturbation)."""
    state, new_config = expand_dit_state_dict(model.state_dict(), model.config, factor, perturbation, generator)
    with torch.device("meta"):
        expanded = MUGDiT(new_config)
    expanded.load_state_dict(state, assign=True)
    return expanded.train(model.training)


def expand_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    factor: int,
    perturbation: float = DEFAULT_PERTURBATION,
    seed: int = 0,
) -> Path:
    """Expand a `mugen train dit` run (or step/export folder), or a step folder of a sharded
    (torch.distributed.checkpoint) checkpoint of parallel training, into a new loadable folder.

    Writes ``output_dir/model.safetensors`` then ``output_dir/model_config.json`` (the source's record
    with the new "dit" config, the matching "preset" and an "expanded_from" note), so that
    ``mugen.models.dit.io.load_dit(output_dir)`` builds and loads the expanded model. Returns
    ``output_dir``. Train on from it with a fresh optimizer.
    """
    from safetensors.torch import save_file

    from mugen.atomic import write_atomically
    from mugen.distributed.checkpoint import DCP_METADATA_FILE, read_model_state_dict
    from mugen.models.dit.io import (
        RUN_CONFIG_FILE,
        load_dit,
        resolve_dit_checkpoint,
        write_run_config,
    )
    from mugen.models.dit.official import matching_preset
    from mugen.train.checkpoint import MODEL_FILE

    output_dir = Path(output_dir)
    expanded_config(MUGDiTConfig(), factor)  # check the factor before reading a large checkpoint
    if perturbation < 0:
        raise MugenError(f"--perturbation {perturbation} must be >= 0 (a std relative to each weight's std)")
    if (output_dir / MODEL_FILE).exists() or (output_dir / RUN_CONFIG_FILE).exists():
        raise MugenError(f"--output {output_dir} already holds a model; choose a new folder or remove it")
    if (Path(checkpoint) / DCP_METADATA_FILE).is_file():
        # A sharded checkpoint of parallel training (torch.distributed.checkpoint): read the whole
        # model on this process in single-device names; its step metadata holds the model config.
        source_state, meta = read_model_state_dict(checkpoint)
        if not meta or not meta.get("model_config"):
            raise MugenError(f"--checkpoint {checkpoint}: the distributed checkpoint records no model config; it cannot be expanded")
        config = MUGDiTConfig.from_dict(meta["model_config"])
        record, weights_path = {"dit": config.to_dict(), "preset": matching_preset(config)}, Path(checkpoint)
    else:
        _, weights_path = resolve_dit_checkpoint(checkpoint)
        model, record = load_dit(checkpoint)
        source_state, config = model.state_dict(), model.config
        del model
    generator = torch.Generator().manual_seed(seed)
    state, new_config = expand_dit_state_dict(source_state, config, factor, perturbation, generator, progress=True)
    del source_state
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
    write_atomically(output_dir / MODEL_FILE, lambda temporary: save_file(tensors, str(temporary)))
    new_record = dict(record)
    new_record["dit"] = new_config.to_dict()
    new_record["preset"] = matching_preset(new_config)
    new_record["expanded_from"] = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "weights": str(weights_path.resolve()),
        "preset": record.get("preset"),
        "factor": factor,
        "perturbation": perturbation,
        "seed": seed,
        "note": "seed §4.2.1 width expansion; optimizer state restarts fresh",
    }
    write_run_config(output_dir, new_record)
    return output_dir
