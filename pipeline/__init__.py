"""Data in, model out: reading stacks, the embedded synthetic data, the dataset artifact, augmentation,
the U-Net, its losses and metrics, and the MLflow entry points `preprocess`, `train`, `evaluate`, `main`."""

import os

# TensorFlow turns its oneDNN CPU kernels on by default only on recent Intel CPUs. Elsewhere (this
# project's 2-core AMD EPYC CI machine) they train the U-Net 1.5-2x faster than the default Eigen kernels
# (bench/train_throughput.py). Set before TensorFlow is imported; an explicit TF_ENABLE_ONEDNN_OPTS wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
