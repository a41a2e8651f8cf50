"""em-unet viewer: pick a registered model, upload a stack (and its ground truth), browse the
segmentation slice by slice beside the truth, compare two model versions, download the masks.

    streamlit run viewer/app.py        # from the project folder (it reads .streamlit/config.toml)

Below the slices, the stack is seen as a volume: the xy, xz and yz planes through a chosen point, with the
objects coloured by their 3-D ids. A thin script: what it computes comes from the helpers in `viewer/`;
what it shows is laid out here.
Every widget has a key (tests find them by key). Errors become a message on the page, never a traceback.
"""

import logging
import sys
from pathlib import Path

# `streamlit run viewer/app.py` puts viewer/ on sys.path, not the project root the packages live in.
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from emunet.core.errors import InputError  # noqa: E402
from emunet.core.normalize import normalize  # noqa: E402
from emunet.registry.tracking import redact  # noqa: E402
from emunet.inference.params import DEFAULTS  # noqa: E402
from emunet.inference.tiling import TTA_MODES  # noqa: E402
from viewer import (charts, downloads, exports, inference, messages, pictures, planes, registry, scoring,  # noqa: E402
                    stacks)

log = logging.getLogger("em-unet-viewer")
# The tracking stores this server may open: from its command line or environment, never from the page.
STORES = registry.configured_stores(sys.argv[1:])
TTA_LABELS = {"none": "none", "flips": "flips (4 views, 4x time)", "d4": "d4 (8 views, 8x time)"}
SCORE_LABELS = {"object_f1": "Object F1", "dice": "Dice", "iou": "IoU", "pixel_accuracy": "Pixel accuracy",
                "median_slice_accuracy": "Median slice accuracy", "precision": "Precision", "recall": "Recall"}
# Object scores shown under the pixel scores (with ground truth), lower is better for the last three.
OBJECT_LABELS = {"object_precision": "Object precision", "object_recall": "Object recall",
                 "mean_matched_iou": "Matched IoU", "count_error": "Count error",
                 "adapted_rand_error": "Adapted Rand error", "vi_merge": "VI merge"}


# --- cached work: each runs once per argument set, shared by all sessions of this server -------------

@st.cache_data(ttl=20, show_spinner=False)
def registered_models(uri: str) -> list[str]:
    return registry.list_models(registry.client_for(registry.allowed(uri, STORES)))


@st.cache_data(ttl=20, show_spinner=False)
def versions_of(uri: str, name: str) -> dict[str, str]:
    return registry.version_choices(registry.client_for(registry.allowed(uri, STORES)), name)


@st.cache_data(ttl=20, show_spinner=False)
def version_info(uri: str, name: str, version: str) -> registry.VersionInfo:
    return registry.describe(registry.client_for(registry.allowed(uri, STORES)), uri, name, version)


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def loaded_model(uri: str, name: str, version: str):
    return registry.load_pyfunc(uri, name, version, STORES)


@st.cache_resource
def probability_cache() -> inference.ProbabilityCache:
    return inference.ProbabilityCache()


@st.cache_resource
def ids_cache() -> inference.ProbabilityCache:
    """The 3-D object ids of each (segmentation, threshold): byte-bounded like the probabilities."""
    return inference.ProbabilityCache()


@st.cache_resource
def linked_instead() -> set:
    """The ids-cache keys whose stack was too large for 3-D objects: the page says so on every rerun."""
    return set()


@st.cache_data(max_entries=32, show_spinner=False)
def stack_scores(key: tuple, threshold: float, truth_digest: str | None, voxel_size, grows: bool, _prob, _truth
                 ) -> tuple[list[dict], dict]:
    """`(per-slice rows, summary)` of one segmentation at one threshold: moving the slice or the point
    reruns the page, and must not score the stack again. (The voxel size is part of the key: how objects
    are found may follow it; `grows`: the model's `grow_over_all`.)"""
    return scoring.rows_and_summary(_prob, _truth, threshold, voxel_size, grows)


