"""Record what the official MUG-V DiT computes, for mugen's parity test (issue 3).

Imports the reference model from a local checkout of Shopee-MUG/MUG-V (nothing of it is copied
here), builds it at a reduced size that keeps the official layout, gives it seeded random weights,
runs it on fixed random inputs and saves tensors only (safetensors) plus a JSON description::

    git --git-dir=<mirror of Shopee-MUG/MUG-V> archive HEAD | tar -x -C /tmp/mugv_ref
    # in /tmp/mugv_ref only: swap flash_attn / xformers for torch SDPA with the same math
    PYTHONPATH=src .venv/bin/python scripts/make_reference_dit_fixtures.py \
        --reference /tmp/mugv_ref --output tests/fixtures/reference_dit

The reference needs ``xformers`` and ``flash_attn``; the checkout passed here must have had those
two calls replaced by ``torch.nn.functional.scaled_dot_product_attention`` (self-attention: scale
hd^-0.5 over (B, heads, N, hd); cross-attention: every sample's queries see only that sample's
real text tokens, the block-diagonal mask xformers builds from the per-sample text lengths).

Size: head dim 72 (so 3D RoPE has 12 frequencies per axis), patch (1, 2, 2), 24 latent channels,
hidden 144 = 2 heads, depth 2, text width 64, MLP ratio 4. Weights are drawn on the bfloat16 grid
(values exactly representable in bfloat16) and stored as bfloat16: casting them to float32 gives
bit for bit the float32 weights the reference ran with, at half the file size.

Outputs (in ``--output``):
    state_dict.safetensors       the reference model's state dict (official names)
    case_<name>.safetensors      inputs (reference argument names) and outputs:
                                 ``output_fp32`` (model and inputs in float32) and
                                 ``output_bf16`` (model cast to bfloat16, run on the CPU)
    reference_dit.json           configs (reference kwargs and mugen's MUGDiTConfig), cases, provenance
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REFERENCE_KWARGS = dict(
    input_channels=24,
    patch_size=(1, 2, 2),
    hidden_size=144,
    depth=2,
    num_heads=2,  # head dim 72, as in every official size
    mlp_ratio=4.0,
    text_input_channels=64,
    qk_norm=True,
)
WEIGHT_SEED = 20251020
INPUT_SEED = 7
TEXT_LEN = 7
LATENT_CHANNELS = 24


def mugen_config(kwargs: dict) -> dict:
    """The same model in mugen's MUGDiTConfig field names."""
    return dict(
        hidden_size=kwargs["hidden_size"],
        depth=kwargs["depth"],
        num_heads=kwargs["num_heads"],
        mlp_ratio=kwargs["mlp_ratio"],
        latent_channels=kwargs["input_channels"],
        patch_size=list(kwargs["patch_size"]),
        text_dim=kwargs["text_input_channels"],
        qk_norm=kwargs["qk_norm"],
    )


def import_reference(reference: Path):
    if not (reference / "mug_v" / "dit" / "model.py").is_file():
        sys.exit(f"--reference {reference}: no mug_v/dit/model.py there; pass a checkout of Shopee-MUG/MUG-V")
    sys.path.insert(0, str(reference))
    try:
        from mug_v.dit.model import MUGDiT
    except ImportError as error:
        sys.exit(
            f"--reference {reference}: importing the model failed ({error}); replace the flash_attn and "
            "xformers attention calls in mug_v/dit/module.py with torch SDPA first (see this script's docstring)"
        )
    return MUGDiT


def on_bf16_grid(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16).to(torch.float32)


def randomise_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-zero, non-trivial values everywhere, so every path of the network shows in the output.

    Linear and conv weights keep PyTorch's default fan-in scale; norm gains are 1 + noise (not 1),
    biases and the adaLN tables are noise, and the start/end tokens are unit-scale noise (the
    official init draws them with std 0.02, which would make their path nearly invisible).
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2 and "scale_shift_table" not in name:
                fan_in = param[0].numel()
                value = noise / fan_in**0.5
            elif name.endswith("norm.weight"):
                value = 1.0 + 0.2 * noise
            elif "scale_shift_table" in name:
                value = 0.3 * noise
            elif name in ("start_token", "end_token"):
                value = noise
            else:  # biases
                value = 0.1 * noise
            param.copy_(on_bf16_grid(value))


