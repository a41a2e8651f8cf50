"""`export`: a model trained, evaluated and registered in a real SQLite store, written as a BioImage.IO package
that bioimageio.core's own test of a model accepts and as an ONNX file that onnxruntime runs, both giving
the pyfunc's probabilities.

No download: bioimageio.core is pointed at a cache in tmp and every connection that leaves the machine is
refused and recorded (the tests assert none was tried)."""

import dataclasses
import socket
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from emunet.registry.tracking import load_segmenter
from serving.export import ExportConfig, export
from tests.conftest import ROOT, _point_mlflow_at

MODEL = "em-unet-export"  # registered under its own name: the session store is shared with other tests
CHAMPION = f"models:/{MODEL}@champion"

# Package (as bioimageio.core runs it) vs pyfunc on the same slice: percentiles taken in float32 vs float64,
# and scale_range adds eps = 1e-6 to the window; measured max |difference| 2.7e-7 (ONNX; 2.4e-7 Keras and
# SavedModel weights), so 1e-5 leaves room for other CPUs and still fails on any real disagreement.
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Refuse (and record) connections that leave this machine; bioimageio's cache in tmp, Keras on TF."""
    tried, connect = [], socket.socket.connect

    def local_only(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            tried.append(address)
            raise OSError(f"test_export is offline: refused a connection to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.setenv("BIOIMAGEIO_CACHE_PATH", str(tmp_path / "bioimageio-cache"))
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")  # bioimageio.core's default is torch
    yield
    assert not tried, f"tried to download: {tried}"


@pytest.fixture(scope="module")
def registered(world_state):
    """The session's tiny trained model, evaluated and registered by the real `evaluate` step as `MODEL`
    (alias `champion`) in the session's store."""
    from pipeline.evaluate import EvaluateConfig, evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(world_state["root"])
        mp.setenv("MLFLOW_TRACKING_URI", world_state["uri"])
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        _point_mlflow_at(world_state["uri"])
        try:
            evaluated = evaluate(EvaluateConfig(model_uri=world_state["trained"]["model_uri"], registered_model=MODEL,
                                                dataset_uri=str(world_state["data"]), tile_size=256))
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            _point_mlflow_at(None)
    return {**world_state, "evaluated": evaluated}


@pytest.fixture
def store_of(registered, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    _point_mlflow_at(registered["uri"])
    yield registered
    while mlflow.active_run():
        mlflow.end_run()
    _point_mlflow_at(None)


def a_slice(registered, side=(48, 64)) -> np.ndarray:
    """A raw held-out slice of another size than the package's test image (a multiple of 16)."""
    image = np.load(registered["other"] / "s2" / "image.npy")
    return np.ascontiguousarray(image[1, :side[0], :side[1]])


@pytest.mark.slow
def test_bioimageio_package_passes_bioimageio_core_and_gives_the_pyfunc_probabilities(store_of, tmp_path):
    from bioimageio.core import create_prediction_pipeline, predict, test_model
    from bioimageio.spec import load_model_description

    result = export(ExportConfig(model_uri=CHAMPION, output=str(tmp_path / "em-unet.zip")))
    path = Path(result["output"])
    segmenter = load_segmenter(CHAMPION)
    multiple = int(segmenter.meta["multiple_of"])
    assert {"tensorflow_saved_model_bundle", "onnx"} <= set(result["formats"])
    assert ("keras_v3" in result["formats"]) == (segmenter.meta["spec"]["input_scale"] == 1)

    summary = test_model(path)  # every weight format: test tensors reproduced, then sizes n * step + min
    assert summary.status == "passed", summary.format()
    tested = {d.name for d in summary.details}
    for wf in result["formats"]:
        assert any(wf in name for name in tested), (wf, tested)

    with zipfile.ZipFile(path) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        docs = archive.read(rdf["documentation"]["source"]).decode()
        names = set(archive.namelist())
    assert rdf["format_version"].startswith("0.5") and rdf["type"] == "model"
    assert {rdf["covers"][0]["source"], "test_input.npy", "test_output.npy"} <= names
    assert [a.get("type") for a in rdf["inputs"][0]["axes"]] == ["batch", "channel", "space", "space"]
    assert all(a["size"] == {"min": multiple, "step": multiple} for a in rdf["inputs"][0]["axes"][2:])
    assert [p["id"] for p in rdf["inputs"][0]["preprocessing"]][1:3] == ["scale_range", "clip"]
    assert {"doi": "10.1007/978-3-319-24574-4_28"}.items() <= rdf["cite"][0].items()
    run_id = store_of["trained"]["run_id"]
    assert rdf["config"]["emunet"]["mlflow_run_id"] == run_id and run_id in docs
    dice = store_of["evaluated"]["metrics"]["dice"]
    assert rdf["config"]["emunet"]["test_scores"]["test_dice"] == pytest.approx(dice) and "test_dice" in docs

    # The package on a slice it has not seen, as a consumer runs it, against our pyfunc on that slice.
    image = a_slice(store_of)
    # The package runs float32 weights: compared with the pyfunc in float32 (bfloat16 differs by up to 0.007).
    expected = mlflow.pyfunc.load_model(CHAMPION).predict(image, params={"output": "probability", "precision": "float32"})
    descr = load_model_description(path)
    for wf in result["formats"]:
        got = predict(model=create_prediction_pipeline(descr, weight_format=wf), inputs=image[None, None].astype(np.float32))
        probability = got.members["probability"].data.to_numpy()[0, 0]
        assert np.abs(probability - expected).max() < TOLERANCE, wf


def test_onnx_from_the_command_line_matches_the_keras_model(store_of, tmp_path, capsys):
    import onnx
    import onnxruntime

    from emunet.registry.cli import run_entry

    model_uri = store_of["trained"]["model_uri"]
    run_entry(export, ExportConfig, ["--model_uri", model_uri, "--format", "onnx", "--output", "u.onnx"])
    assert f"wrote {tmp_path / 'u.onnx'} (onnx" in capsys.readouterr().out
    segmenter = load_segmenter(model_uri)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "u.onnx")).metadata_props}
    assert props["mlflow_run_id"] == store_of["trained"]["run_id"] and "percentile" in props["preprocessing"]
    session = onnxruntime.InferenceSession(str(tmp_path / "u.onnx"), providers=["CPUExecutionProvider"])
    m = int(segmenter.meta["multiple_of"])
    batch = np.random.default_rng(0).random((2, 1, 3 * m, 5 * m), dtype=np.float32)
    (got,) = session.run(None, {"raw": batch})
    keras_out = np.asarray(segmenter.keras_model(batch.transpose(0, 2, 3, 1), training=False)).transpose(0, 3, 1, 2)
    assert got.shape == batch.shape and np.abs(got - keras_out).max() < 1e-5


