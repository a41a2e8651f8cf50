"""Entry points that use a trained model: `predict` and `predict_spark` (`python -m serving.<step>`).
The work itself lives in `emunet.inference`."""

import emunet  # noqa: F401  (sets TensorFlow's CPU kernel default before anything imports TensorFlow)
