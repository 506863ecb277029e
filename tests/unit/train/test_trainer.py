import json
import time
import math

import pytest
import torch
from regression_data import RegressionDataset, RegressionTask, stack_collate
from torch import nn

from mugen.data.sampling import ShapeBucketBatchSampler
from mugen.errors import MugenError
from mugen.train.checkpoint import latest_checkpoint
from mugen.train.lr_schedule import build_lr_lambda
from mugen.train.metrics_log import timestep_bin_sums
from mugen.train.trainer import LossOutput, TrainConfig, Trainer, micro_batch_seed


# --------------------------------------------------------------------------- a toy flow problem
class ImageDataset(torch.utils.data.Dataset):
    """Two shape buckets: 14 images of 2x6x6 and 10 of 2x4x8 (channels, height, width)."""

    def __init__(self):
        generator = torch.Generator().manual_seed(123)
        self.shapes = [(2, 6, 6) if index % 5 < 3 else (2, 4, 8) for index in range(24)]
        self.images = [torch.randn(shape, generator=generator) for shape in self.shapes]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"x0": self.images[index], "sample_id": index}


def collate(items):
    return {"x0": torch.stack([item["x0"] for item in items]), "sample_ids": [item["sample_id"] for item in items]}


class VelocityNet(nn.Module):
    """A per-pixel MLP on (x_t, t): works for any image size. Dropout draws from the global RNG,
    so resuming must restore it."""

    def __init__(self):
        super().__init__()
        self.layer_in = nn.Linear(3, 16)
        self.dropout = nn.Dropout(0.1)
        self.layer_out = nn.Linear(16, 2)

    def forward(self, x_t, t):
        pixels = x_t.permute(0, 2, 3, 1)  # (B, H, W, 2)
        t_plane = t.view(-1, 1, 1, 1).expand(*pixels.shape[:3], 1)  # (B, H, W, 1)
        hidden = torch.relu(self.layer_in(torch.cat([pixels, t_plane], dim=-1)))  # (B, H, W, 16)
        return self.layer_out(self.dropout(hidden)).permute(0, 3, 1, 2)  # (B, 2, H, W)


class FlowTask:
    """Rectified flow: x_t = (1 - t) x0 + t eps, target v = x0 - eps; noise and t from the generator."""

    def compute_loss(self, model, batch, generator):
        x0 = batch["x0"]
        t = torch.rand(x0.shape[0], generator=generator, device=x0.device)  # (B,)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        t_view = t.view(-1, 1, 1, 1)
        prediction = model((1 - t_view) * x0 + t_view * eps, t)
        per_sample = ((prediction - (x0 - eps)) ** 2).mean(dim=(1, 2, 3))  # (B,)
        return LossOutput(per_sample.mean(), per_sample.detach(), t, {"t_mean": float(t.mean())})


def flow_trainer(output_dir, steps, grad_accum=1, task=None, **config_changes):
    torch.manual_seed(0)
    dataset = ImageDataset()
    sampler = ShapeBucketBatchSampler(dataset.shapes, batch_size=4, seed=5)
    config = TrainConfig(
        steps=steps, lr=3e-3, warmup_steps=3, grad_accum=grad_accum, log_every=5, checkpoint_every=10, seed=9
    )
    for name, value in config_changes.items():
        setattr(config, name, value)
    return Trainer(VelocityNet(), task or FlowTask(), dataset, sampler, collate, config, output_dir)


def losses(history):
    return [record["loss"] for record in history]


# ----------------------------------------------------------------------------------- resume
def test_resume_after_ten_steps_gives_identical_losses(tmp_path):
    uninterrupted = flow_trainer(tmp_path / "one_go", steps=20, decay="constant").fit()

    first_half = flow_trainer(tmp_path / "resumed", steps=10, decay="constant")
    first_half.fit()
    assert latest_checkpoint(tmp_path / "resumed").name == "step_00000010"
    resumed = flow_trainer(tmp_path / "resumed", steps=20, decay="constant").fit()

    assert [record["step"] for record in resumed] == list(range(1, 21))
    assert losses(resumed) == losses(uninterrupted)  # bitwise on the CPU
    assert len(set(losses(uninterrupted))) == 20
    # Every step draws its own flow times (the generator is seeded by the step, not only by the run).
    assert len({record["t_mean"] for record in uninterrupted}) == 20


