"""Data in, model out: reading stacks, the embedded synthetic data, the dataset artifact, augmentation,
the U-Net, its losses and metrics, and the MLflow entry points `preprocess`, `train`, `evaluate`, `main`."""
