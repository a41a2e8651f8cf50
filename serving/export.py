"""`export` entry point: a logged model as a BioImage.IO model package (Fiji / deepImageJ, ilastik, napari)
or a plain ONNX file (QuPath, any ONNX runtime).

    python -m serving.export --model_uri models:/em-unet@champion --format bioimageio --output em-unet.zip
    python -m serving.export --model_uri runs:/<train run id>/model --format onnx --output em-unet.onnx

The package's test image is a slice of the model's own held-out data (or of `sample`), its expected output
is what the model computes on it, and its documentation holds what the model was trained on, its test
scores from the registry and the MLflow run it came from (`emunet.inference.export` writes the files).
Both outputs expect a slice normalised as the package's preprocessing says (percentiles 0.5 / 99.5,
clipped); the BioImage.IO consumers do it themselves, an ONNX user must (see the file's metadata). A 2.5-D
model (trained with `context_slices` k) takes the slice and its k neighbours above and below as 2k + 1
channels; its test image is such a stack of slices.
"""

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from emunet.registry.cli import run_entry
from emunet.core.dataset import mask_parts, read_manifest, stacks_in
from emunet.core.errors import InputError
from emunet.core.files import atomic_write
from emunet.core.io import NM_PER_UNIT, open_volume
from emunet.core.normalize import HIGH_PERCENTILE, LOW_PERCENTILE
from emunet.registry.tracking import load_segmenter
from emunet.inference.context import context_stack
from emunet.inference.export import PREPROCESSING, package_formats, write_onnx, write_package

FORMATS = {"bioimageio": ".zip", "onnx": ".onnx"}
UNET_CITATION = ("Ronneberger, Fischer, Brox (2015). U-Net: Convolutional Networks for Biomedical Image "
                 "Segmentation. MICCAI 2015", "10.1007/978-3-319-24574-4_28")


@dataclass(frozen=True)
class ExportConfig:
    """Write a logged model as a BioImage.IO package or an ONNX file."""

    model_uri: str = "models:/em-unet@champion"
    format: str = "bioimageio"  # "bioimageio" (a .zip for deepImageJ, ilastik, napari) or "onnx" (QuPath, runtimes)
    output: str = ""  # the file to write; default em-unet.zip or em-unet.onnx in the current folder
    sample: str = ""  # a stack (any format predict reads) whose middle slice is the package's test image; default: a held-out slice of the training data
    license: str = "CC-BY-4.0"  # SPDX id of the package; follow the training data's terms (VNC: CC-BY-NC-SA-3.0)
    authors: str = ""  # comma-separated; default: the MLflow user who trained the model
    data_citation: str = ""  # the training data's source, "text" with an optional "doi:10..." or URL in it


