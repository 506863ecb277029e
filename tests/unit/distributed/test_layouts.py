"""Single-process pieces of the parallel layer: configs, fused-row order, recompute and compile switches."""

import pytest
import torch

from mugen.distributed.activation import apply_activation_checkpointing, compile_blocks
from mugen.distributed.mesh import ParallelConfig
from mugen.distributed.tensor_parallel import FusedRows, canonical_rows
from mugen.errors import MugenError
from mugen.models.dit.model import MUGDiT
from mugen.models.dit.presets import dit_config


def test_config_checks_the_world_size_and_names_the_axes():
    ParallelConfig(dp_shard=2, tp=2).validate(4)
    with pytest.raises(MugenError, match="dp_shard=2 x cp=1 x tp=2 x pp=1 = 4 ranks, but the job has 8"):
        ParallelConfig(dp_shard=2, tp=2).validate(8)
    with pytest.raises(MugenError, match="activation_checkpointing='some'"):
        ParallelConfig(activation_checkpointing="some").validate()
    with pytest.raises(MugenError, match="tp=0 must be a whole number"):
        ParallelConfig(tp=0).validate()
    for budget in (0.0, 1.5, "0.8", True):
        with pytest.raises(MugenError, match="compile_memory_budget=.* must be a number in \\(0, 1\\]"):
            ParallelConfig(compile_memory_budget=budget).validate()


def test_parse_parallel_reads_numbers_flags_and_words():
    from mugen.train.distributed_run import parse_parallel

    assert parse_parallel("compile_blocks=true,compile_memory_budget=0.8,activation_checkpointing=full") == {
        "compile_blocks": True, "compile_memory_budget": 0.8, "activation_checkpointing": "full",
    }
    with pytest.raises(MugenError, match="compile_memory_budget='most' must be a number"):
        parse_parallel("compile_memory_budget=most")


@pytest.mark.parametrize("parts,tp", [(3, 2), (3, 4), (2, 2), (2, 3)])
def test_head_aligned_rows_give_each_rank_its_own_heads(parts, tp):
    heads, head_dim = 12, 2
    rows = parts * heads * head_dim
    layout = FusedRows(parts=parts, tp=tp)
    canonical = torch.arange(rows)  # row i of [q | k | v]
    permuted = canonical[layout.permuted_from_canonical(rows)]
    for rank, local in enumerate(permuted.chunk(tp)):  # what a column-wise split hands each rank
        for part, piece in enumerate(local.chunk(parts)):
            own_heads = torch.arange(rank * heads // tp * head_dim, (rank + 1) * heads // tp * head_dim)
            assert torch.equal(piece, part * heads * head_dim + own_heads)
    assert torch.equal(canonical_rows(permuted, layout), canonical)
    # Any contiguous range of permuted rows maps to canonical runs that hold the same values.
    for start, length in [(0, rows), (5, 17), (rows - 7, 7)]:
        for local_offset, canonical_start, run in layout.canonical_runs(start, length, rows):
            assert torch.equal(permuted[start + local_offset : start + local_offset + run], canonical[canonical_start : canonical_start + run])


def _gradients(model: MUGDiT, saved: list | None = None) -> dict:
    """Gradients of a fixed loss; ``saved`` collects the tensors autograd keeps outside recompute regions."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 2, 4, 4, generator=generator)
    text = torch.randn(2, 5, 32, generator=generator)
    saved = [] if saved is None else saved

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(latents, torch.tensor([300.0, 800.0]), text, frame_cond_mask=torch.tensor([[True, False], [False, False]]))
    out.square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _tiny() -> MUGDiT:
    torch.manual_seed(0)
    model = MUGDiT(dit_config("debug", depth=2, text_dim=32, latent_channels=4))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_gives_the_same_gradients_and_names(mode):
    kept_plain, kept_recomputed = [], []
    expected = _gradients(_tiny(), kept_plain)
    model = _tiny()
    names = [name for name, _ in model.named_parameters()]
    apply_activation_checkpointing(model.blocks, mode)
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints keep their names
    gradients = _gradients(model, kept_recomputed)
    # The blocks' activations are no longer kept by the outer graph (only the embedders' and head's).
    assert sum(kept_recomputed) < 0.5 * sum(kept_plain), (sum(kept_recomputed), sum(kept_plain))
    for name, grad in gradients.items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_unknown_recompute_mode_is_refused():
    with pytest.raises(MugenError, match="choose 'full' or 'selective'"):
        apply_activation_checkpointing(_tiny().blocks, "everything")


def test_compiled_blocks_give_the_same_gradients():
    expected = _gradients(_tiny())
    model = _tiny()
    compile_blocks(model.blocks, backend="aot_eager")  # the wiring, without a C++ toolchain on CI
    for name, grad in _gradients(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_a_compile_memory_budget_is_handed_to_the_partitioner():
    import torch._functorch.config as functorch_config

    expected = _gradients(_tiny())
    model = _tiny()
    budget = functorch_config.activation_memory_budget
    try:
        compile_blocks(model.blocks, memory_budget=0.5, backend="aot_eager")
        assert functorch_config.activation_memory_budget == 0.5
        gradients = _gradients(model)
    finally:
        functorch_config.activation_memory_budget = budget
    for name, grad in gradients.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
