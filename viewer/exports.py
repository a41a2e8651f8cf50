"""The selected model version as files other tools open: a BioImage.IO package (Fiji with deepImageJ,
napari, ilastik) and plain ONNX (QuPath, ilastik, any ONNX runtime), made on this server from the loaded
model, the same writers `python -m serving.export` uses. The package's test image is the middle slice of
the stack on the page."""

import tempfile
from pathlib import Path

import numpy as np

from emunet.inference.export import package_formats, write_onnx, write_package
from serving.export import UNET_CITATION

FORMATS = {"bioimageio": ".zip", "onnx": ".onnx"}


def model_file(segmenter, fmt: str, label: str, run_id: str, image: np.ndarray | None = None,
               truth: np.ndarray | None = None) -> bytes:
    """The bytes of `segmenter`'s network (`StackSegmenter`) as `fmt`: "onnx", or "bioimageio" with the
    raw `(H, W)` `image` (and optional `truth`) as its test slice and cover."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    keras_model, multiple = segmenter.keras_model, int(segmenter.meta["multiple_of"])
    meta = {"model": label, "mlflow_run_id": run_id, "multiple_of": str(multiple)}
    with tempfile.TemporaryDirectory(prefix="em-unet-export-") as tmp:
        path = Path(tmp) / f"model{FORMATS[fmt]}"
        if fmt == "onnx":
            write_onnx(keras_model, path, meta)
        else:
            docs = (f"# {label}\n\nA 2-D U-Net trained with em-unet: the foreground probability of each pixel of "
                    f"an EM slice (threshold 0.5). MLflow run `{run_id}`. Exported from the em-unet viewer; "
                    f"the test image is a slice of the stack that was open there.\n")
            path, _ = write_package(path, keras_model, image, multiple=multiple, name="em-unet",
                                    description="2-D U-Net: foreground probability of EM slices (cells, organelles)",
                                    documentation=docs, authors=["em-unet"], license="CC-BY-4.0",
                                    cite=[UNET_CITATION], run_id=run_id, formats=package_formats(keras_model),
                                    truth=truth, config=meta)
        return Path(path).read_bytes()
