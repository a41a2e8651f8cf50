"""The preprocess entry point against a real SQLite tracking store: formats, splits, provenance, errors."""


import mlflow
import numpy as np
import pytest
import tifffile

from emunet.core.dataset import read_manifest
from emunet.core.errors import InputError
from pipeline.preprocess import PreprocessConfig, preprocess, unlabelled_slices
from tests.conftest import run_module


def imwrite(path, array):
    # 3 or 4 slices would otherwise be written by tifffile as planar RGB(A), which the reader rejects.
    tifffile.imwrite(path, array, photometric="minisblack")


def artifact_dir(result):
    return mlflow.artifacts.download_artifacts(result["dataset_uri"])


def test_synthetic_default_writes_the_artifact_and_logs_provenance(store):
    result = preprocess(PreprocessConfig(synthetic_stacks=3, synthetic_shape="4,48,48"))
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["synthetic_stacks"] == "3"
    assert run.data.tags["data_fingerprint"] == result["manifest"]["eval_fingerprint"]
    folder = artifact_dir(result)
    manifest = read_manifest(folder)
    assert [(s.name, s.split, s.shape) for s in manifest["stacks"]] == [
        ("synthetic_00", "train", (4, 48, 48)), ("synthetic_01", "train", (4, 48, 48)), ("synthetic_02", "val", (4, 48, 48))]
    image = np.load(f"{folder}/synthetic_02/image.npy", mmap_mode="r")
    assert image.dtype == np.uint8 and isinstance(image, np.memmap)
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"], "dataset")}
    assert "dataset/montage.png" in names
    provenance = mlflow.artifacts.load_dict(f"runs:/{result['run_id']}/provenance.json")
    assert provenance["stacks"][0]["generator"] == "emunet.core.synthetic"


def test_several_uint16_tiff_stacks_split_by_stack(store, tmp_path, rng):
    paths = []
    for i in range(3):
        image = rng.integers(1000, 60000, (3, 32, 40), dtype=np.uint16)
        labels = (rng.random((3, 32, 40)) > 0.5).astype(np.uint8) * 255
        imwrite(tmp_path / f"sample{i}.tif", image)
        imwrite(tmp_path / f"sample{i}_labels.tif", labels)
        paths.append((tmp_path / f"sample{i}.tif", tmp_path / f"sample{i}_labels.tif"))
    result = preprocess(PreprocessConfig(images=",".join(str(p) for p, _ in paths),
                                         labels=",".join(str(l) for _, l in paths)))
    manifest = read_manifest(artifact_dir(result))
    assert [(s.name, s.split, s.dtype) for s in manifest["stacks"]] == [
        ("sample0", "train", "uint16"), ("sample1", "train", "uint16"), ("sample2", "val", "uint16")]
    assert manifest["stacks"][0].high > 255  # 16-bit statistics, not 8-bit
    provenance = mlflow.artifacts.load_dict(f"runs:/{result['run_id']}/provenance.json")
    assert provenance["stacks"][2]["images"] == "sample2.tif" and len(provenance["stacks"][2]["sha256"]) == 64


def test_single_stack_is_split_into_contiguous_blocks(store, tmp_path, rng):
    image = rng.integers(0, 255, (8, 32, 32), dtype=np.uint8)
    imwrite(tmp_path / "vol.tif", image)
    imwrite(tmp_path / "lab.tif", (image > 128).astype(np.uint8))
    result = preprocess(PreprocessConfig(images=str(tmp_path / "vol.tif"), labels=str(tmp_path / "lab.tif"),
                                         val_slices="3:5"))
    folder = artifact_dir(result)
    manifest = read_manifest(folder)
    assert [(s.name, s.split, s.shape[0]) for s in manifest["stacks"]] == [
        ("vol_z0-3", "train", 3), ("vol_z3-5", "val", 2), ("vol_z5-8", "train", 3)]
    np.testing.assert_array_equal(np.load(f"{folder}/vol_z3-5/image.npy"), image[3:5])
    # One normalisation for the whole stack: every block carries the same statistics.
    assert len({(s.low, s.high) for s in manifest["stacks"]}) == 1


