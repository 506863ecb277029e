"""Suite-wide settings: one intra-op thread per test process.

The suite runs under pytest-xdist with one worker per core; more threads per worker only fight
over the two CI cores (measured: small convolutions got ~100x slower under oversubscription).
"""

import os

# Triton kernels run through Triton's CPU interpreter in the tests. It must be on before anything
# imports triton (torch and other packages may import it during collection and cache the setting);
# it changes nothing for code that does not launch a kernel (mugen fuses only CUDA tensors by default).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