def registry_record(client: MlflowClient, model_uri: str, run_id: str) -> dict:
    """The registered version behind `model_uri` (or the latest registered from `run_id`) and its test scores:
    `{"name", "version", "scores"}`, or {} when the model was never registered."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@(.+)|/(\d+))", model_uri)
    if match:
        name, alias, number = match.groups()
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    else:
        found = client.search_model_versions(f"run_id='{run_id}'") if run_id else []
        if not found:
            return {}
        version = max(found, key=lambda v: int(v.version))
    tags = version.tags or {}
    scores = {k: float(v) for k, v in tags.items() if k.startswith("test_")}
    if tags.get("eval_run_id"):
        metrics = client.get_run(tags["eval_run_id"]).data.metrics
        scores.update({k: v for k, v in metrics.items() if k.startswith("test_")})
    return {"name": version.name, "version": version.version, "scores": dict(sorted(scores.items()))}


def nanometres(voxel_size, unit) -> tuple[float, float] | None:
    """`(y, x)` of a `(z, y, x)` voxel size in nm, None when unknown."""
    if voxel_size is None or NM_PER_UNIT.get(unit) is None:
        return None
    return tuple(float(s) * NM_PER_UNIT[unit] for s in voxel_size[1:])


def training_slice(params: dict, context: int = 0) -> dict:
    """A held-out slice of the data the model was trained on: `{"image", "truth", "stack", "source",
    "voxel_nm", "stacks"}`; `image` is `(H, W)`, or `(H, W, 2 * context + 1)` with the slice's context.
    Raises `InputError` when the dataset cannot be read (then pass `sample`)."""
    uri = params.get("dataset_uri", "")

    def fetch(part: str) -> Path:  # a folder's file, or one file of an MLflow artifact (not the whole dataset)
        if Path(uri).is_dir():
            return Path(uri) / part
        return Path(mlflow.artifacts.download_artifacts(f"{uri.rstrip('/')}/{part}"))

    try:
        if not uri:
            raise InputError("the training run logged no dataset_uri")
        manifest = read_manifest(fetch("manifest.json").parent)
        info = (stacks_in(manifest, "val") or stacks_in(manifest, "train"))[0]
        image = np.load(fetch(f"{info.name}/image.npy"), mmap_mode="r")
        truth = np.load(fetch(f"{info.name}/mask.npy"), mmap_mode="r")
    except (InputError, OSError, ValueError, IndexError, MlflowException) as exc:
        raise InputError(f"cannot read the training dataset {uri!r} of this model ({str(exc)[:200]}); pass "
                         f"sample=<a stack file> for the package's test image") from None
    z = image.shape[0] // 2
    source = info.source
    foreground, _ = mask_parts(truth[z])  # a sparse dataset's not-annotated voxels are not cells
    return {"image": context_stack(image, z, context) if context else np.array(image[z]),
            "truth": foreground.astype(np.uint8), "stack": f"{info.name}, slice {z}",
            "source": source, "voxel_nm": nanometres(source.get("voxel_size"), source.get("unit")),
            "stacks": [f"{s.name} ({s.split}, {' x '.join(map(str, s.shape))})" for s in manifest["stacks"]]}


def sample_slice(path: str, context: int = 0) -> dict:
    """The middle slice of the user's stack `path` (with its `context` slices on each side as channels),
    with its voxel size where the file has one."""
    if not Path(path).exists():
        raise InputError(f"{path}: file not found")
    with open_volume(path) as volume:
        z = volume.shape[0] // 2
        image = context_stack(volume, z, context) if context else np.asarray(volume[z])
        return {"image": image, "truth": None, "stack": f"{Path(path).name}, slice {z}",
                "source": {"file": Path(path).name}, "voxel_nm": nanometres(volume.voxel_size, volume.unit),
                "stacks": []}


def citation(text: str) -> tuple[str, str] | None:
    """`(text, doi or URL)` from a free citation; None when it names neither (it goes in the docs only)."""
    found = re.search(r"(https?://\S+)|(?:doi:\s*|doi\.org/)?(10\.\d{4,9}/\S+)", text)
    return (text.strip(), (found.group(1) or found.group(2)).rstrip(".,;)")) if found else None


def documentation(record: dict, data: dict, cfg: ExportConfig, formats: tuple[str, ...]) -> str:
    """The package's README.md: what the model does, its training, data and scores, and its provenance."""
    params, metrics, registry = record["params"], record["metrics"], record["registry"]
    scores = registry.get("scores", {})
    voxel = f"{data['voxel_nm'][0]:g} x {data['voxel_nm'][1]:g} nm (y, x)" if data["voxel_nm"] else "not recorded"
    k = record.get("context", 0)
    channels = "1" if not k else (f"{2 * k + 1}: slice z and its {k} neighbours above and below, z-{k} .. z+{k} in "
                                  f"order, mirrored at the stack's ends without repeating the end slice (a single "
                                  f"slice: the same slice in every channel), normalised together")
    lines = [
        "# em-unet: cells in electron microscopy slices",
        "",
        "A 2-D U-Net (Ronneberger et al. 2015) that gives, for every pixel of a grayscale EM slice, the "
        "probability that it is foreground (cell interior, or the labelled organelle). Threshold at 0.5 for "
        "a mask.",
        "",
        "## Input and output",
        f"- input `raw`: `(batch, channels, y, x)`, channels {channels}; y and x multiples of {record['multiple']}; "
        f"{PREPROCESSING} "
        f"(the package's preprocessing does it: `scale_range` {LOW_PERCENTILE} / {HIGH_PERCENTILE}, then `clip`).",
        "- output `probability`: `(batch, 1, y, x)` float32 in [0, 1] (sigmoid inside the network).",
        f"- pixel size the model was trained at: {voxel}; rescale other data to it.",
        f"- weights: {', '.join(formats)}.",
        "",
        "## Training",
        f"- data: {params.get('dataset_uri') or 'not recorded'}; stacks: {', '.join(data['stacks']) or 'n/a'}; "
        f"source: {data['source']}.",
        f"- recipe: preset {params.get('preset', '?')}, crop {params.get('crop_size', '?')}, depth "
        f"{params.get('depth', '?')}, base filters {params.get('base_filters', '?')}, input scale "
        f"{params.get('input_scale', '?')}, loss {params.get('loss', '?')}, augmentation {params.get('augment', '?')}.",
        f"- best validation Dice {metrics.get('best_val_dice', float('nan')):.4f} after "
        f"{metrics.get('epochs_trained', float('nan')):g} epochs.",
    ]
    if cfg.data_citation:
        lines.append(f"- data citation: {cfg.data_citation}")
    lines += ["", "## Test scores (held-out stacks, from the MLflow model registry)"]
    if scores:
        lines += [f"Registered model `{registry['name']}` version {registry['version']}:", "",
                  "| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in scores.items()]
    else:
        lines.append("This model was not evaluated and registered; no test scores.")
    lines += ["", "## Provenance", f"- MLflow run `{record['run_id']}`, model `{cfg.model_uri}`.",
              f"- test image: {data['stack']}; its expected output was computed by the model itself.", ""]
    return "\n".join(lines)


def model_record(model_uri: str) -> dict:
    """The logged model and what MLflow knows of it: the segmenter, its run's params and metrics, and the
    registry's record (`registry_record`)."""
    segmenter = load_segmenter(model_uri)
    run_id = mlflow.models.get_model_info(model_uri).run_id or ""
    client = MlflowClient()
    run = client.get_run(run_id) if run_id else None
    return {"segmenter": segmenter, "multiple": int(segmenter.meta["multiple_of"]), "run_id": run_id,
            "context": int(segmenter.meta.get("context_slices", 0)),
            "params": run.data.params if run else {}, "metrics": run.data.metrics if run else {},
            "user": run.info.user_id if run else "", "registry": registry_record(client, model_uri, run_id)}


def export(cfg: ExportConfig) -> dict:
    """Run the step: returns `{"output", "format", "formats", "run_id"}` (`formats`: the package's weights)."""
    if cfg.format not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    output = Path(cfg.output or f"em-unet{FORMATS[cfg.format]}").expanduser()
    if output.suffix.lower() != FORMATS[cfg.format]:
        raise InputError(f"output {output} should end in {FORMATS[cfg.format]} for format={cfg.format}")
    if output.is_dir() or not output.resolve().parent.is_dir():
        raise InputError(f"output {output} must be a file in an existing folder")
    record = model_record(cfg.model_uri)
    keras_model = record["segmenter"].keras_model
    meta = {"mlflow_run_id": record["run_id"], "model_uri": cfg.model_uri, "multiple_of": record["multiple"],
            "preprocessing": PREPROCESSING, "context_slices": record["context"],
            "input": f"raw (batch, {2 * record['context'] + 1}, y, x) float32"
                     + (f": slices z-{record['context']} .. z+{record['context']}" if record["context"] else ""),
            "output": "probability (batch, 1, y, x) float32, threshold 0.5",
            **{f"registry_{k}": v for k, v in record["registry"].items() if k != "scores"}}
    with atomic_write(output) as tmp:
        if cfg.format == "onnx":
            write_onnx(keras_model, tmp, meta)
            formats = ("onnx",)
        else:
            data = sample_slice(cfg.sample, record["context"]) if cfg.sample else \
                training_slice(record["params"], record["context"])
            cites = [UNET_CITATION] + [c for c in [citation(cfg.data_citation)] if c]
            authors = [a.strip() for a in cfg.authors.split(",") if a.strip()] or [record["user"] or "em-unet"]
            formats = package_formats(keras_model)
            with tempfile.TemporaryDirectory() as folder:
                path, formats = write_package(
                    Path(folder) / "package.zip", keras_model, data["image"], multiple=record["multiple"],
                    name="em-unet", description="2-D U-Net: foreground probability of EM slices (cells, organelles)",
                    documentation=documentation(record, data, cfg, formats), authors=authors, license=cfg.license,
                    cite=cites, run_id=record["run_id"], voxel_size_nm=data["voxel_nm"], formats=formats,
                    truth=data["truth"],
                    config={**meta, "test_scores": record["registry"].get("scores", {}), "test_image": data["stack"]})
                shutil.move(str(path), tmp)
    print(f"wrote {output.resolve()} ({cfg.format}; weights: {', '.join(formats)})")
    return {"output": str(output.resolve()), "format": cfg.format, "formats": formats, "run_id": record["run_id"]}


if __name__ == "__main__":
    run_entry(export, ExportConfig)
