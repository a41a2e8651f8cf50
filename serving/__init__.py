"""Inference: tiled, blended segmentation of stacks of any size, and the MLflow pyfunc model around it."""