def test_unannotated_slices_are_left_out_of_training_and_validation(store, tmp_path, rng, capsys):
    """VNC's mitochondria labels miss whole slices (1, 7, 18) whose images are full of mitochondria."""
    image = rng.integers(0, 255, (10, 32, 32), dtype=np.uint8)
    labels = (image > 128).astype(np.uint8)
    labels[[1, 6]] = 0  # slice 1 in a training block, slice 6 in the held-out one
    imwrite(tmp_path / "vol.tif", image)
    imwrite(tmp_path / "lab.tif", labels)
    cfg = dict(images=str(tmp_path / "vol.tif"), labels=str(tmp_path / "lab.tif"), val_slices="5:8")
    folder = artifact_dir(preprocess(PreprocessConfig(**cfg)))
    assert "slice(s) 1, 6 have no labelled pixel" in capsys.readouterr().out
    stacks = read_manifest(folder)["stacks"]
    # Each block becomes its runs of consecutive slices: no slice gets a neighbour that is not its own
    # (2.5-D context, 3-D crops and objects).
    assert [(s.name, s.split, s.shape[0]) for s in stacks] == [
        ("vol_z0-1", "train", 1), ("vol_z2-5", "train", 3), ("vol_z5-6", "val", 1), ("vol_z7-8", "val", 1),
        ("vol_z8-10", "train", 2)]
    np.testing.assert_array_equal(np.load(f"{folder}/vol_z2-5/image.npy"), image[2:5])
    np.testing.assert_array_equal(np.load(f"{folder}/vol_z7-8/mask.npy") > 0, labels[7:8] > 0)
    assert [s.source["unlabelled_slices_left_out"] for s in stacks[:2]] == [[1], [1]]
    kept = read_manifest(artifact_dir(preprocess(PreprocessConfig(**cfg, unlabelled="keep"))))["stacks"]
    assert [s.shape[0] for s in kept] == [5, 3, 2]


def test_stacks_whose_names_meet_get_distinct_names_within_the_limit(store, tmp_path, rng):
    """Two files of one name in two folders, a file named like another stack's run of slices, and a name
    past the 100 characters a stack's folder may have: each stack its own folder, named after its file."""
    long = "x" * 120
    files = [("a", "vol"), ("b", "vol"), ("a", "vol_z0-1"), ("a", long), ("a", "last")]
    images, labels = [], []
    for folder, stem in files:
        (tmp_path / folder).mkdir(exist_ok=True)
        image = rng.integers(0, 255, (6, 16, 16), dtype=np.uint8)
        mask = (image > 128).astype(np.uint8)
        if stem == "vol" and folder == "a":
            mask[1] = 0  # unannotated, left out: a/vol.tif becomes vol_z0-1 and vol_z2-6
        imwrite(tmp_path / folder / f"{stem}.tif", image)
        imwrite(tmp_path / folder / f"{stem}_labels.tif", mask)
        images.append(str(tmp_path / folder / f"{stem}.tif"))
        labels.append(str(tmp_path / folder / f"{stem}_labels.tif"))
    folder = artifact_dir(preprocess(PreprocessConfig(images=",".join(images), labels=",".join(labels))))
    names = [s.name for s in read_manifest(folder)["stacks"]]
    assert len(set(names)) == len(names) == 6, names
    assert names[:4] == ["vol_z0-1", "vol_z2-6", "vol", "vol_z0-1_2"]
    assert names[4] == long[:100] and names[5] == "last"
    np.testing.assert_array_equal(np.load(f"{folder}/vol_z0-1_2/image.npy"), tifffile.imread(images[2]))


def test_mostly_empty_stacks_keep_their_empty_slices():
    sparse = np.zeros((6, 8, 8), np.uint8)
    sparse[2, 3, 3] = 1  # one slice with an object: empty slices are the norm here, not missing labels
    assert unlabelled_slices(sparse) == []
    dense = np.ones((6, 8, 8), np.uint8)
    dense[4] = 0
    assert unlabelled_slices(dense) == [4]


def failed_runs(store):
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return [r for r in runs if r.info.status == "FAILED"]


