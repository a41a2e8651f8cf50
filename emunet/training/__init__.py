"""Training: configuration and presets, the plan derived from the data (working resolution, crop),
augmentation, the worker-process loader, callbacks, the resume backup, distribution, and the loop."""