@st.cache_resource(max_entries=4, show_spinner="Reading the stack…")
def uploaded_stack(file_ids: tuple, _files: tuple) -> dict:
    """Keyed by the upload ids (hashing the bytes on every rerun would cost more than reading once)."""
    return stacks.with_stats(*stacks.read_upload(list(_files)))


@st.cache_resource(show_spinner="Making the sample stack…")
def sample() -> tuple[dict, np.ndarray]:
    image, mask = stacks.sample_data()
    return stacks.with_stats(image), mask


# --- page sections -------------------------------------------------------------------------------------

def pick_model(uri: str):
    """Sidebar: model, version (or alias) and a version to compare with. Returns `(info, other)`,
    `VersionInfo`s, or `(None, None)` when there is nothing to pick."""
    missing = registry.missing_sqlite_file(uri)
    if missing is not None:
        st.sidebar.warning("No tracking store at this URI yet (its SQLite file does not exist).")
        return None, None
    try:
        names = registered_models(uri)
    except Exception as exc:  # a wrong URI, an unreachable server, a store of another MLflow version
        log.exception("listing models in %s", uri)
        st.sidebar.error(f"Cannot read the model registry at this tracking URI ({messages.short_error(exc)}).")
        return None, None
    if not names:
        return None, None
    name = st.sidebar.selectbox("Registered model", names, key="model_name")
    choices = versions_of(uri, name)
    if not choices:
        st.sidebar.warning(f"{name} has no versions.")
        return None, None
    options = list(choices)
    label = lambda c: registry.choice_label(c, choices[c])  # noqa: E731
    default = options.index(f"@{registry.DEFAULT_ALIAS}") if f"@{registry.DEFAULT_ALIAS}" in options else 0
    choice = st.sidebar.selectbox("Version or alias", options, index=default, format_func=label, key="model_version")
    others = ["none"] + [c for c in options if choices[c] != choices[choice] and not c.startswith("@")]
    other = st.sidebar.selectbox("Compare with", others, format_func=lambda c: c if c == "none" else label(c),
                                 key="compare_version", help="a second version, segmented on the same stack")
    info = version_info(uri, name, choices[choice])
    other_info = None if other == "none" else version_info(uri, name, choices[other])
    show_version(info, uri)
    return info, other_info