def test_micro_batch_seeds_depend_only_on_run_step_and_micro_batch():
    seeds = {micro_batch_seed(9, step, micro) for step in range(50) for micro in range(4)}
    assert len(seeds) == 200
    assert micro_batch_seed(9, 3, 1) == micro_batch_seed(9, 3, 1) != micro_batch_seed(10, 3, 1)
    assert 0 <= micro_batch_seed(9, 3, 1) < 2**63


class CrashingTask(FlowTask):
    """Dies when it is asked for a given micro-batch, as a preempted job would."""

    def __init__(self, crash_at_call):
        self.calls = 0
        self.crash_at_call = crash_at_call

    def compute_loss(self, model, batch, generator):
        if self.calls == self.crash_at_call:
            raise KeyboardInterrupt("preempted")
        self.calls += 1
        return super().compute_loss(model, batch, generator)


def test_resume_after_a_crash_matches_cosine_schedule_and_accumulation(tmp_path):
    settings = dict(steps=16, grad_accum=2, decay="cosine", checkpoint_every=6)
    uninterrupted = flow_trainer(tmp_path / "one_go", **settings).fit()

    with pytest.raises(KeyboardInterrupt):  # dies inside step 9, after the checkpoint of step 6
        flow_trainer(tmp_path / "crashed", task=CrashingTask(crash_at_call=17), **settings).fit()
    assert latest_checkpoint(tmp_path / "crashed").name == "step_00000006"
    resumed = flow_trainer(tmp_path / "crashed", **settings).fit()

    assert losses(resumed) == losses(uninterrupted)
    assert [r["lr"] for r in resumed] == [r["lr"] for r in uninterrupted]
    # Metrics lines written by the crashed run after its checkpoint are replaced, not duplicated.
    logged_steps = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert logged_steps == [5, 10, 15, 16]


def test_resume_with_a_longer_run_follows_the_new_schedule(tmp_path):
    flow_trainer(tmp_path, steps=6, decay="cosine").fit()
    history = flow_trainer(tmp_path, steps=12, decay="cosine").fit()
    schedule = build_lr_lambda(warmup_steps=3, total_steps=12, decay="cosine", min_lr_ratio=0.1)
    assert [record["lr"] for record in history[6:]] == pytest.approx([3e-3 * schedule(i) for i in range(6, 12)])
    with pytest.warns(UserWarning, match=r"changed config fields \['lr'\]"):
        changed = flow_trainer(tmp_path, steps=13, decay="cosine", lr=1e-3).fit()
    assert changed[-1]["lr"] == pytest.approx(1e-3 * build_lr_lambda(3, 13, "cosine", 0.1)(12))


class StepCounter:
    """Stands in for an EMA: updated after each applied step, saved with every checkpoint."""

    def __init__(self):
        self.updates = 0

    def update(self, step, model):
        self.updates += 1

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates = state["updates"]


def test_extra_state_is_checkpointed_and_on_step_end_runs_after_applied_steps(tmp_path):
    counter = StepCounter()
    task = SometimesBrokenTask(nan_loss_calls={2})
    extra_state = lambda: {"counter": counter}  # noqa: E731
    regression_trainer(tmp_path, task, steps=5, extra_state=extra_state, on_step_end=counter.update).fit()
    assert counter.updates == 4  # the skipped step does not update it

    restored = StepCounter()
    extra_state = lambda: {"counter": restored}  # noqa: E731
    regression_trainer(tmp_path, RegressionTask(), steps=7, extra_state=extra_state, on_step_end=restored.update).fit()
    assert restored.updates == 6


