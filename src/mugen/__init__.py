"""mugen: train and run MUG-V-style video generation models with PyTorch."""

__version__ = "0.1.0"
