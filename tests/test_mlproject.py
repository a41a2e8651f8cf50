"""MLproject parameters must equal the config dataclasses: names, defaults and flags (defined once)."""

import dataclasses

import pytest
import yaml

from pipeline.evaluate import EvaluateConfig
from pipeline.main import MainConfig
from pipeline.preprocess import PreprocessConfig
from pipeline.train import TrainConfig
from serving.predict import PredictConfig
from serving.predict_spark import PredictSparkConfig
from tests.conftest import ROOT

ENTRIES = {"main": MainConfig, "preprocess": PreprocessConfig, "train": TrainConfig, "evaluate": EvaluateConfig,
           "predict": PredictConfig, "predict_spark": PredictSparkConfig}
MODULES = {"predict": "serving.predict", "predict_spark": "serving.predict_spark"}


@pytest.mark.parametrize("entry, cls", ENTRIES.items())
def test_parameters_match_config(entry, cls):
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    spec = project["entry_points"][entry]
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    assert set(spec["parameters"]) == set(fields)
    for name, default in fields.items():
        declared = spec["parameters"][name]["default"]
        assert type(default)(declared if not isinstance(default, bool) else str(declared) == "true") == default, name
        assert f"--{name} {{{name}}}" in spec["command"]
    assert f"python -m {MODULES.get(entry, 'pipeline.' + entry)}" in spec["command"]


def test_main_defaults_are_the_steps_defaults():
    for cls in (PreprocessConfig, TrainConfig, EvaluateConfig):
        for f in dataclasses.fields(cls):
            if hasattr(MainConfig, f.name):
                assert getattr(MainConfig, f.name) == f.default, f.name
