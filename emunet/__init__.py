"""em-unet: find cells and organelles in EM and tomography stacks with a U-Net.

Layers, bottom to top (each imports only from itself or below; `.importlinter` checks it in CI):
`emunet.core` (files, volumes, normalisation, metrics, the U-Net, losses, the dataset artifact, MLflow
helpers) -> `emunet.inference` (tiling, instances, the pyfunc segmenter, result writers) ->
`emunet.training` (plan, augmentation, loader, callbacks, checkpoint, distribution, the loop) -> the
entry points in `pipeline/` and `serving/` -> `viewer/` and `bench/`.
"""

import os

# TensorFlow turns its oneDNN CPU kernels on by default only on recent Intel CPUs. Elsewhere (this
# project's 2-core AMD EPYC CI machine) they train the U-Net 1.5-2x faster than the default Eigen kernels
# (bench/train_throughput.py). Set before TensorFlow is imported; an explicit TF_ENABLE_ONEDNN_OPTS wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
