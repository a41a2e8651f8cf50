"""Entry points that turn data into a registered model: `preprocess`, `train`, `evaluate` and `main`
(`python -m pipeline.<step>`). The work itself lives in `emunet`."""

import emunet  # noqa: F401  (sets TensorFlow's CPU kernel default before anything imports TensorFlow)
