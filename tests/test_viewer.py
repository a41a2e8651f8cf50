"""The viewer's pure helpers on tiny hand-made arrays: reading uploads, panels, scores, downloads,
cache keys, the per-slice chart, error messages and the Streamlit settings."""

import csv
import io
import tomllib

import cv2
import mrcfile
import numpy as np
import pytest
import tifffile

from emunet.core.errors import InputError
from emunet.core.io import open_volume
from emunet.core.overlay import ALPHA, FN, FP, TP
from tests.conftest import ROOT
from viewer import charts, downloads, inference, messages, pictures, registry, scoring, stacks


def tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    assert ok
    return encoded.tobytes()


# --- reading uploads ------------------------------------------------------------------------------------

def test_multi_page_tiff_upload_is_read_as_a_stack():
    stack = np.arange(3 * 5 * 4, dtype=np.uint16).reshape(3, 5, 4) * 300
    out, calibration = stacks.read_upload([("stack.tif", tiff_bytes(stack, photometric="minisblack"))])
    assert out.dtype == np.uint16 and np.array_equal(out, stack) and calibration == {}


def test_png_slices_are_stacked_in_natural_order():
    slices = {f"z{i}.png": np.full((4, 6), i, np.uint8) for i in (10, 2, 1)}
    out, _ = stacks.read_upload([(name, png_bytes(a)) for name, a in slices.items()])
    assert out.shape == (3, 4, 6)
    assert [int(s[0, 0]) for s in out] == [1, 2, 10]  # z2 before z10


def test_a_single_2d_image_is_one_slice():
    out, _ = stacks.read_upload([("one.png", png_bytes(np.eye(5, dtype=np.uint8) * 200))])
    assert out.shape == (1, 5, 5)


@pytest.mark.parametrize("files, message", [
    ([("notes.txt", b"hello")], "notes.txt: not an image stack"),
    ([("stack.tif", b"this is not a TIFF")], "stack.tif: not a readable TIFF"),
    ([("colour.tif", tiff_bytes(np.zeros((8, 8, 3), np.uint8), photometric="rgb"))], "colour.tif: expected a grayscale"),
    ([("a.png", png_bytes(np.zeros((4, 4), np.uint8))), ("b.png", png_bytes(np.zeros((4, 5), np.uint8)))],
     "b.png: slice has shape (4, 5) but a.png has (4, 4)"),
    ([("a.png", png_bytes(np.zeros((4, 4), np.uint8))), ("dir/a.png", png_bytes(np.zeros((4, 4), np.uint8)))],
     "same name: a.png"),
    ([("empty.tif", b"")], "empty.tif: the file is empty"),
])
def test_bad_uploads_say_which_file_and_never_show_server_paths(files, message):
    with pytest.raises(InputError) as caught:
        stacks.read_upload(files)
    text = str(caught.value)
    assert message in text
    assert "/tmp" not in text and "em-unet-viewer-" not in text


def mrc_bytes(tmp_path, data: np.ndarray, voxel_size=None) -> bytes:
    """An MRC file as a tomography tool writes it; `voxel_size` (x, y, z) in Å, as mrcfile takes it."""
    path = tmp_path / "written.mrc"
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if voxel_size is not None:
            mrc.voxel_size = voxel_size
    return path.read_bytes()


def test_mrc_upload_is_read_with_its_voxel_size(tmp_path):
    tomo = np.arange(3 * 6 * 7, dtype=np.int16).reshape(3, 6, 7) - 50
    out, calibration = stacks.read_upload([("tomo.mrc", mrc_bytes(tmp_path, tomo, (11.0, 11.0, 20.0)))])
    assert out.dtype == np.int16 and np.array_equal(out, tomo)
    assert calibration["unit"] == "nm" and calibration["voxel_size"] == pytest.approx((2.0, 1.1, 1.1))
    assert stacks.describe_voxel(**calibration) == "voxel 2.0 × 1.1 × 1.1 nm (z, y, x)"
    flat, _ = stacks.read_upload([("slice.rec", mrc_bytes(tmp_path, np.ones((6, 7), np.float32), 5.0))])
    assert flat.shape == (1, 6, 7)  # a 2-D MRC is one slice, as a 2-D TIFF is


def test_npy_upload_and_unknown_voxel_size():
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3, 4), np.float32))
    out, calibration = stacks.read_upload([("stack.npy", buffer.getvalue())])
    assert out.shape == (2, 3, 4) and calibration == {}
    assert stacks.describe_voxel(**calibration) == "voxel size unknown"
    assert stacks.describe_voxel((0.05, 0.0125, 0.0125), None) == \
        "voxel 0.05 × 0.0125 × 0.0125 (no unit given) (z, y, x)"
    assert stacks.with_stats(out)["calibration"] == {}


