"""Run the Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before a kernel is defined; mugen.kernels defines its kernels lazily
(on the first fused call), so setting it here, at collection, is early enough.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