def test_models_that_work_at_a_coarser_scale_export_too(tmp_path):
    """`input_scale` 2 (bilinear up-sampling, which Keras 3.15 cannot trace at unknown sizes): the graph
    exports run at every size and agree with Keras; the package leaves out the Keras weights."""
    import onnxruntime

    from emunet.core.model import UNetSpec, build_unet
    from emunet.inference.export import package_formats, write_onnx

    model = build_unet(UNetSpec(depth=2, base_filters=4, input_scale=2))
    assert package_formats(model) == ("tensorflow_saved_model_bundle", "onnx")
    session = onnxruntime.InferenceSession(str(write_onnx(model, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    for shape in [(1, 1, 8, 24), (3, 1, 40, 16)]:
        batch = np.random.default_rng(1).random(shape, dtype=np.float32)
        keras_out = np.asarray(model(batch.transpose(0, 2, 3, 1), training=False)).transpose(0, 3, 1, 2)
        assert np.abs(session.run(None, {"raw": batch})[0] - keras_out).max() < 1e-5, shape


@pytest.mark.parametrize("flags, message", [
    (["--format", "tiff"], "format must be one of bioimageio, onnx, got 'tiff'"),
    (["--format", "onnx", "--output", "model.zip"], "should end in .onnx"),
    (["--model_uri", "models:/no-such-model/1"], "models:/no-such-model/1: cannot load the model"),
])
def test_bad_input_is_one_error_line(store_of, flags, message, capsys):
    from emunet.registry.cli import run_entry

    with pytest.raises(SystemExit) as stop:
        run_entry(export, ExportConfig, flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith("error: ") and message in err[-1], err


def test_mlproject_export_entry_matches_the_config():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["export"]
    fields = {f.name: f.default for f in dataclasses.fields(ExportConfig)}
    assert {k: v["default"] for k, v in spec["parameters"].items()} == fields
    assert "python -m serving.export" in spec["command"]
    assert all(f"--{name} {{{name}}}" in spec["command"] for name in fields)


def test_export_is_an_entry_point_of_the_layer_contract():
    """`serving.export` sits among the entry points of `.importlinter`, so tests/test_layers.py checks that
    it imports only from `emunet` (no entry point imports another) and that only the viewer uses it."""
    layers = (ROOT / ".importlinter").read_text().split("layers =")[1]
    entry_points = next(line for line in layers.splitlines() if "serving.predict " in line)
    assert "serving.export" in entry_points.split("|") or " serving.export " in entry_points


def test_the_test_image_comes_from_a_dataset_artifact_one_stack_at_a_time(store_of):
    """Under `mlflow run .` the model's dataset is `runs:/<preprocess run>/dataset`: its manifest and one
    held-out stack are fetched, not the whole artifact."""
    from serving.export import training_slice

    with mlflow.start_run(run_name="preprocess") as run:
        mlflow.log_artifacts(str(store_of["data"]), "dataset")
    got = training_slice({"dataset_uri": f"runs:/{run.info.run_id}/dataset"})
    held_out = np.load(store_of["data"] / "s2" / "image.npy")
    assert got["stack"] == "s2, slice 2" and np.array_equal(got["image"], held_out[2])
    assert got["truth"].shape == got["image"].shape and got["voxel_nm"] is None
    with pytest.raises(ValueError, match="pass sample=<a stack file>"):
        training_slice({"dataset_uri": f"runs:/{run.info.run_id}/nothing-here"})


def test_citations_keep_their_doi_or_url():
    from serving.export import citation

    assert citation("Cardona et al. 2010, PLoS Biol, doi:10.1371/journal.pbio.1000502.") == (
        "Cardona et al. 2010, PLoS Biol, doi:10.1371/journal.pbio.1000502.", "10.1371/journal.pbio.1000502")
    assert citation("VNC, https://example.org/vnc (CC BY-NC-SA)")[1] == "https://example.org/vnc"
    assert citation("our own lab's stacks") is None