def test_an_imagej_stack_without_slice_spacing_has_z_unknown():
    """ImageJ leaves `spacing` out when it is 1 or unset: the pixel size is known, the z size is not."""
    content = tiff_bytes(np.zeros((3, 8, 8), np.uint8), imagej=True, resolution=(2.0, 2.0),
                         metadata={"axes": "ZYX", "unit": "nm"})
    _, calibration = stacks.read_upload([("cells.tif", content)])
    assert calibration == {"voxel_size": (None, 0.5, 0.5), "unit": "nm"}
    assert stacks.describe_voxel(**calibration) == "voxel ? × 0.5 × 0.5 nm (z, y, x; z not given)"


@pytest.mark.parametrize("cut", ["garbage", "header", "data"])
def test_bad_mrc_uploads_give_one_line_naming_the_file(tmp_path, cut):
    good = mrc_bytes(tmp_path, np.ones((4, 16, 16), np.float32), 10.0)
    content = {"garbage": bytes(range(256)) * 12, "header": good[:700], "data": good[:1024 + 100]}[cut]
    with pytest.raises(InputError) as caught:
        stacks.read_upload([("tomo.mrc", content)])
    text = str(caught.value)
    assert text.startswith("tomo.mrc: not a readable MRC file") and "\n" not in text
    assert "/tmp" not in text and "em-unet-viewer-" not in text


def test_a_reader_failure_of_any_kind_is_one_line_without_server_paths(monkeypatch):
    def failing(path):
        raise ValueError(f"unexpected end of {path}/page\nsecond line")

    monkeypatch.setattr(stacks, "open_volume", failing)
    with pytest.raises(InputError) as caught:
        stacks.read_upload([("cells.tif", b"II*\x00")])
    text = str(caught.value)
    assert text.startswith("cells.tif: cannot be read (ValueError: unexpected end of") and "\n" not in text
    assert "/tmp" not in text and "em-unet-viewer-" not in text and "second line" not in text


def test_uploads_are_named_by_their_file_name_never_by_a_client_path():
    assert stacks.upload_name(["C:\\data\\cells.tif"]) == "cells.tif"
    assert stacks.upload_name(["../../etc/z1.png", "z2.png"]) == "2 slices"
    assert stacks.safe_name("../../etc/passwd") == "passwd" and stacks.safe_name("/") == "upload"


def test_ground_truth_must_match_and_any_nonzero_label_is_foreground():
    image = np.zeros((2, 3, 3), np.uint8)
    labels = np.array([[[0, 7, 255]] * 3] * 2, np.uint16)
    assert stacks.check_truth(labels, image, "gt.tif", "img.tif").tolist() == [[[0, 1, 1]] * 3] * 2
    with pytest.raises(InputError, match=r"gt.tif has shape \(3, 3, 3\) but img.tif has \(2, 3, 3\)"):
        stacks.check_truth(np.zeros((3, 3, 3)), image, "gt.tif", "img.tif")


def test_digest_follows_values_shape_and_dtype():
    a = np.zeros((2, 3, 4), np.uint8)
    assert stacks.digest(a) == stacks.digest(a.copy())
    assert stacks.digest(a) != stacks.digest(a.reshape(2, 4, 3))
    assert stacks.digest(a) != stacks.digest(a.astype(np.uint16))
    b = a.copy()
    b[1, 2, 3] = 1
    assert stacks.digest(a) != stacks.digest(b)


def test_sample_data_is_a_synthetic_stack_with_its_mask():
    image, mask = stacks.sample_data()
    assert image.shape == mask.shape == stacks.SAMPLE_SHAPE and image.dtype == np.uint8
    assert 0.2 < mask.mean() < 0.9
    assert stacks.describe_stack(image) == "12 slices of 192 x 192, uint8"


# --- pictures -------------------------------------------------------------------------------------------

def blend(gray: float, colour) -> np.ndarray:
    """A pixel of gray level `gray` (in [0, 1]) under an overlay colour, as emunet.core.overlay mixes them."""
    return ((1 - ALPHA) * np.float32(int(gray * 255)) + ALPHA * np.array(colour, np.float32)).astype(np.uint8)


