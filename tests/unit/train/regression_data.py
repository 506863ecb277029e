"""A tiny noisy linear-regression problem shared by the trainer tests (not a test module)."""

import torch

from mugen.train.trainer import LossOutput


class RegressionDataset(torch.utils.data.Dataset):
    """y = x W + bias + noise (std 0.1, so the best achievable mean squared error is 0.01)."""

    def __init__(self, count=64, in_features=8, out_features=4, bias=0.5):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(count, in_features, generator=generator)
        weight = torch.randn(in_features, out_features, generator=generator)
        self.y = self.x @ weight + bias + 0.1 * torch.randn(count, out_features, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index], "y": self.y[index]}


def stack_collate(items):
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class RegressionTask:
    def compute_loss(self, model, batch, generator):
        per_sample = ((model(batch["x"]) - batch["y"]) ** 2).mean(dim=1)  # (B,)
        return LossOutput(per_sample.mean(), per_sample.detach())
