"""The viewer against a real SQLite tracking store holding the session's tiny trained model, registered by
the real `evaluate` step (v1, champion) next to a worse untrained one (v2): the registry helpers, the
inference helper, the page driven with Streamlit's AppTest (widgets by key), and a real browser on a
real `streamlit run` server."""

import dataclasses
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import mrcfile
import numpy as np
import pytest
import tifffile
from streamlit.testing.v1 import AppTest

from pipeline.evaluate import EvaluateConfig, evaluate
from emunet.core.errors import InputError
from emunet.core.model import UNetSpec, build_unet
from emunet.core.synthetic import synthetic_stack
from emunet.inference.segmenter import log_segmenter
from tests.conftest import ROOT, _point_mlflow_at, free_port
from viewer import inference, pictures, planes, registry, scoring

MODEL = "em-unet-viewer-test"
APP = str(ROOT / "viewer" / "app.py")
ARTIFACTS = ROOT / "test-artifacts" / "viewer"  # gitignored: screenshots for people to look at


def log_untrained_model() -> str:
    """A real model that predicts background everywhere: a clearly worse second version."""
    model = build_unet(UNetSpec(depth=2, base_filters=4))
    model.layers[-1].set_weights([np.zeros((1, 1, 4, 1), np.float32), np.array([-5.0], np.float32)])
    with mlflow.start_run(run_name="untrained") as run, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet.keras"
        model.save(path)
        log_segmenter(path, {"multiple_of": 4})
    return f"runs:/{run.info.run_id}/model"


