"""The bottom layer: reading volumes and writing files safely, normalisation, metrics, the U-Net and its
losses, the dataset artifact, pictures, and the MLflow and command-line helpers every step shares."""