def make_cases(generator: torch.Generator) -> list[dict]:
    """Inputs in the reference's argument names and conventions.

    The reference needs ``x_mask`` on every call (its forward reads a variable that only exists
    when x_mask is given), so the text-to-video case passes an all-True mask, which is what the
    official sampler passes for frames that are all noisy. x_mask: True = noisy frame.
    """
    batch = 2

    def common(frames: int, height: int, width: int) -> dict:
        return dict(
            x=torch.randn(batch, LATENT_CHANNELS, frames, height, width, generator=generator),
            # off the bfloat16 grid on purpose: the reference rounds t to the model dtype
            timestep=torch.tensor([937.3, 412.9]),
            y=torch.randn(batch, TEXT_LEN, REFERENCE_KWARGS["text_input_channels"], generator=generator),
            mask=torch.tensor([[1] * TEXT_LEN, [1] * 4 + [0] * (TEXT_LEN - 4)], dtype=torch.bool),
            fps=torch.tensor([24.0, 30.0]),
        )

    frames = 3
    plain = common(frames, 4, 6)
    plain.update(
        x_mask=torch.ones(batch, frames, dtype=torch.bool),
        frame_indice=torch.arange(frames + 2).expand(batch, -1).contiguous(),
    )
    first_frame = common(frames, 4, 6)
    first_frame.update(
        x_mask=torch.tensor([[False, True, True], [False, True, True]]),
        frame_indice=torch.arange(frames + 2).expand(batch, -1).contiguous(),
    )
    odd = common(frames, 5, 7)
    odd.update(
        x_mask=torch.tensor([[False, True, True], [True, True, False]]),  # first / last frame given
        frame_indice=torch.stack([torch.arange(frames + 2) * 2 + 3, torch.arange(frames + 2) + 11]),
    )
    return [
        dict(
            name="t2v",
            description="all frames noisy (x_mask all True), 4x6 latents, frame_indice = arange(T + 2), "
            "text lengths 7 and 4",
            inputs=plain,
        ),
        dict(
            name="i2v",
            description="first latent frame clean for every sample (x_mask[:, 0] = False), 4x6 latents, "
            "frame_indice = arange(T + 2)",
            inputs=first_frame,
        ),
        dict(
            name="odd_size_frame_indices",
            description="latents 5x7 (padded to 6x8 by the reference), frame_indice = 2 * arange(T + 2) + 3 "
            "and arange(T + 2) + 11, sample 0 conditions its first frame, sample 1 its last",
            inputs=odd,
        ),
    ]


def run_reference(model: torch.nn.Module, inputs: dict, dtype: torch.dtype) -> torch.Tensor:
    model = model.to(dtype)
    with torch.no_grad():
        return model(**{name: value.clone() for name, value in inputs.items()}).float()  # (B, 48, T, H, W)


def reference_commit(reference: Path) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(reference), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, type=Path, help="checkout of Shopee-MUG/MUG-V with SDPA attention")
    parser.add_argument("--output", required=True, type=Path, help="folder for the fixture files")
    parser.add_argument("--reference-commit", default=None, help="commit of the checkout, recorded in the JSON")
    args = parser.parse_args()

    ReferenceDiT = import_reference(args.reference.resolve())
    torch.manual_seed(WEIGHT_SEED)
    model = ReferenceDiT(**REFERENCE_KWARGS).eval()
    randomise_weights(model, torch.Generator().manual_seed(WEIGHT_SEED))
    state_dict = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    assert all(torch.equal(t, on_bf16_grid(t)) for t in state_dict.values()), "weights must lie on the bf16 grid"

    args.output.mkdir(parents=True, exist_ok=True)
    save_file({name: t.to(torch.bfloat16).contiguous() for name, t in state_dict.items()}, str(args.output / "state_dict.safetensors"))

    cases = make_cases(torch.Generator().manual_seed(INPUT_SEED))
    records = []
    for case in cases:
        inputs = case["inputs"]
        output_fp32 = run_reference(model, inputs, torch.float32)
        output_bf16 = run_reference(model, inputs, torch.bfloat16)
        tensors = {name: value.contiguous() for name, value in inputs.items()}
        tensors.update(output_fp32=output_fp32.contiguous(), output_bf16=output_bf16.contiguous())
        save_file(tensors, str(args.output / f"case_{case['name']}.safetensors"))
        records.append(
            dict(
                name=case["name"],
                description=case["description"],
                file=f"case_{case['name']}.safetensors",
                inputs={name: list(value.shape) for name, value in inputs.items()},
                output_shape=list(output_fp32.shape),
            )
        )
        scale = output_fp32.abs().max().item()
        gap = (output_bf16 - output_fp32).abs().max().item() / scale
        print(f"{case['name']}: output {tuple(output_fp32.shape)}, max |out| {scale:.3f}, reference bf16 vs fp32 {gap:.2e}")

    record = dict(
        reference=dict(
            repository="https://github.com/Shopee-MUG/MUG-V",
            commit=args.reference_commit or reference_commit(args.reference),
            model="mug_v.dit.model.MUGDiT",
            attention="flash_attn / xformers swapped for torch SDPA with the same math (see the script)",
            kwargs={**REFERENCE_KWARGS, "patch_size": list(REFERENCE_KWARGS["patch_size"])},
        ),
        mugen_config=mugen_config(REFERENCE_KWARGS),
        weights=dict(
            file="state_dict.safetensors",
            stored_dtype="bfloat16",
            note="values lie on the bfloat16 grid; cast to float32 for the exact weights the reference ran with",
            seed=WEIGHT_SEED,
        ),
        input_seed=INPUT_SEED,
        conventions=dict(
            x_mask="(B, T) bool, True = noisy frame; mugen's frame_cond_mask is ~x_mask",
            mask="(B, L) bool, True = real text token; mugen's text_mask",
            frame_indice="(B, T + 2) long time positions of [start, frames, end]; mugen's frame_indices",
            timestep="(B,) in [0, 1000]; the reference casts it to the model dtype before embedding",
            output_bf16="reference with every parameter cast to bfloat16, inputs as stored, on the CPU",
        ),
        torch_version=torch.__version__,
        cases=records,
    )
    (args.output / "reference_dit.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    total = sum(path.stat().st_size for path in args.output.iterdir())
    print(f"wrote {len(cases)} cases to {args.output} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