def test_panels_show_truth_prediction_and_tp_fp_fn_in_their_colours():
    image = np.full((2, 2), 0.5, np.float32)
    truth = np.array([[1, 1], [0, 0]], np.uint8)
    prob = np.array([[0.9, 0.2], [0.7, 0.1]], np.float32)  # TP, FN / FP, TN at threshold 0.5
    panels = pictures.slice_panels(image, prob, 0.5, truth)
    assert list(panels) == ["Image", "Ground truth", "Prediction", "Overlay", "Probability"]
    assert (panels["Prediction"].max(-1) > 0).tolist() == [[True, False], [True, False]]
    assert panels["Ground truth"][..., 0].tolist() == [[255, 255], [0, 0]]
    over = panels["Overlay"]
    assert np.array_equal(over[0, 0], blend(0.5, TP)) and np.array_equal(over[0, 1], blend(0.5, FN))
    assert np.array_equal(over[1, 0], blend(0.5, FP)) and np.array_equal(over[1, 1], [127, 127, 127])
    # Threshold 0.8: the 0.7 pixel is no longer predicted.
    assert pictures.slice_panels(image, prob, 0.8, truth)["Prediction"][1, 0].tolist() == [0, 0, 0]


def test_the_prediction_panel_colours_each_object_and_shows_specks_in_gray():
    objects = np.array([[1, 1, 0, 2], [0, 0, 0, 2], [0, 0, 0, 0]])
    mask = objects > 0
    mask[2, 0] = True  # a speck: foreground in no object
    rgb = pictures.objects_rgb(objects, mask)
    assert rgb[0, 0].tolist() == rgb[0, 1].tolist() != rgb[0, 3].tolist()  # one colour an object, two objects
    assert rgb[0, 0].max() > 200 and rgb[0, 3].max() > 200 and rgb[1, 0].tolist() == [0, 0, 0]
    assert rgb[2, 0].tolist() == list(pictures.SPECK)


def test_without_truth_there_is_no_truth_panel_and_the_overlay_shows_the_prediction():
    panels = pictures.slice_panels(np.zeros((2, 2)), np.array([[1.0, 0.0], [0.0, 0.0]]), 0.5)
    assert list(panels) == ["Image", "Prediction", "Overlay", "Probability"]
    assert np.array_equal(panels["Overlay"][0, 0], blend(0.0, TP)) and panels["Overlay"][1, 1].tolist() == [0, 0, 0]


def test_probability_map_runs_from_dark_blue_to_yellow():
    rgb = pictures.probability_rgb(np.array([[0.0, 1.0]], np.float32))
    dark, bright = rgb[0, 0].astype(int), rgb[0, 1].astype(int)
    assert dark[2] > dark[0] and dark.sum() < 200  # viridis 0: dark violet-blue
    assert bright[0] > 200 and bright[1] > 200 and bright[2] < 100  # viridis 1: yellow


def test_small_slices_are_enlarged_by_whole_pixels():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = pictures.enlarge(rgb, min_side=5)
    assert big.shape == (6, 9, 3) and np.array_equal(big[::3, ::3], rgb)
    assert pictures.enlarge(np.zeros((400, 500, 3), np.uint8)).shape == (400, 500, 3)


# --- scores and downloads -------------------------------------------------------------------------------

def two_squares(size: int = 5) -> np.ndarray:
    mask = np.zeros((12, 12), np.uint8)
    mask[0:size, 0:size] = 1
    mask[6:6 + size, 6:6 + size] = 1
    mask[11, 0] = 1  # one pixel: below the minimum object size, not an object
    return mask


def test_slice_rows_have_the_metrics_of_each_slice_and_object_counts():
    truth = np.stack([two_squares(), np.zeros((12, 12), np.uint8)])
    pred = truth.copy()
    pred[0, 0:5, 0:5] = 0  # slice 0: one square of 25 missed -> tp 26, fn 25, fp 0
    pred[1, 0:2, 0:2] = 1  # slice 1: 4 false positives, nothing to find
    rows = scoring.slice_rows(pred, truth)
    assert [r["slice"] for r in rows] == [0, 1]
    assert rows[0]["dice"] == pytest.approx(2 * 26 / (2 * 26 + 25))
    assert rows[0]["recall"] == pytest.approx(26 / 51) and rows[0]["precision"] == 1.0
    assert (rows[0]["objects"], rows[0]["objects_truth"]) == (1, 2)
    assert (rows[1]["dice"], rows[1]["fp"], rows[1]["objects"], rows[1]["objects_truth"]) == (0.0, 4, 0, 0)
    assert [set(r) for r in scoring.slice_rows(pred)] == [{"slice", "objects"}] * 2
    assert scoring.slice_rows(pred, truth, model="m v1")[0]["model"] == "m v1"


