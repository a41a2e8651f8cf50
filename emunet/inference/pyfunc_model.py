"""The pyfunc model as code (MLflow's "models from code"): MLflow runs this file when it loads a logged
segmenter and uses the model it sets, so loading a model unpickles nothing."""

import mlflow

from emunet.inference.segmenter import StackSegmenter

mlflow.models.set_model(StackSegmenter())
