"""Inference: tiled, blended segmentation of stacks of any size, and the MLflow pyfunc model around it."""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as in pipeline/__init__.py: faster CPU kernels