def show_version(info: registry.VersionInfo, uri: str) -> None:
    box = st.sidebar.container(border=True)
    box.markdown(f"**{info.label}**")
    if info.test_metrics:
        box.caption("Test scores (evaluate step)")
        names = [k for k in SCORE_LABELS if f"test_{k}" in info.test_metrics]
        box.dataframe(pd.DataFrame({"metric": [SCORE_LABELS[k] for k in names],
                                    "value": [info.test_metrics[f"test_{k}"] for k in names]}),
                      hide_index=True, column_config={"value": st.column_config.NumberColumn(format="%.3f")})
    else:
        box.caption("No test scores logged for this version.")
    if info.lineage:
        box.caption(f"Fine-tuned from {info.lineage}")
    shown = {k: info.params[k] for k in registry.KEY_PARAMS if k in info.params}
    if shown:
        box.caption("Training: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    if info.run_link:
        box.markdown(f"[Training run in MLflow]({info.run_link})")
        if not registry.is_server(uri):
            box.caption("(a local store: start `mlflow ui` on it first)")


def segmentation_options() -> dict:
    st.sidebar.header("Segmentation")
    threshold = st.sidebar.slider("Threshold", 0.05, 0.95, float(DEFAULTS.threshold), 0.05, key="threshold",
                                  help="applied to the cached probabilities: moving it does not run the model")
    tta = st.sidebar.selectbox("Test-time augmentation", TTA_MODES, index=TTA_MODES.index(DEFAULTS.tta),
                               format_func=TTA_LABELS.get, key="tta")
    tile = st.sidebar.selectbox("Tile size", inference.TILE_SIZES,
                                index=inference.TILE_SIZES.index(DEFAULTS.tile_size), key="tile_size",
                                help="largest tile side; slices up to this size run whole")
    return {"threshold": threshold, "tta": tta, "tile_size": tile}


def read_files(files) -> dict:
    return uploaded_stack(tuple(f.file_id for f in files), tuple((f.name, f.getvalue()) for f in files))


def pick_data():
    """Uploaders and the sample button. Returns `(image dict, truth mask or None, name)` or None."""
    left, middle, right = st.columns([5, 5, 2])
    # No `type=` filter: Streamlit would refuse other files with an exception of its own; read_upload
    # refuses them with a message that says what to upload instead.
    files = left.file_uploader(stacks.UPLOAD_LABEL, accept_multiple_files=True, key="image_upload",
                               help=stacks.UPLOAD_HELP)
    truth_files = middle.file_uploader("Ground truth (optional, same shape)", accept_multiple_files=True,
                                       key="truth_upload",
                                       help="labels of the same shape; any non-zero value is foreground")
    right.write("")
    if right.button("Load sample data", key="sample_data", help="a synthetic EM stack and its masks"):
        st.session_state["use_sample"] = True
    if files:
        image = read_files(files)
        truth = None
        if truth_files:
            try:
                truth = stacks.check_truth(read_files(truth_files)["stack"], image["stack"],
                                           stacks.upload_name(f.name for f in truth_files),
                                           stacks.upload_name(f.name for f in files))
            except InputError as exc:  # the image is still worth segmenting: say why the truth is left out
                st.error(f"Ground truth not used: {exc}", icon="⚠️")
        return image, truth, Path(stacks.upload_name(f.name for f in files)).stem.replace(" ", "_")
    if truth_files:
        st.warning("Ground truth uploaded, but no image stack yet.")
    if st.session_state.get("use_sample"):
        image, truth = sample()
        return image, truth, "sample"
    return None


def segmentation_key(info, image: dict, options: dict, uri: str) -> tuple:
    return inference.segmentation_key(uri, info.name, info.version, image["digest"], options["tile_size"],
                                      options["tta"])


def segment(info, image: dict, options: dict, uri: str):
    """Probabilities of the stack by the model version `info`, from the cache or computed with a
    progress bar."""
    key = segmentation_key(info, image, options, uri)
    cache = probability_cache()
    prob = cache.get(key)
    if prob is None:
        model = loaded_model(uri, info.name, info.version)
        z = image["stack"].shape[0]
        bar = st.progress(0.0, text=f"Segmenting with {info.name} v{info.version}: slice 0 of {z}")
        prob = inference.probabilities(model, image["stack"], options["tile_size"], options["tta"],
                                       on_slice=lambda done, total: bar.progress(
                                           done / total, text=f"Segmenting with {info.name} v{info.version}: "
                                                              f"slice {done} of {total}"))
        bar.empty()
        cache.put(key, prob)
    return prob


def object_ids(key: tuple, prob: np.ndarray, threshold: float, voxel_size, grows: bool) -> np.ndarray:
    """The `(Z, H, W)` 3-D object ids of a segmentation at `threshold`, made once from its cached
    probabilities (never from the model) and cached: the slices and the planes are cut out of them.
    Near-isotropic stacks get solid 3-D objects; one too large for that in memory is linked slice by
    slice instead, with a note. `grows`: the model's `grow_over_all` (the key's model version decides it)."""
    cache = ids_cache()
    cache_key = (key, float(threshold), None if voxel_size is None else tuple(voxel_size))
    ids = cache.get(cache_key)
    if ids is None:
        with st.spinner("Finding the objects in 3-D…"):
            try:
                ids = planes.object_ids(prob, threshold, voxel_size, grows=grows)
            except InputError as exc:  # the 3-D watershed would not fit in memory
                log.warning("3-D objects: %s", exc)
                ids = planes.object_ids(prob, threshold, voxel_size, instances="2d")
                linked_instead().add(cache_key)
        cache.put(cache_key, ids)
    if cache_key in linked_instead():
        st.warning("The stack is too large for 3-D objects in this server's memory: its objects are found in "
                   "each slice and linked through the slices.", icon="ℹ️")
    return ids


def show_stack_scores(results: list[dict], truth) -> None:
    st.subheader("Whole-stack scores")
    if truth is None:
        st.caption("Upload a ground truth to score the segmentation. Objects per slice: "
                   + ", ".join(f"{r['label']} {r['summary']['objects_per_slice']:.1f}" for r in results))
        return
    first = results[0]["summary"]
    for i, result in enumerate(results):
        tag = f" · {result['tag']}" if len(results) > 1 else ""  # A and B only when there are two
        cells = st.columns(len(SCORE_LABELS) + 1)
        for cell, (key, label) in zip(cells, SCORE_LABELS.items()):
            delta = None if i == 0 else f"{result['summary'][key] - first[key]:+.3f} vs A"
            cell.metric(f"{label}{tag}", f"{result['summary'][key]:.3f}", delta=delta)
        cells[-1].metric(f"Objects / slice{tag}", f"{result['summary']['objects_per_slice']:.1f}",
                         help=f"in the ground truth: {result['summary']['objects_per_slice_truth']:.1f} "
                              f"(4-connected, at least {scoring.MIN_OBJECT_SIZE} pixels; touching cells "
                              f"separated as output=labels does)")
        st.caption(f"Objects{tag} (matched one to one at IoU ≥ 0.5): " + " · ".join(
            f"{label} {result['summary'][key]:.3f}" for key, label in OBJECT_LABELS.items()))


def show_3d_scores(results: list[dict]) -> None:
    """The `*_3d` scores of the summary, when the scoring gives them: objects as whole 3-D cells
    (nothing is shown when there are none)."""
    for result in results:
        scores = planes.scores_3d(result["summary"])
        if not scores:
            continue
        tag = f" · {result['tag']}" if len(results) > 1 else ""
        st.markdown(f"**3-D (whole objects){tag}**")
        for cell, (label, value) in zip(st.columns(max(len(SCORE_LABELS) + 1, len(scores))), scores.values()):
            cell.metric(f"{label}{tag}", "—" if np.isnan(value) else f"{value:.3f}",
                        help="not measured: whole objects are scored only where every slice is annotated"
                        if np.isnan(value) else None)


def show_slices(image: dict, truth, results: list[dict], threshold: float) -> int:
    st.subheader("Slices")
    stack = image["stack"]
    total = stack.shape[0]
    z = st.slider("Slice", 0, total - 1, 0, key="slice", help="numbered from 0, as in the CSV") if total > 1 else 0
    image01 = normalize(stack[z], *image["stats"])
    for i, result in enumerate(results):
        row = st.container(key=f"panels_{result['tag']}")
        row.markdown(f"**{result['tag']}: {result['label']}** — "
                     f"{scoring.slice_caption(z, total, result['rows'][z])}")
        # The slice's objects by their 3-D ids: the same colours as in the planes below.
        panels = pictures.slice_panels(image01, result["prob"][z], threshold, None if truth is None else truth[z],
                                       result["ids"][z])
        if i > 0:  # the image and the truth are the same for both models
            panels = {k: v for k, v in panels.items() if k not in ("Image", "Ground truth")}
        columns = row.columns(5)[5 - len(panels):]  # B's panels sit under A's of the same kind
        for column, (caption, rgb) in zip(columns, panels.items()):
            column.image(pictures.enlarge(rgb), caption=caption, width="stretch")
    st.markdown(pictures.LEGEND + " &nbsp; (overlay) · probability: dark blue 0 → yellow 1", unsafe_allow_html=True)
    return z


def pick_point(shape: tuple[int, int, int], z: int) -> tuple[int, int, int]:
    """The point the planes go through: z from the slice slider, y and x from their own sliders
    (centred at first)."""
    _, h, w = shape
    left, right = st.columns(2)
    y = left.slider("Point y (row)", 0, h - 1, h // 2, key="point_y") if h > 1 else 0
    x = right.slider("Point x (column)", 0, w - 1, w // 2, key="point_x") if w > 1 else 0
    return z, y, x


def show_planes(image: dict, truth, results: list[dict], threshold: float, z: int) -> None:
    """The xy, xz and yz planes through a point, one row each: image, truth, prediction, objects."""
    st.subheader("Planes through a point")
    stack = image["stack"]
    result = results[0]
    if len(results) > 1:
        tag = st.radio("Model", [r["tag"] for r in results], horizontal=True, key="planes_model",
                       format_func=lambda t: f"{t}: {next(r['label'] for r in results if r['tag'] == t)}")
        result = next(r for r in results if r["tag"] == tag)
    point = pick_point(stack.shape, z)
    voxel_size = image["calibration"].get("voxel_size")
    factor = pictures.enlarge_factor(stack.shape[1:])  # the slice's: one pixel scale for every panel
    for plane in planes.PLANES:
        row = st.container(key=f"plane_{plane}")
        row.markdown(f"**{plane}** — {planes.caption(plane, point, stack.shape)}")
        image01 = normalize(planes.cut(stack, plane, point), *image["stats"])
        panels = planes.plane_panels(image01, None if truth is None else planes.cut(truth, plane, point),
                                     planes.cut(result["prob"], plane, point) >= threshold,
                                     planes.cut(result["ids"], plane, point))
        stretch = planes.z_stretch(voxel_size, plane)
        fixed = planes.FIXED[plane]
        for column, (kind, rgb) in zip(row.columns(4), panels.items()):
            column.image(planes.display(rgb, plane, point, stretch, factor), width="stretch",
                         caption=f"{kind} · {plane} at {fixed} = {dict(zip('zyx', point))[fixed]}")
    st.caption(f"{result['tag']}: {result['label']} · z is the slice chosen above · the dashed crosshair marks "
               f"the point · objects keep one colour through the volume (their 3-D ids). "
               + planes.stretch_note(voxel_size))


def show_per_slice(results: list[dict], z: int) -> None:
    st.subheader("Per-slice scores" if "dice" in results[0]["rows"][0] else "Objects per slice")
    st.altair_chart(charts.per_slice_chart({f"{r['tag']} ({r['file_tag']})": r["rows"] for r in results}, z),
                    width="stretch")
    columns = [c for c in ("model",) + scoring.TABLE_COLUMNS if c in results[0]["rows"][0] or
               (c == "model" and len(results) > 1)]
    table = pd.DataFrame([{**row, "model": r["label"]} for r in results for row in r["rows"]])
    table = table[columns]
    st.dataframe(table, hide_index=True, column_config={c: st.column_config.NumberColumn(format="%.3f") for c in SCORE_LABELS})


def show_downloads(results: list[dict], name: str, threshold: float, image: dict, truth, uri: str) -> None:
    st.subheader("Download")
    columns = st.columns(len(results) + 1)
    for column, result, key in zip(columns, results, ("download_mask", "download_mask_b")):
        pred = result["prob"] >= threshold
        column.download_button(f"Mask stack · {result['label']} (TIFF)",
                               data=lambda p=pred: downloads.mask_tiff(p, **image["calibration"]),
                               file_name=f"{name}_{result['file_tag']}_mask.tif", mime="image/tiff",
                               key=key, on_click="ignore", icon=":material/download:")
    rows = [{"model": r["label"], **row} for r in results for row in r["rows"]]
    columns[-1].download_button("Per-slice scores (CSV)", data=lambda: scoring.scores_csv(rows),
                                file_name=f"{name}_scores.csv", mime="text/csv", key="download_scores",
                                on_click="ignore", icon=":material/table:")
    st.caption(f"Masks are uint8 0 / 255, one page per slice, at threshold {threshold:.2f}, with the stack's "
               f"calibration as Fiji reads it ({stacks.describe_voxel(**image['calibration'])}).")
    version = results[0]["version"]
    z = image["stack"].shape[0] // 2
    left, right = st.columns(2)
    for column, fmt, text in ((left, "bioimageio", "BioImage.IO package (Fiji / deepImageJ, napari, ilastik)"),
                              (right, "onnx", "ONNX (QuPath, ilastik)")):
        column.download_button(
            f"{version.name} v{version.version} · {text}", key=f"export_{fmt}", on_click="ignore",
            data=lambda fmt=fmt: exports.model_file(
                loaded_model(uri, version.name, version.version).unwrap_python_model(), fmt,
                f"{version.name} v{version.version}", version.run_id, np.asarray(image["stack"][z]),
                None if truth is None else np.asarray(truth[z])),
            file_name=f"{version.name}-v{version.version}{exports.FORMATS[fmt]}", icon=":material/deployed_code:")
    st.caption("The model itself, for tools outside this project; the package's test image is slice "
               f"{z} of this stack. From a shell: `python -m serving.export` (see the README).")


def main() -> None:
    st.set_page_config(page_title="em-unet viewer", page_icon="🔬", layout="wide")
    st.sidebar.header("Model")
    uri = st.sidebar.selectbox("Tracking store", STORES, key="tracking_store", format_func=redact,
                               help=f"the stores this viewer was started with (--stores or {registry.STORES_ENV})")
    info, other = pick_model(uri)
    options = segmentation_options()

    st.title("em-unet viewer")
    if info is None:
        st.info("No registered model in this tracking store yet. Train and register one (about 6 minutes on a "
                "laptop CPU), then reload this page:")
        st.code(registry.TRAIN_COMMAND, language="bash")
    data = pick_data()
    if data is None:
        st.info("Upload an image stack (and its ground truth), or press **Load sample data**.")
        return
    image, truth, name = data
    st.caption(f"**{name}**: {stacks.describe_stack(image['stack'])} · {stacks.describe_voxel(**image['calibration'])}"
               + (" · with ground truth" if truth is not None else " · no ground truth"))
    if info is None:
        return

    results = []
    for tag, version in zip("AB", [v for v in (info, other) if v is not None]):
        prob = segment(version, image, options, uri)
        key = segmentation_key(version, image, options, uri)
        voxel_size = image["calibration"].get("voxel_size")
        # How predict's grow_over_all=auto segments with this model (its record: dense instance labels)
        grows = loaded_model(uri, version.name, version.version).unwrap_python_model().grow_over_all
        rows, summary = stack_scores(key, options["threshold"], None if truth is None else stacks.digest(truth),
                                     voxel_size, grows, prob, truth)
        results.append({"tag": tag, "label": f"{version.name} v{version.version}", "prob": prob, "version": version,
                        "file_tag": f"v{version.version}", "rows": rows, "summary": summary,
                        "ids": object_ids(key, prob, options["threshold"], voxel_size, grows)})
    with st.container(key="stack_scores"):
        show_stack_scores(results, truth)
    with st.container(key="stack_scores_3d"):
        show_3d_scores(results)
    with st.container(key="slices"):
        z = show_slices(image, truth, results, options["threshold"])
    with st.container(key="planes"):
        show_planes(image, truth, results, options["threshold"], z)
    with st.container(key="per_slice"):
        show_per_slice(results, z)
    with st.container(key="downloads"):
        show_downloads(results, name, options["threshold"], image, truth, uri)


try:
    main()
except InputError as exc:  # bad input: the message says what was wrong and names the file
    st.error(str(exc), icon="⚠️")
except Exception as exc:  # anything else: a short message here, the traceback in the server log
    log.exception("viewer failed")
    st.error(f"Something went wrong ({messages.short_error(exc)}). The full report is in the server's log.", icon="⚠️")