def test_summary_pools_all_voxels_and_averages_object_counts():
    truth = np.stack([two_squares(), two_squares()])
    pred = np.stack([two_squares(), np.zeros((12, 12), np.uint8)])
    s = scoring.summary(pred, truth)
    assert s["dice"] == pytest.approx(2 * 51 / (2 * 51 + 51))
    assert s["median_slice_accuracy"] == pytest.approx((1 + (144 - 51) / 144) / 2)
    assert (s["objects_per_slice"], s["objects_per_slice_truth"]) == (1.0, 2.0)
    assert scoring.summary(pred) == {"objects_per_slice": 1.0}


def test_scores_csv_reads_back():
    rows = scoring.slice_rows(np.stack([two_squares()]), np.stack([two_squares()]), model="m v2")
    back = list(csv.DictReader(io.StringIO(scoring.scores_csv(rows).decode())))
    assert back[0]["model"] == "m v2" and float(back[0]["dice"]) == 1.0 and back[0]["objects"] == "2"


def test_mask_tiff_is_a_uint8_stack_of_0_and_255():
    mask = np.zeros((3, 4, 5), np.uint8)
    mask[1, 2, 3] = 1
    back = tifffile.imread(io.BytesIO(downloads.mask_tiff(mask)))
    assert back.shape == (3, 4, 5) and back.dtype == np.uint8
    assert back[1, 2, 3] == 255 and back.sum() == 255