@pytest.fixture(scope="module")
def viewer_store(world_state):
    """The session store with `MODEL` v1 (trained, champion, scored by evaluate) and v2 (untrained)."""
    uri = world_state["uri"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(world_state["root"])
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        _point_mlflow_at(uri)
        try:
            cfg = EvaluateConfig(model_uri=world_state["trained"]["model_uri"], dataset_uri=str(world_state["data"]),
                                 registered_model=MODEL, tile_size=256)
            first = evaluate(cfg)
            second = evaluate(dataclasses.replace(cfg, model_uri=log_untrained_model()))
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            _point_mlflow_at(None)
    assert (first["version"], first["promoted"], second["version"], second["promoted"]) == (1, True, 2, False)
    return {"uri": uri, "first": first, "second": second, "train_run_id": world_state["trained"]["run_id"]}


def stack_and_truth(index: int, shape=(4, 64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic test stack; a different `index` gives a different stack (and so a fresh cache key)."""
    return synthetic_stack(11, index, shape)


def tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, photometric="minisblack")
    return buffer.getvalue()


def mrc(array: np.ndarray, voxel_size_angstrom: float | tuple) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tomo.mrc"
        with mrcfile.new(path) as out:
            out.set_data(array)
            out.voxel_size = voxel_size_angstrom  # (x, y, z) in Å, as mrcfile takes it
        return path.read_bytes()


# --- registry and inference helpers on the real store ---------------------------------------------------

def test_registry_lists_versions_aliases_scores_and_params(viewer_store):
    client = registry.client_for(viewer_store["uri"])
    assert MODEL in registry.list_models(client)
    assert registry.version_choices(client, MODEL) == {"@champion": "1", "2": "2", "1": "1"}
    info = registry.describe(client, viewer_store["uri"], MODEL, "@champion")
    assert (info.version, info.aliases, info.label) == ("1", ("champion",), f"{MODEL} v1 @champion")
    assert info.test_metrics["test_dice"] == pytest.approx(viewer_store["first"]["metrics"]["dice"])
    assert set(info.test_metrics) == {f"test_{k}" for k in viewer_store["first"]["metrics"]}
    assert info.run_id == viewer_store["train_run_id"] and info.params["base_filters"] == "4"
    assert info.run_link.endswith(f"/runs/{info.run_id}")
    worse = registry.describe(client, viewer_store["uri"], MODEL, "2")
    assert worse.aliases == () and worse.test_metrics["test_dice"] < info.test_metrics["test_dice"]
    with pytest.raises(Exception, match="has no version or alias '@nope'"):
        registry.resolve_version(client, MODEL, "@nope")


def test_viewer_probabilities_equal_the_pyfunc_and_report_each_slice(viewer_store):
    model = registry.load_pyfunc(viewer_store["uri"], MODEL, "1", [viewer_store["uri"]])
    stack, _ = stack_and_truth(0, (3, 40, 52))
    stack = stack.astype(np.uint16) * 40  # 16-bit: normalised by the stack's percentiles, not / 255
    for tta in ("none", "flips"):
        seen = []
        prob = inference.probabilities(model, stack, tile_size=256, tta=tta, on_slice=lambda d, t: seen.append((d, t)))
        expected = model.predict(stack, params={"output": "probability", "tile_size": 256, "tta": tta})
        assert prob.shape == (3, 40, 52) and prob.dtype == np.float32
        np.testing.assert_allclose(prob, expected, atol=1e-6)
        assert seen == [(1, 3), (2, 3), (3, 3)]


# --- the page, with AppTest -------------------------------------------------------------------------------

def open_app(monkeypatch, uri: str, stores: str | None = None) -> AppTest:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if stores is None:
        monkeypatch.delenv(registry.STORES_ENV, raising=False)
    else:
        monkeypatch.setenv(registry.STORES_ENV, stores)
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception
    return at


def page_text(at: AppTest) -> str:
    parts = [e.value for kind in (at.markdown, at.caption, at.error, at.warning, at.info, at.code) for e in kind]
    return "\n".join(str(p) for p in parts)


def slice_table(at: AppTest):
    """The per-slice table (a dataframe is not a widget: it is found by its keyed container)."""
    return at.container(key="per_slice").dataframe[0].value


def assert_no_leak(at: AppTest) -> None:
    """No traceback element, no server path, no stack trace text on the page."""
    assert not at.exception
    text = page_text(at)
    assert "Traceback" not in text and "/tmp/" not in text and str(ROOT) not in text


@pytest.mark.parametrize("create_db", [False, True])
def test_empty_registry_says_so_and_shows_the_command_that_trains_one(store, monkeypatch, create_db):
    if create_db:
        registry.list_models(registry.client_for(store))  # an existing store with no model in it
    at = open_app(monkeypatch, store)
    assert at.selectbox(key="tracking_store").value == store  # the default is MLFLOW_TRACKING_URI
    assert any("No registered model" in i.value for i in at.info)
    assert [c.value for c in at.code] == [registry.TRAIN_COMMAND]
    assert (len(at.warning) == 1) is not create_db  # "no tracking store" only when the file is missing
    assert not list(Path(store.removeprefix("sqlite:///")).parent.glob("*.db")) or create_db  # nothing created
    assert_no_leak(at)


def test_a_tracking_store_that_cannot_be_read_gives_a_message(viewer_store, monkeypatch):
    at = open_app(monkeypatch, viewer_store["uri"], stores=f"{viewer_store['uri']},nosuchscheme://somewhere")
    at.selectbox(key="tracking_store").set_value("nosuchscheme://somewhere").run()
    assert any("Cannot read the model registry" in e.value for e in at.sidebar.error)
    assert any("No registered model" in i.value for i in at.info)
    assert_no_leak(at)


def test_the_page_opens_only_the_stores_the_server_was_started_with(viewer_store, monkeypatch, tmp_path):
    """Loading a model runs its code on the viewer's host, so a page visitor must not be able to point the
    viewer at a store of their choosing: there is no text box for a URI, only the configured stores to
    pick from, and a store outside them is refused before anything opens it (a SQLite store that were
    opened would be created: its file stays absent)."""
    evil = f"sqlite:///{tmp_path / 'visitor.db'}"
    at = open_app(monkeypatch, viewer_store["uri"])
    assert not at.text_input and at.selectbox(key="tracking_store").options == [viewer_store["uri"]]
    with pytest.raises(ValueError, match="is not in list"):  # a selectbox sends an index into its options
        at.selectbox(key="tracking_store").set_value(evil).run()
    assert not (tmp_path / "visitor.db").exists()
    with pytest.raises(InputError, match="opens only the tracking stores its server was started with"):
        registry.load_pyfunc(evil, MODEL, "1", [viewer_store["uri"]])
    assert not (tmp_path / "visitor.db").exists()
    # Configured on the command line (`streamlit run viewer/app.py -- --stores a,b`) or in the environment.
    assert registry.configured_stores(["--stores", "sqlite:///a.db,http://lab:5000"], {}) == ["sqlite:///a.db", "http://lab:5000"]
    assert registry.configured_stores([], {registry.STORES_ENV: "http://lab:5000"}) == ["http://lab:5000"]
    assert registry.configured_stores([], {"MLFLOW_TRACKING_URI": "http://x:5000"}) == ["http://x:5000"]


def test_sample_data_is_segmented_scored_and_browsable(viewer_store, monkeypatch):
    at = open_app(monkeypatch, viewer_store["uri"])
    at.selectbox(key="model_name").set_value(MODEL).run()
    assert at.selectbox(key="model_version").value == "@champion"
    assert any(f"**{MODEL} v1 @champion**" == m.value for m in at.sidebar.markdown)
    at.button(key="sample_data").click().run()
    assert_no_leak(at)
    assert [m.label for m in at.container(key="stack_scores").metric] == [
        "Object F1", "Dice", "IoU", "Pixel accuracy", "Median slice accuracy", "Precision", "Recall", "Objects / slice"]
    assert all(0 <= float(m.value) <= 1 for m in at.container(key="stack_scores").metric[:7])
    objects = next(c.value for c in at.container(key="stack_scores").caption if c.value.startswith("Objects"))
    assert "Object precision" in objects and "Count error" in objects and "VI merge" in objects
    assert [i.captions[0] for i in at.container(key="panels_A").image] == [
        "Image", "Ground truth", "Prediction", "Overlay", "Probability"]
    caption = next(m.value for m in at.markdown if m.value.startswith(f"**A: {MODEL} v1**"))
    assert "Slice 0 (0–11)" in caption and "Dice" in caption and "found" in caption
    at.slider(key="slice").set_value(7).run()
    moved = next(m.value for m in at.markdown if m.value.startswith(f"**A: {MODEL} v1**"))
    assert "Slice 7 (0–11)" in moved and moved != caption
    table = slice_table(at)
    assert len(table) == 12 and {"dice", "iou", "pixel_accuracy", "objects", "objects_truth"} <= set(table.columns)
    assert at.download_button(key="download_mask") and at.download_button(key="download_scores")
    assert at.download_button(key="export_onnx") and at.download_button(key="export_bioimageio")


def test_uploads_are_segmented_once_and_the_threshold_reuses_the_probabilities(viewer_store, monkeypatch):
    calls = []
    real = inference.probabilities

    def counting(model, stack, tile_size, tta, on_slice=None):  # a spy: the real function, counted
        calls.append((stack.shape, tile_size, tta))
        return real(model, stack, tile_size, tta, on_slice)

    monkeypatch.setattr(inference, "probabilities", counting)
    image, truth = stack_and_truth(1)
    at = open_app(monkeypatch, viewer_store["uri"])
    at.selectbox(key="model_name").set_value(MODEL).run()
    at.file_uploader(key="image_upload").upload("cells.tif", tiff(image), "image/tiff")
    at.file_uploader(key="truth_upload").upload("cells_gt.tif", tiff(truth * 255), "image/tiff")
    at.run()
    assert_no_leak(at)
    assert calls == [((4, 64, 64), 1024, "none")]
    assert any("**cells**: 4 slices of 64 x 64, uint8 · voxel size unknown · with ground truth" == c.value
               for c in at.caption)
    table = slice_table(at)
    objects_at = table["objects"].tolist()

    at.slider(key="threshold").set_value(0.95).run()  # threshold: no new segmentation, other masks
    assert len(calls) == 1
    assert table["dice"].tolist() != slice_table(at)["dice"].tolist() or \
        objects_at != slice_table(at)["objects"].tolist()
    at.selectbox(key="tta").set_value("flips").run()  # another option: segmented again
    at.selectbox(key="tile_size").set_value(256).run()
    assert calls[1:] == [((4, 64, 64), 1024, "flips"), ((4, 64, 64), 256, "flips")]
    at.selectbox(key="tile_size").set_value(1024).run()  # options seen before: from the cache
    at.selectbox(key="tta").set_value("none").run()
    assert len(calls) == 3
    assert_no_leak(at)


def test_comparing_two_versions_shows_both(viewer_store, monkeypatch):
    image, truth = stack_and_truth(2)
    at = open_app(monkeypatch, viewer_store["uri"])
    at.selectbox(key="model_name").set_value(MODEL).run()
    assert at.selectbox(key="compare_version").options == ["none", "v2"]  # v1 is the champion itself
    calibrated = io.BytesIO()  # an ImageJ stack from Fiji: 0.5 nm pixels, 2 nm slices
    tifffile.imwrite(calibrated, image, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "spacing": 2.0, "unit": "nm"})
    at.file_uploader(key="image_upload").upload("cells.tif", calibrated.getvalue(), "image/tiff")
    at.file_uploader(key="truth_upload").upload("cells_gt.tif", tiff(truth), "image/tiff")
    at.selectbox(key="compare_version").set_value("2").run()
    assert_no_leak(at)
    dice = {m.label: float(m.value) for m in at.metric if m.label.startswith("Dice")}
    assert set(dice) == {"Dice · A", "Dice · B"}
    assert dice["Dice · B"] == 0.0 < dice["Dice · A"]  # v2 finds nothing
    assert [i.captions[0] for i in at.container(key="panels_B").image] == ["Prediction", "Overlay", "Probability"]
    assert any(m.value.startswith(f"**B: {MODEL} v2**") for m in at.markdown)
    assert set(slice_table(at)["model"]) == {f"{MODEL} v1", f"{MODEL} v2"}
    assert at.download_button(key="download_mask_b")
    assert any("with the stack's calibration as Fiji reads it (voxel 2.0 × 0.5 × 0.5 nm (z, y, x))" in c.value
               for c in at.container(key="downloads").caption)
    # The planes show one model at a time: A first, B on request (v2 finds no object at all).
    assert at.radio(key="planes_model").options == [f"A: {MODEL} v1", f"B: {MODEL} v2"]
    assert at.container(key="planes").caption[-1].value.startswith(f"A: {MODEL} v1")
    assert "stretched ×4 in z" in at.container(key="planes").caption[-1].value  # 2 nm slices, 0.5 nm pixels
    at.radio(key="planes_model").set_value("B").run()
    assert_no_leak(at)
    assert at.container(key="planes").caption[-1].value.startswith(f"B: {MODEL} v2")


def imagej_tiff(array: np.ndarray, pixel: float, spacing: float) -> bytes:
    """A stack as Fiji saves it, calibrated: `pixel` and `spacing` (the slice distance) in nm."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, imagej=True, resolution=(1 / pixel, 1 / pixel),
                     metadata={"axes": "ZYX", "spacing": spacing, "unit": "nm"})
    return buffer.getvalue()


@pytest.mark.parametrize("calibrated", [True, False])
def test_planes_through_a_point_are_cut_from_cached_ids_and_stretched_by_the_voxel_size(
        viewer_store, monkeypatch, calibrated):
    """The xy, xz and yz planes through the chosen point, each with the image, truth, prediction and
    objects: their captions, their sizes (z stretched 4x for 2 nm slices of 0.5 nm pixels, not at all
    when the voxel size is unknown), and moving the point or the slice neither runs the model nor
    links the objects again."""
    model_calls, id_calls, shown = [], [], []
    real_probabilities, real_ids, real_display = inference.probabilities, planes.object_ids, planes.display
    monkeypatch.setattr(inference, "probabilities", lambda *a, **k: model_calls.append(1) or real_probabilities(*a, **k))
    monkeypatch.setattr(planes, "object_ids", lambda *a, **k: id_calls.append(1) or real_ids(*a, **k))
    monkeypatch.setattr(planes, "display", lambda rgb, plane, *a, **k: shown.append(
        (plane, real_display(rgb, plane, *a, **k))) or shown[-1][1])
    image, truth = stack_and_truth(5 + calibrated, (4, 64, 48))  # H != W: xz and yz differ in width
    at = open_app(monkeypatch, viewer_store["uri"])
    at.selectbox(key="model_name").set_value(MODEL).run()
    content = imagej_tiff(image, 0.5, 2.0) if calibrated else tiff(image)
    at.file_uploader(key="image_upload").upload("cells.tif", content, "image/tiff")
    at.file_uploader(key="truth_upload").upload("cells_gt.tif", tiff(truth), "image/tiff")
    at.run()
    assert_no_leak(at)
    assert (at.slider(key="point_y").value, at.slider(key="point_x").value) == (32, 24)  # the centre
    shown.clear()
    at.slider(key="point_y").set_value(10)
    at.slider(key="point_x").set_value(30)
    at.slider(key="slice").set_value(2).run()
    assert_no_leak(at)
    for plane, fixed in (("xy", "z = 2"), ("xz", "y = 10"), ("yz", "x = 30")):
        row = at.container(key=f"plane_{plane}")
        assert [i.captions[0] for i in row.image] == [
            f"{kind} · {plane} at {fixed}" for kind in ("Image", "Ground truth", "Prediction", "Objects")]
    assert at.container(key="plane_xz").markdown[0].value == "**xz** — xz at y = 10 · z 0–3 down, x 0–47 across"
    assert at.container(key="plane_yz").markdown[0].value == "**yz** — yz at x = 30 · z 0–3 down, y 0–63 across"
    factor = pictures.enlarge_factor((64, 48))  # the slice's enlargement (8), for every panel
    stretch = 4 if calibrated else 1
    sizes = {plane: {picture.shape for p, picture in shown if p == plane} for plane in planes.PLANES}
    assert sizes == {"xy": {(64 * factor, 48 * factor, 3)}, "xz": {(4 * stretch * factor, 48 * factor, 3)},
                     "yz": {(4 * stretch * factor, 64 * factor, 3)}}
    note = at.container(key="planes").caption[-1].value
    assert ("stretched ×4 in z" in note) is calibrated and ("Voxel size unknown" in note) is not calibrated
    # The crosshair: in the xz image, the row of slice 2 and the column of x = 30 are dashed.
    xz = next(picture for p, picture in shown if p == "xz")
    row, column = planes.band_centre(2, 4, xz.shape[0]), planes.band_centre(30, 48, xz.shape[1])
    assert set(np.unique(xz[row])) == {0, 255} and set(np.unique(xz[:, column])) == {0, 255}
    assert (model_calls, id_calls) == ([1], [1])  # segmented and linked once, for every view of it


def test_a_near_isotropic_stack_too_large_for_3d_objects_is_linked_slice_by_slice(viewer_store, monkeypatch):
    """Near-isotropic voxels ask for solid 3-D objects; when the 3-D watershed would not fit in memory (the
    one path refuses with an InputError) the page says so and shows the objects linked through the slices."""
    modes = []
    real = planes.object_ids

    def refusing(prob, threshold, voxel_size=None, instances="auto", grows=False):
        modes.append((voxel_size, instances))
        if instances == "auto":
            raise InputError("3-D instances of 4 slices need about 99 GiB but 1 GiB are available")
        return real(prob, threshold, voxel_size, instances, grows)

    monkeypatch.setattr(planes, "object_ids", refusing)
    image, _ = stack_and_truth(8)
    at = open_app(monkeypatch, viewer_store["uri"])
    at.selectbox(key="model_name").set_value(MODEL).run()
    at.file_uploader(key="image_upload").upload("cells.tif", imagej_tiff(image, 0.5, 0.5), "image/tiff")
    at.run()
    assert_no_leak(at)
    assert modes == [((0.5, 0.5, 0.5), "auto"), ((0.5, 0.5, 0.5), "2d")]
    assert any("too large for 3-D objects" in w.value for w in at.warning)
    at.slider(key="point_x").set_value(32).run()  # a rerun: the ids from the cache, the note still there
    assert len(modes) == 2 and any("too large for 3-D objects" in w.value for w in at.warning)
    assert [i.captions[0] for i in at.container(key="plane_yz").image] == [
        "Image · yz at x = 32", "Prediction · yz at x = 32", "Objects · yz at x = 32"]
    assert at.container(key="planes").caption[-1].value.endswith("Isotropic voxels: the xz and yz planes are drawn as they are.")


def test_3d_scores_get_their_own_row_only_when_the_summary_has_them(viewer_store, monkeypatch):
    real = scoring.summary
    flat = lambda *a, **k: {k: v for k, v in real(*a, **k).items() if not k.endswith("_3d")}  # noqa: E731
    monkeypatch.setattr(scoring, "summary", flat)  # the page before the 3-D scores
    image, truth = stack_and_truth(7)
    at = open_app(monkeypatch, viewer_store["uri"])
    at.selectbox(key="model_name").set_value(MODEL).run()
    at.file_uploader(key="image_upload").upload("cells.tif", tiff(image), "image/tiff")
    at.file_uploader(key="truth_upload").upload("cells_gt.tif", tiff(truth), "image/tiff")
    at.run()
    assert_no_leak(at)
    assert not at.container(key="stack_scores_3d").metric and not at.container(key="stack_scores_3d").markdown
    per_slice_labels = [m.label for m in at.container(key="stack_scores").metric]

    three_d = {"object_f1_3d": 0.5, "adapted_rand_error_3d": 0.25, "vi_split_3d": 0.125, "vi_merge_3d": 0.75,
               "ap50_3d": 0.375, "ap75_3d": float("nan")}  # NaN: not measured
    monkeypatch.setattr(scoring, "summary", lambda *a, **k: {**flat(*a, **k), **three_d})
    at.slider(key="threshold").set_value(0.6).run()  # a threshold not scored yet: the new summary
    assert_no_leak(at)
    row = at.container(key="stack_scores_3d")
    assert [m.value for m in row.markdown] == ["**3-D (whole objects)**"]
    assert [(m.label, m.value) for m in row.metric] == [
        ("Object F1", "0.500"), ("AP50", "0.375"), ("AP75", "—"), ("Adapted Rand error", "0.250"),
        ("VI split", "0.125"), ("VI merge", "0.750")]
    assert [m.label for m in at.container(key="stack_scores").metric] == per_slice_labels  # the row is apart


@pytest.mark.parametrize("image_files, truth_files, message", [
    ([("notes.tif", b"not an image at all")], [], "notes.tif: not a readable TIFF"),
    ([("notes.txt", b"not an image at all")], [], "notes.txt: not an image stack; upload one stack (.tif"),
    ([("cells.tif", None)], [("labels.csv", b"1,2,3")], "Ground truth not used: labels.csv: not an image stack"),
    ([("cells.tif", None)], [("cells_gt.tif", "short")],
     "Ground truth not used: cells_gt.tif has shape (3, 64, 64) but cells.tif has (4, 64, 64)"),
    ([("rgb.png", "rgb")], [], "rgb.png: expected a grayscale stack"),
    ([("z1.png", "slice64"), ("z2.png", "slice32")], [], "z2.png: slice has shape (32, 32) but z1.png has (64, 64)"),
])
def test_bad_uploads_give_a_message_not_a_traceback(viewer_store, monkeypatch, image_files, truth_files, message):
    import cv2

    image, truth = stack_and_truth(3)
    content = {None: tiff(image), "short": tiff(truth[:3]), "rgb": cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes(),
               "slice64": cv2.imencode(".png", image[0])[1].tobytes(),
               "slice32": cv2.imencode(".png", image[0, :32, :32])[1].tobytes()}
    at = open_app(monkeypatch, viewer_store["uri"])
    at.selectbox(key="model_name").set_value(MODEL).run()
    for key, files in (("image_upload", image_files), ("truth_upload", truth_files)):
        for name, kind in files:
            at.file_uploader(key=key).upload(name, content[kind] if kind in content else kind, "image/tiff")
    at.run()
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    assert_no_leak(at)
    if truth_files:  # the stack itself is fine: segmented and shown without ground truth
        assert len(at.container(key="panels_A").image) == 4 and any("no ground truth" in c.value for c in at.caption)


def test_an_mrc_upload_shows_its_voxel_size(store, monkeypatch):
    """No model needed: the stack's line (shape, dtype, voxel size) comes before any segmentation."""
    image, _ = stack_and_truth(4, (3, 32, 32))
    at = open_app(monkeypatch, store)
    content = mrc(image.astype(np.int16), (11.0, 11.0, 20.0))  # Å, x y z: 1.1 nm pixels, 2 nm slices
    at.file_uploader(key="image_upload").upload("tomo.mrc", content, "application/octet-stream")
    at.run()
    assert_no_leak(at)
    assert not at.error, [e.value for e in at.error]
    assert "**tomo**: 3 slices of 32 x 32, int16 · voxel 2.0 × 1.1 × 1.1 nm (z, y, x) · no ground truth" in \
        [c.value for c in at.caption]


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_a_broken_mrc_upload_gives_one_error_line(store, monkeypatch, kind):
    good = mrc(np.ones((4, 32, 32), np.float32), 10.0)
    at = open_app(monkeypatch, store)
    content = good[:1024 + 200] if kind == "truncated" else b"\x07garbage" * 300
    at.file_uploader(key="image_upload").upload("tomo.mrc", content, "application/octet-stream")
    at.run()
    assert_no_leak(at)
    assert len(at.error) == 1 and "\n" not in at.error[0].value
    assert at.error[0].value.startswith("tomo.mrc: not a readable MRC file")


# --- a real browser on a real server ----------------------------------------------------------------------

@pytest.fixture
def server(viewer_store, tmp_path):
    """`streamlit run viewer/app.py` on a free port on 127.0.0.1, against the test store."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": viewer_store["uri"], "TF_CPP_MIN_LOG_LEVEL": "3"}
    log = open(tmp_path / "streamlit.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "viewer/app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                raise AssertionError("streamlit did not start:\n" + (tmp_path / "streamlit.log").read_text())
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


SETTLED = """() => !document.querySelector('[data-testid="stStatusWidget"]')
    && [...document.querySelectorAll('[data-testid="stImage"] img')].every(i => i.complete && i.naturalWidth > 0)
    && [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')].every(c => c.querySelector('canvas, svg'))"""


def screenshot(page, tmp_path: Path, name: str) -> None:
    """The whole page once the script has finished and every picture and chart is drawn. Streamlit
    scrolls inside its main section, so the window is made as tall as that section's content."""
    page.wait_for_function(SETTLED)
    height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": 1600, "height": max(1000, height + 40)})
    page.wait_for_function(SETTLED)
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({"width": 1600, "height": 1000})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)


def chromium() -> str:
    """Debian's Chromium (`.ci/setup-system` installs it), wherever it is on PATH; CHROMIUM names another."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no chromium on PATH: run `bash .ci/setup-system` (the README's test command does), or set CHROMIUM")
    return path


def slice_caption(page) -> str:
    return page.get_by_text(f"A: {MODEL} v1", exact=True).first.locator("xpath=..").inner_text()


@pytest.mark.slow
def test_browser_picks_a_model_uploads_browses_and_downloads(server, viewer_store, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    image, truth = stack_and_truth(4, (6, 96, 96))
    tifffile.imwrite(tmp_path / "cells.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "cells_gt.tif", truth * 255, photometric="minisblack")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
            page.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)  # the first run imports MLflow and loads the model
            page.goto(server)
            expect(page.get_by_role("heading", name="em-unet viewer")).to_be_visible()

            # Pick the model: registered model, then the version (the champion by default).
            page.get_by_test_id("stSelectbox").filter(has_text="Registered model").click()
            page.get_by_role("option", name=MODEL, exact=True).click()
            expect(page.get_by_text(f"{MODEL} v1 @champion", exact=True)).to_be_visible()
            expect(page.get_by_text("Test scores (evaluate step)")).to_be_visible()

            # Upload the stack and its ground truth.
            uploader = page.get_by_test_id("stFileUploader")
            expect(uploader.filter(has_text="Image stack")).to_contain_text("1GB")  # the limit from config.toml
            uploader.filter(has_text="Image stack").locator("input[type=file]").set_input_files(tmp_path / "cells.tif")
            uploader.filter(has_text="Ground truth").locator("input[type=file]").set_input_files(tmp_path / "cells_gt.tif")
            expect(page.get_by_text("with ground truth")).to_be_visible()
            expect(page.get_by_text(f"A: {MODEL} v1", exact=True)).to_be_visible()  # the planes caption starts so too
            slices = page.locator(".st-key-slices")  # the keyed container of the slice panels
            expect(slices.get_by_test_id("stImage")).to_have_count(5)
            expect(page.locator(".st-key-planes").get_by_test_id("stImage")).to_have_count(12)  # 3 planes x 4
            expect(page.get_by_test_id("stMetric").first).to_contain_text("Object F1")
            expect(page.get_by_test_id("stMetric").nth(1)).to_contain_text("Dice")
            screenshot(page, tmp_path, "1_uploaded")
            before = slice_caption(page)
            sources = [img.get_attribute("src") for img in slices.get_by_test_id("stImage").locator("img").all()]
            assert "Slice 0 (0–5)" in before

            # Move the slider: other panels, other per-slice scores.
            thumb = page.get_by_test_id("stSlider").filter(has_text="Slice").get_by_role("slider")
            thumb.focus()
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            expect(page.get_by_text("Slice 3 (0–5)")).to_be_visible()
            page.wait_for_function(SETTLED)
            after = slice_caption(page)
            assert before.split("Dice")[1] != after.split("Dice")[1]
            # While Streamlit swaps the panels (slow on a loaded machine) the old ones may still be there.
            expect(slices.get_by_test_id("stImage")).to_have_count(5)
            moved = [img.get_attribute("src") for img in slices.get_by_test_id("stImage").locator("img").all()]
            assert len(moved) == 5 and all(a != b for a, b in zip(sources, moved))
            screenshot(page, tmp_path, "2_slice3")

            # Move the point: the xz plane follows y, the slice stays.
            expect(page.get_by_text("xz at y = 48 ·")).to_be_visible()
            thumb = page.get_by_test_id("stSlider").filter(has_text="Point y").get_by_role("slider")
            thumb.focus()
            for _ in range(2):
                page.keyboard.press("ArrowRight")
            expect(page.get_by_text("xz at y = 50 ·")).to_be_visible()
            expect(page.get_by_text("xy at z = 3 ·")).to_be_visible()
            expect(page.locator(".st-key-planes").get_by_test_id("stImage")).to_have_count(12)
            screenshot(page, tmp_path, "3_planes")

            # Download the mask stack: the pyfunc's own mask of the same stack, as 0 / 255.
            with page.expect_download() as download:
                page.get_by_test_id("stDownloadButton").filter(has_text="Mask stack").get_by_role("button").click()
            assert download.value.suggested_filename == "cells_v1_mask.tif"
            mask = tifffile.imread(download.value.path())
            assert mask.shape == image.shape and mask.dtype == np.uint8
            model = registry.load_pyfunc(viewer_store["uri"], MODEL, "1", [viewer_store["uri"]])
            assert np.array_equal(mask, model.predict(image) * 255)

            # Compare with the worse version.
            page.get_by_test_id("stSelectbox").filter(has_text="Compare with").click()
            page.get_by_role("option", name="v2", exact=True).click()
            # The comparison's caption (the planes' model picker names B too, once it has drawn).
            expect(page.locator("strong", has_text=f"B: {MODEL} v2")).to_be_visible()
            expect(slices.get_by_test_id("stImage")).to_have_count(8)
            screenshot(page, tmp_path, "4_compare")
            assert "Traceback" not in page.content()
        finally:
            browser.close()
