import numpy as np
import pytest

from emunet.core.errors import InputError
from emunet.core.objects import sizes
from emunet.inference.instances import label_instances, slice_instances
from emunet.inference.segmenter import as_stack, signature


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
    ([[1, 2], [3]], "not a rectangular array"),
    (np.ones((8, 8), bool), "input is boolean, which looks like a mask"),
])
def test_bad_inputs_are_clear_errors(data, message):
    with pytest.raises(InputError, match=message):
        as_stack(data)


def test_signature_exposes_inference_params():
    params = {p.name: p.default for p in signature().params}
    assert params == {"output": "mask", "threshold": 0.5, "tile_size": 1024, "overlap": 0.25, "batch_size": 4,
                      "tta": "none", "min_object_size": 20, "seed_threshold": 0.9, "seed_depth": 0.1, "instances": "auto", "planes": "auto",
                      "grow_over_all": "auto", "engine": "auto", "precision": "auto", "low": None,
                      "high": None}


def test_labels_follow_cells_through_slices_and_drop_specks():
    mask = np.zeros((3, 10, 10), np.float32)
    mask[0:3, 1:4, 1:4] = 1  # one cell through three slices: 9 pixels in each
    mask[1, 7:9, 7:9] = 1  # a second object: 4 pixels
    mask[2, 9, 0] = 1  # a speck: 1 pixel
    labels = label_instances(mask, min_size=2)
    assert labels.dtype == np.int32 and labels.max() == 2
    assert len(np.unique(labels[:, 2, 2])) == 1 and labels[0, 2, 2] > 0  # same id in every slice
    assert labels[2, 9, 0] == 0


def test_min_object_size_means_pixels_in_a_slice_for_labels_and_the_objects_table_alike():
    """A thin object crossing five slices with 10 pixels in each (50 voxels) is a speck in every slice:
    with min_object_size 20 the objects table drops it slice by slice, and so must output=labels (which
    once kept it, counting its 50 voxels in 3-D). A pixel touching an object only at a corner is not part
    of it (4-connected: cells across a one-pixel diagonal membrane stay apart): a speck too."""
    mask = np.zeros((5, 12, 12), np.float32)
    mask[:, 1, 1:11] = 1  # 10 pixels a slice, through 5 slices
    mask[:, 5:10, 5:10] = 1  # 25 pixels a slice: an object
    mask[:, 10, 10] = 1  # touches it diagonally only
    labels = label_instances(mask, min_size=20)
    assert labels.max() == 1
    for z in range(5):
        table = sizes(slice_instances(mask[z], min_size=20))
        assert table == sizes(labels[z]) == [25]


def test_options_default_and_unknown_output():
    from emunet.inference.params import SegmentParams

    assert SegmentParams.from_dict({"threshold": None, "tile_size": 256}).tile_size == 256
    assert SegmentParams.from_dict({"threshold": None}).threshold == 0.5
    assert SegmentParams.from_dict({"tile_size": 256.0}).tile_size == 256  # MLflow writes whole numbers so
    with pytest.raises(InputError, match="output must be one of mask, probability, labels, got 'rgb'"):
        SegmentParams.from_dict({"output": "rgb"})


@pytest.mark.parametrize("params, message", [
    ({"tta": "rot90"}, "tta must be one of none, flips, d4, got 'rot90'"),
    ({"overlap": 1.0}, "0 <= overlap < 1"),
    ({"tile_size": 0}, "tile_size >= 1"),
    ({"tile_size": "abc"}, "tile_size must be a number, got 'abc'"),
    ({"tile_size": 2.5}, "tile_size must be a finite whole number"),
    ({"threshold": 1.5}, "threshold is a probability between 0 and 1"),
    ({"min_object_size": -1}, "min_object_size >= 0"),
    ({"low": 3.0}, "pass both low and high"),
    ({"low": 5.0, "high": 5.0}, "high must be above low"),
    ({"colour": "red"}, "unknown param"),
])
def test_bad_options_are_clear_errors(params, message):
    from emunet.inference.params import SegmentParams

    with pytest.raises(InputError, match=message):
        SegmentParams.from_dict(params)


def test_tile_size_has_one_rule_everywhere_round_up_and_log(caplog):
    """The README said rounded up, the segmenter refused, the tiler rounded up: now one rule, logged."""
    import logging

    from emunet.inference.tiling import plan_tiles, tile_side

    with caplog.at_level(logging.INFO, logger="emunet.inference.tiling"):
        assert tile_side(512, 16) == 512 and not caplog.records
        assert tile_side(500, 16) == 512
    assert "tile_size 500 rounded up to 512" in caplog.text
    assert plan_tiles(2000, 2000, 500, 16).tile_h == 512
    with pytest.raises(ValueError, match="tile_size must be a whole number of pixels >= 1"):
        tile_side(0, 16)


def test_logged_models_require_only_what_inference_needs():
    from emunet.inference.segmenter import MODEL_PACKAGES, model_requirements

    names = [line.split("==")[0] for line in model_requirements()]
    assert sorted(names) == sorted(MODEL_PACKAGES)  # every one pinned in requirements.txt
    assert all("==" in line for line in model_requirements())


def test_a_coarse_scale_model_segments_slices_of_several_sizes_in_one_process():
    """`input_scale` 2 (VNC's automatic choice) up-samples bilinearly; with `reduce_retracing` the second
    slice size was traced at unknown height and width, where Keras 3.15's resize raises
    OperatorNotAllowedInGraphError: predict, the viewer and Spark failed on the second stack size."""
    from emunet.core.model import UNetSpec, build_unet
    from emunet.inference.segmenter import compiled_forward

    forward = compiled_forward(build_unet(UNetSpec(depth=2, base_filters=4, input_scale=2)))
    for shape in [(1, 32, 32, 1), (1, 48, 64, 1), (2, 64, 32, 1)]:
        assert forward(np.zeros(shape, np.float32)).shape == shape
