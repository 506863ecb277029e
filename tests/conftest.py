"""Suite-wide settings: one intra-op thread per test process.

The suite runs under pytest-xdist with one worker per core; more threads per worker only fight
over the two CI cores (measured: small convolutions got ~100x slower under oversubscription).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
