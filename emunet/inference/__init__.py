"""Inference: sliding-window tiling, instances from masks, the MLflow pyfunc segmenter, result writers."""