# ---------------------------------------------------------------------------------- learning
def test_learning_drives_the_loss_to_the_noise_floor(tmp_path):
    torch.manual_seed(0)
    dataset = RegressionDataset()
    sampler = ShapeBucketBatchSampler([()] * len(dataset), batch_size=16)
    config = TrainConfig(steps=150, lr=1e-1, warmup_steps=10, min_lr_ratio=0.01, grad_clip=0.0, log_every=50)
    history = Trainer(nn.Linear(8, 4), RegressionTask(), dataset, sampler, stack_collate, config, tmp_path).fit()
    final = sum(losses(history)[-10:]) / 10
    # Noise variance 0.01 is the floor; 2x leaves room for the finite sample and the last steps.
    assert final < 0.02
    assert history[0]["loss"] > 50 * 0.02  # the untrained model is far off (the targets have variance ~8)


def test_two_micro_batches_of_one_equal_one_batch_of_two(tmp_path):
    def train(batch_size, grad_accum):
        torch.manual_seed(0)
        model = nn.Linear(8, 4)
        dataset = RegressionDataset(count=12)
        sampler = ShapeBucketBatchSampler([()] * len(dataset), batch_size=batch_size, shuffle=False)
        config = TrainConfig(steps=4, lr=1e-2, grad_accum=grad_accum, grad_clip=1.0)
        output_dir = tmp_path / f"b{batch_size}x{grad_accum}"
        history = Trainer(model, RegressionTask(), dataset, sampler, stack_collate, config, output_dir).fit()
        return model, history

    accumulated_model, accumulated = train(batch_size=1, grad_accum=2)
    batched_model, batched = train(batch_size=2, grad_accum=1)
    for a, b in zip(accumulated, batched):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)  # float32 sums in another order
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    for a, b in zip(accumulated_model.parameters(), batched_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- non-finite
class SometimesBrokenTask(RegressionTask):
    """Records the weights it sees; returns a NaN loss, or a finite loss with a NaN gradient, on chosen calls."""

    def __init__(self, nan_loss_calls=(), nan_grad_calls=()):
        self.calls = 0
        self.nan_loss_calls = set(nan_loss_calls)
        self.nan_grad_calls = set(nan_grad_calls)
        self.seen_weights = []

    def compute_loss(self, model, batch, generator):
        self.seen_weights.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        output = super().compute_loss(model, batch, generator)
        if self.calls in self.nan_loss_calls:
            output.loss = output.loss * float("nan")
        if self.calls in self.nan_grad_calls:
            # sqrt has an infinite slope at 0: the value stays finite, the gradient becomes NaN.
            output.loss = output.loss + torch.sqrt(0.0 * model.weight.sum())
        self.calls += 1
        return output


def regression_trainer(output_dir, task, steps, max_nonfinite_steps=5, **trainer_options):
    torch.manual_seed(0)
    dataset = RegressionDataset(count=32)
    sampler = ShapeBucketBatchSampler([()] * len(dataset), batch_size=8)
    config = TrainConfig(steps=steps, lr=1e-2, max_nonfinite_steps=max_nonfinite_steps, log_every=4)
    return Trainer(nn.Linear(8, 4), task, dataset, sampler, stack_collate, config, output_dir, **trainer_options)


def test_non_finite_steps_leave_weights_untouched_and_training_goes_on(tmp_path, capsys):
    task = SometimesBrokenTask(nan_loss_calls={3}, nan_grad_calls={6})
    trainer = regression_trainer(tmp_path, task, steps=10)
    history = trainer.fit()

    assert [record["skipped"] for record in history] == [i in (3, 6) for i in range(10)]
    assert math.isnan(history[3]["loss"]) and math.isfinite(history[6]["loss"]) and math.isnan(history[6]["grad_norm"])
    weights = task.seen_weights  # weights[i] is the state before step index i
    assert torch.equal(weights[4], weights[3]) and torch.equal(weights[7], weights[6])
    assert not torch.equal(weights[3], weights[2]) and not torch.equal(weights[5], weights[4])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.nonfinite_steps == 2
    # The LR schedule advances on skipped steps too (cosine decay from step 0, no warm-up).
    assert history[4]["lr"] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 10))))
    assert "step 4: non-finite loss" in capsys.readouterr().err