def write_case(tmp_path, case, rng):
    image = rng.integers(0, 255, (4, 32, 32), dtype=np.uint8)
    imwrite(tmp_path / "img.tif", image)
    imwrite(tmp_path / "lab.tif", (image > 100).astype(np.uint8))
    if case == "missing":
        return ["--images", "nothere.tif", "--labels", "lab.tif"], "nothere.tif: file not found"
    if case == "truncated":
        data = (tmp_path / "img.tif").read_bytes()
        (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
        return ["--images", "cut.tif", "--labels", "lab.tif"], "cut.tif: not a readable TIFF"
    if case == "shape":
        imwrite(tmp_path / "lab.tif", np.ones((4, 32, 30), np.uint8))
        return ["--images", "img.tif", "--labels", "lab.tif"], "lab.tif has shape (4, 32, 30) but img.tif has (4, 32, 32)"
    if case == "rgb":
        tifffile.imwrite(tmp_path / "img.tif", np.zeros((4, 32, 32, 3), np.uint8), photometric="rgb")
        return ["--images", "img.tif", "--labels", "lab.tif"], "expected a grayscale stack"
    if case == "empty":
        (tmp_path / "img.tif").write_bytes(b"")
        return ["--images", "img.tif", "--labels", "lab.tif"], "img.tif: the file is empty"
    if case == "background":
        imwrite(tmp_path / "lab.tif", np.zeros((4, 32, 32), np.uint8))
        return ["--images", "img.tif", "--labels", "lab.tif"], "all background"
    if case == "val_slices":
        return ["--images", "img.tif", "--labels", "lab.tif", "--val_slices", "3:9"], "val_slices '3:9'"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "truncated", "shape", "rgb", "empty", "background", "val_slices"])
def test_bad_input_gives_one_line_exit_2_and_a_failed_run(store, tmp_path, rng, case):
    args, message = write_case(tmp_path, case, rng)
    proc = run_module("pipeline.preprocess", *args, cwd=tmp_path, env_uri=store)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(failed_runs(store)) == 1


def test_output_dir_never_deletes_what_preprocess_did_not_write(store, tmp_path):
    """`--output_dir` pointed at a folder of the user's used to be deleted (rmtree before the rename). Now a
    folder holding anything but a previous artifact is refused, before any work, and left as it was; a
    previous artifact is replaced whole; a path that is a file is refused."""
    tiny = ["--synthetic_stacks", "2", "--synthetic_shape", "2,32,32"]
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.docx").write_text("months of work")
    proc = run_module("pipeline.preprocess", *tiny, "--output_dir", str(thesis), cwd=tmp_path, env_uri=store)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: output_dir {thesis} is a folder that holds files of its own")
    assert [p.name for p in thesis.iterdir()] == ["chapter1.docx"] and (thesis / "chapter1.docx").read_text() == "months of work"
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")  # refused before any run

    out = tmp_path / "dataset"
    first = preprocess(PreprocessConfig(synthetic_stacks=2, synthetic_shape="2,32,32", output_dir=str(out)))
    second = preprocess(PreprocessConfig(synthetic_stacks=2, synthetic_shape="2,32,32", seed=1, output_dir=str(out)))
    assert first["manifest"]["content_hash"] != second["manifest"]["content_hash"]
    assert read_manifest(out)["content_hash"] == second["manifest"]["content_hash"]  # the previous artifact replaced
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("dataset")) == ["dataset"]  # nothing left over
    (out / "my_notes.txt").write_text("mine")  # an artifact the user has put a file into is theirs now
    with pytest.raises(InputError, match="holds files of its own"):
        preprocess(PreprocessConfig(synthetic_stacks=2, synthetic_shape="2,32,32", output_dir=str(out)))
    assert (out / "my_notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="exists and is a file"):
        preprocess(PreprocessConfig(synthetic_stacks=2, synthetic_shape="2,32,32", output_dir=str(tmp_path / "afile")))
    empty = tmp_path / "empty"
    empty.mkdir()
    preprocess(PreprocessConfig(synthetic_stacks=2, synthetic_shape="2,32,32", output_dir=str(empty)))
    assert (empty / "manifest.json").is_file()