def imagej_calibration(data: bytes) -> tuple:
    """`(spacing, unit, pixel width, pixel height, pages)` of TIFF bytes, as Fiji reads them."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        meta, tags = tif.imagej_metadata or {}, tif.pages[0].tags
        x_res, y_res = (n / d for n, d in (tags["XResolution"].value, tags["YResolution"].value))
        return meta.get("spacing"), meta.get("unit"), 1 / x_res, 1 / y_res, len(tif.pages)


def test_downloads_carry_the_uploaded_stack_calibration(tmp_path):
    mask = np.zeros((3, 4, 5), bool)
    mask[1, 2, 3] = True
    prob, ids = mask.astype(np.float32) * 0.75, mask.astype(np.uint32) * 7
    files = downloads.result_tiffs(mask, prob, ids, voxel_size=(2.0, 1.1, 1.25), unit="nm")
    assert set(files) == {"mask", "prob", "labels"}
    for kind, data in files.items():
        spacing, unit, width, height, pages = imagej_calibration(data)
        assert (spacing, unit, pages) == (2.0, "nm", 3), kind
        assert (width, height) == (pytest.approx(1.25), pytest.approx(1.1)), kind
    back = tifffile.imread(io.BytesIO(files["mask"]))
    assert back.dtype == np.uint8 and back[1, 2, 3] == 255 and back.sum() == 255
    assert tifffile.imread(io.BytesIO(files["prob"]))[1, 2, 3] == 0.75
    assert tifffile.imread(io.BytesIO(files["labels"]))[1, 2, 3] == 7
    # and the project's own reader sees the same voxel size again
    (tmp_path / "mask.tif").write_bytes(downloads.mask_tiff(mask, voxel_size=(2.0, 1.1, 1.25), unit="µm"))
    with open_volume(tmp_path / "mask.tif") as volume:
        assert volume.voxel_size == pytest.approx((2.0, 1.1, 1.25)) and volume.unit == "µm"


def test_downloads_without_calibration_are_plain_stacks():
    data = downloads.mask_tiff(np.ones((2, 3, 3), np.uint8))
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert not tif.is_imagej and tif.asarray().shape == (2, 3, 3) and tif.asarray().min() == 255


# --- caching --------------------------------------------------------------------------------------------

def test_segmentation_key_names_a_version_number_and_every_option():
    key = inference.segmentation_key("sqlite:///a.db", "em-unet", "3", "abc", 1024, "none")
    assert key == ("sqlite:///a.db", "em-unet", "3", "abc", 1024, "none")
    variants = [("sqlite:///b.db", "em-unet", "3", "abc", 1024, "none"), ("sqlite:///a.db", "em-unet", "4", "abc", 1024, "none"),
                ("sqlite:///a.db", "em-unet", "3", "abd", 1024, "none"), ("sqlite:///a.db", "em-unet", "3", "abc", 512, "none"),
                ("sqlite:///a.db", "em-unet", "3", "abc", 1024, "d4")]
    assert all(inference.segmentation_key(*v) != key for v in variants)
    with pytest.raises(ValueError):
        inference.segmentation_key("sqlite:///a.db", "em-unet", "@champion", "abc", 1024, "none")  # aliases move


def test_probability_cache_forgets_the_least_recently_used_beyond_its_byte_budget():
    cache = inference.ProbabilityCache(max_bytes=2 * 400)
    arrays = {k: np.full(100, i, np.float32) for i, k in enumerate("abc")}  # 400 bytes each
    cache.put("a", arrays["a"])
    cache.put("b", arrays["b"])
    assert cache.get("a") is arrays["a"]  # a is now the most recent
    cache.put("c", arrays["c"])
    assert cache.get("b") is None and cache.get("a") is arrays["a"] and cache.get("c") is arrays["c"]
    huge = inference.ProbabilityCache(max_bytes=10)
    huge.put("x", arrays["a"])  # larger than the budget: kept anyway (it is what is on screen)
    assert len(huge) == 1


# --- chart, messages, registry helpers, settings --------------------------------------------------------

def test_chart_rows_show_three_scores_for_one_model_and_dice_of_each_for_two():
    rows = scoring.slice_rows(np.stack([two_squares()] * 2), np.stack([two_squares()] * 2))
    one = charts.long_rows({"m v1": rows})
    assert {r["series"] for r in one} == {"Dice", "IoU", "accuracy"} and len(one) == 6
    two = charts.long_rows({"m v1": rows, "m v2": rows})
    assert {r["series"] for r in two} == {"Dice · m v1", "Dice · m v2"}
    assert {r["series"] for r in charts.long_rows({"m v1": scoring.slice_rows(np.stack([two_squares()]))})} == {"objects"}
    spec = charts.per_slice_chart({"m v1": rows}, current=1).to_dict()
    assert any(layer["mark"]["type"] == "rule" for layer in spec["layer"])
    assert {"slice": 1} in [row for rows in spec.get("datasets", {}).values() for row in rows]


def test_error_messages_lose_server_paths_and_stay_one_line():
    exc = FileNotFoundError("No such file: '/srv/mlruns/1/abc/artifacts/model'\nTraceback ...")
    text = messages.short_error(exc)
    assert text == "FileNotFoundError: No such file: '…'"
    assert messages.short_error(ValueError("x" * 1000)).endswith("x" * 10) and len(messages.short_error(ValueError("x" * 1000))) < 330


def test_default_tracking_uri_is_the_environment_or_the_pipeline_default(tmp_path):
    assert registry.default_tracking_uri({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == "http://mlflow:5000"
    assert registry.default_tracking_uri({}) == "sqlite:///mlflow.db"
    assert registry.missing_sqlite_file(f"sqlite:///{tmp_path}/none.db") == f"{tmp_path}/none.db"
    (tmp_path / "here.db").write_bytes(b"")
    assert registry.missing_sqlite_file(f"sqlite:///{tmp_path}/here.db") is None
    assert registry.missing_sqlite_file("http://mlflow:5000") is None


def test_run_links_point_at_the_server_or_at_mlflow_ui():
    assert registry.run_link("http://mlflow:5000/", "1", "abc") == "http://mlflow:5000/#/experiments/1/runs/abc"
    assert registry.run_link("sqlite:///mlflow.db", "1", "abc") == "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    assert registry.is_server("https://mlflow.lab.org") and not registry.is_server("sqlite:///mlflow.db")
    assert registry.choice_label("@champion", "3") == "@champion (v3)" and registry.choice_label("2", "2") == "v2"


def test_streamlit_settings_limit_uploads_and_hide_tracebacks():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert isinstance(config["server"]["maxUploadSize"], int) and 100 <= config["server"]["maxUploadSize"] <= 4096
    assert config["client"]["showErrorDetails"] == "none"
    assert config["browser"]["gatherUsageStats"] is False


# --- model downloads ------------------------------------------------------------------------------------

def test_the_onnx_download_is_the_selected_network():
    import types

    import onnxruntime

    from emunet.core.model import UNetSpec, build_unet
    from viewer import exports

    model = build_unet(UNetSpec(depth=2, base_filters=4))
    segmenter = types.SimpleNamespace(keras_model=model, meta={"multiple_of": 4})
    data = exports.model_file(segmenter, "onnx", "m v1", "run123")
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 1, 32, 48), np.float32)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    expected = np.asarray(model(x.transpose(0, 2, 3, 1), training=False)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert session.get_modelmeta().custom_metadata_map["mlflow_run_id"] == "run123"
    with pytest.raises(ValueError, match="format must be one of"):
        exports.model_file(segmenter, "pt", "m v1", "run123")