def test_too_many_non_finite_steps_stop_the_run(tmp_path):
    task = SometimesBrokenTask(nan_loss_calls={1, 2, 4})
    trainer = regression_trainer(tmp_path, task, steps=10, max_nonfinite_steps=2)
    with pytest.raises(MugenError, match=r"training stopped: 3 non-finite losses \(last at step 5\)"):
        trainer.fit()
    assert latest_checkpoint(tmp_path) is None  # nothing new is saved after the failure


# ----------------------------------------------------------------------------------- outputs
def test_fit_writes_checkpoints_logs_and_loss_curve(tmp_path):
    trainer = flow_trainer(tmp_path, steps=12, checkpoint_every=4, keep_checkpoints=2)
    history = trainer.fit()

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000008", "step_00000012"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 10, 12]
    assert lines[0]["loss"] == pytest.approx(sum(losses(history[:5])) / 5)
    assert lines[0]["lr"] == history[4]["lr"]
    assert set(lines[0]["loss_by_t"]) <= {f"bin_{k}" for k in range(10)} and lines[0]["loss_by_t"]
    assert {"step", "loss", "lr", "grad_norm", "skipped", "t_mean", "samples"} <= set(history[0])


def test_timestep_bins_average_per_sample_losses():
    losses_per_sample = torch.tensor([1.0, 3.0, 5.0, 7.0])
    timesteps = torch.tensor([0.05, 0.09, 0.55, 1.0])
    sums, counts = timestep_bin_sums(losses_per_sample, timesteps, bins=4)
    assert sums.tolist() == [4.0, 0.0, 5.0, 7.0]  # t = 1 falls into the last bin
    assert counts.tolist() == [2.0, 0.0, 1.0, 1.0]


def test_bad_config_fails_clearly(tmp_path):
    with pytest.raises(MugenError, match="mixed_precision"):
        flow_trainer(tmp_path, steps=2, mixed_precision="fp8")
    with pytest.raises(MugenError, match="warmup_steps"):
        flow_trainer(tmp_path, steps=2, warmup_steps=5)


# ------------------------------------------------------------ balanced data, prefetch and speed logs
def balanced_flow_trainer(output_dir, steps, world_size=1, rank=0, grad_accum=2, **config_changes):
    from mugen.data.balanced import BalancedBatchSampler, SampleCost

    torch.manual_seed(0)
    dataset = ImageDataset()
    tokens = [h * w for _, h, w in dataset.shapes]
    sampler = BalancedBatchSampler(
        dataset.shapes, tokens, SampleCost(0.0, 1.0, 0.01), batch_size=3, micro_batches=grad_accum,
        world_size=world_size, rank=rank, seed=5,
    )
    config = TrainConfig(steps=steps, lr=3e-3, grad_accum=grad_accum, log_every=4, checkpoint_every=5, seed=9, decay="constant")
    for name, value in config_changes.items():
        setattr(config, name, value)
    return Trainer(VelocityNet(), FlowTask(), dataset, sampler, collate, config, output_dir)


def test_balanced_sampler_trains_and_resumes_exactly(tmp_path):
    uninterrupted = balanced_flow_trainer(tmp_path / "one_go", steps=12).fit()
    balanced_flow_trainer(tmp_path / "resumed", steps=5).fit()
    resumed = balanced_flow_trainer(tmp_path / "resumed", steps=12).fit()
    assert losses(resumed) == losses(uninterrupted)  # bitwise on the CPU, across epoch boundaries
    assert all("rank_cost_imbalance" in record and "micro_batch_cost_imbalance" in record for record in uninterrupted)
    state = torch.load(latest_checkpoint(tmp_path / "resumed") / "training_state.pt", weights_only=False)
    assert state["sampler"]["position"] == 12 * 2  # one global counter: 12 steps x 2 micro-batches x 1 rank


