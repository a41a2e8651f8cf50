import numpy as np
import pytest

from pipeline.errors import InputError
from serving.segmenter import as_stack, label_objects, signature


def test_2d_and_3d_inputs_become_stacks():
    assert as_stack(np.zeros((5, 6)))[0].shape == (1, 5, 6) and as_stack(np.zeros((5, 6)))[1] is True
    stack, was_2d = as_stack(np.zeros((2, 5, 6), np.uint16))
    assert stack.shape == (2, 5, 6) and not was_2d


@pytest.mark.parametrize("data, message", [
    (np.zeros((0, 4)), "empty"),
    (np.zeros((2, 3, 4, 5)), "expected an \\(H, W\\) image or a \\(Z, H, W\\) stack"),
    (np.zeros((64, 64, 3), np.uint8), "looks like a colour"),
    (np.full((4, 4), np.nan), "no finite values"),
    (np.array([["a", "b"]]), "numeric"),
    (np.ones((8, 8), bool), "input is boolean, which looks like a mask"),
])
def test_bad_inputs_are_clear_errors(data, message):
    with pytest.raises(InputError, match=message):
        as_stack(data)


def test_signature_exposes_inference_params():
    params = {p.name: p.default for p in signature().params}
    assert params == {"output": "mask", "threshold": 0.5, "tile_size": 1024, "overlap": 0.25, "batch_size": 4,
                      "tta": "none", "min_object_size": 20}


def test_label_objects_follows_cells_through_slices_and_drops_specks():
    mask = np.zeros((3, 10, 10), np.uint8)
    mask[0:3, 1:4, 1:4] = 1  # one cell through three slices: 27 voxels
    mask[1, 7:9, 7:9] = 1  # a second object: 4 voxels
    mask[2, 9, 0] = 1  # a speck: 1 voxel
    labels = label_objects(mask, min_size=2)
    assert labels.dtype == np.int32 and labels.max() == 2
    assert len(np.unique(labels[:, 2, 2])) == 1 and labels[0, 2, 2] > 0  # same id in every slice
    assert labels[2, 9, 0] == 0


def test_options_default_and_unknown_output():
    from serving.segmenter import resolve_options

    assert resolve_options({"threshold": None, "tile_size": 256})["tile_size"] == 256
    assert resolve_options({"threshold": None})["threshold"] == 0.5
    with pytest.raises(InputError, match="output must be one of mask, probability, labels, got 'rgb'"):
        resolve_options({"output": "rgb"})


@pytest.mark.parametrize("params, message", [
    ({"tta": "rot90"}, "tta must be one of none, flips, d4, got 'rot90'"),
    ({"overlap": 1.0}, "0 <= overlap < 1"),
    ({"tile_size": 0}, "tile_size >= 1"),
])
def test_bad_options_are_clear_errors(params, message):
    from serving.segmenter import resolve_options

    with pytest.raises(InputError, match=message):
        resolve_options(params)


def test_tile_size_must_divide_by_the_network_downsampling():
    from serving.segmenter import check_tile_size

    check_tile_size(512, 16)
    with pytest.raises(InputError, match="tile_size 500 is not a multiple of 16 .*; use 512 or 496"):
        check_tile_size(500, 16)


def test_logged_models_require_only_what_inference_needs():
    from serving.segmenter import MODEL_PACKAGES, model_requirements

    names = [line.split("==")[0] for line in model_requirements()]
    assert sorted(names) == sorted(MODEL_PACKAGES)  # every one pinned in requirements.txt
    assert all("==" in line for line in model_requirements())