def test_balanced_sampler_saved_on_two_ranks_resumes_on_one(tmp_path):
    """Rank 0 of a 2-rank run saves at step 4; a 1-rank run continues at the same global position."""
    two = balanced_flow_trainer(tmp_path, steps=4, world_size=2, rank=0)
    two.fit()
    assert two._data_position == 4 * 2 * 2
    one = balanced_flow_trainer(tmp_path, steps=6, world_size=1, rank=0)
    one._restore(latest_checkpoint(tmp_path))
    assert one._data_position == 16 and one.batch_sampler.position == 16


def test_balanced_sampler_needs_matching_micro_batches(tmp_path):
    with pytest.raises(MugenError, match="micro_batches=grad_accum"):
        trainer = balanced_flow_trainer(tmp_path, steps=2, grad_accum=2)
        Trainer(trainer.model, FlowTask(), trainer.dataset, trainer.batch_sampler, collate, TrainConfig(steps=2, grad_accum=3), tmp_path)


class SlowImageDataset(ImageDataset):
    def __getitem__(self, index):
        time.sleep(0.006)  # reading and decoding a file
        return super().__getitem__(index)


class SlowFlowTask(FlowTask):
    def compute_loss(self, model, batch, generator):
        time.sleep(0.05)  # a step that keeps the accelerator busy
        return super().compute_loss(model, batch, generator)


def test_prefetch_hides_data_loading_and_the_wait_is_logged_every_step(tmp_path):
    def run(prefetch):
        torch.manual_seed(0)
        dataset = SlowImageDataset()
        sampler = ShapeBucketBatchSampler(dataset.shapes, batch_size=4, seed=5)
        config = TrainConfig(steps=8, lr=3e-3, log_every=4, seed=9, prefetch=prefetch)
        trainer = Trainer(VelocityNet(), SlowFlowTask(), dataset, sampler, collate, config, tmp_path / str(prefetch))
        return trainer.fit()

    synchronous = run(prefetch=0)
    prefetched = run(prefetch=2)
    assert losses(prefetched) == losses(synchronous)  # the loader changes timing only
    assert all({"step_time_s", "data_wait_s", "data_wait_fraction"} <= set(record) for record in prefetched)
    wait = lambda history: sum(r["data_wait_s"] for r in history[1:]) / sum(r["step_time_s"] for r in history[1:])
    assert wait(synchronous) > 0.15  # 4 x 6 ms of loading per 50 ms step
    assert wait(prefetched) < 0.5 * wait(synchronous)
    lines = [json.loads(line) for line in (tmp_path / "2" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= line["data_wait_fraction"] <= 1.0 for line in lines)


def test_tflops_and_mfu_are_logged_from_the_flop_counter(tmp_path):
    def counter(batch):
        return 1e9 * batch["x0"].shape[0], 1.5e9 * batch["x0"].shape[0]

    torch.manual_seed(0)
    dataset = ImageDataset()
    sampler = ShapeBucketBatchSampler(dataset.shapes, batch_size=4, seed=5)
    config = TrainConfig(steps=4, lr=3e-3, log_every=2, seed=9, peak_tflops=0.5)
    history = Trainer(VelocityNet(), FlowTask(), dataset, sampler, collate, config, tmp_path, flop_counter=counter).fit()
    for record in history:
        assert record["model_flops"] == 1e9 * record["samples"] and record["hardware_flops"] == 1.5e9 * record["samples"]
        assert record["model_tflops"] == pytest.approx(record["model_flops"] / record["step_time_s"] / 1e12)
        assert record["mfu"] == pytest.approx(record["model_tflops"] / 0.5)
        assert record["hfu"] == pytest.approx(1.5 * record["mfu"])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    window = history[:2]
    window_flops = sum(r["model_flops"] for r in window)
    assert lines[0]["model_tflops"] == pytest.approx(window_flops / sum(r["step_time_s"] for r in window) / 1e12)
    assert lines[0]["hardware_tflops"] == pytest.approx(1.5 * lines[0]["model_tflops"])
    assert lines[0]["mfu"] == pytest.approx(lines[0]["model_tflops"] / 0.5)

    cpu = flow_trainer(tmp_path / "cpu", steps=3)  # no flop counter, no peak on the CPU: no MFU
    assert cpu.peak_tflops is None
    assert "mfu" not in cpu.fit()[0]
