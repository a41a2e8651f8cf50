"""The viewer's planes through a point (`viewer/planes.py`) on arrays small enough to check by hand."""

import numpy as np
import pytest

from viewer import pictures, planes

# A (2, 3, 4) volume whose value names its voxel: 100 z + 10 y + x.
VOLUME = np.array([[[100 * z + 10 * y + x for x in range(4)] for y in range(3)] for z in range(2)])


def test_cuts_through_a_point_hold_the_other_coordinate_fixed():
    point = (1, 2, 3)  # z, y, x
    assert planes.cut(VOLUME, "xy", point).tolist() == [[100, 101, 102, 103], [110, 111, 112, 113],
                                                        [120, 121, 122, 123]]
    assert planes.cut(VOLUME, "xz", point).tolist() == [[20, 21, 22, 23], [120, 121, 122, 123]]  # rows z, columns x
    assert planes.cut(VOLUME, "yz", point).tolist() == [[3, 13, 23], [103, 113, 123]]  # rows z, columns y
    with pytest.raises(ValueError, match="unknown plane 'zz'"):
        planes.cut(VOLUME, "zz", point)


def test_the_point_is_at_its_row_and_column_in_every_plane():
    point = (1, 2, 3)
    for plane in planes.PLANES:
        row, column = planes.mark(plane, point)
        assert planes.cut(VOLUME, plane, point)[row, column] == 123  # the voxel at (1, 2, 3)


def test_z_stretch_is_the_slice_spacing_over_the_pixel_size_and_unknown_stays_unknown():
    assert planes.z_stretch((2.0, 0.5, 0.25), "xz") == 8.0  # z / x
    assert planes.z_stretch((2.0, 0.5, 0.25), "yz") == 4.0  # z / y
    assert planes.z_stretch((2.0, 0.5, 0.25), "xy") == 1.0
    assert planes.z_stretch(None, "xz") is None and planes.z_stretch((0, 1, 1), "yz") is None
    assert planes.z_stretch((None, 0.5, 0.5), "xz") is None  # an ImageJ stack without slice spacing
    assert planes.z_stretch((2.0, None, 0.5), "xz") == 4.0 and planes.z_stretch((2.0, None, 0.5), "yz") is None
    assert planes.stretch_note((None, 0.5, 0.5)).startswith("Voxel size unknown")
    assert planes.scales(None) == (1.0, 1.0) and planes.scales(3.0) == (3.0, 1.0)
    assert planes.scales(0.5) == (1.0, 2.0)  # thinner slices than pixels: widen, never drop a slice


def test_resample_repeats_each_pixel_into_a_band():
    row = np.array([[0, 1, 2]])
    assert planes.resample(row, (1, 6)).tolist() == [[0, 0, 1, 1, 2, 2]]
    assert planes.resample(row, (2, 3)).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert planes.resample(np.array([[0], [1]]), (5, 1)).ravel().tolist() == [0, 0, 1, 1, 1]  # x2.5 in z
    assert planes.band_centre(1, 3, 6) == 3 and planes.band_centre(0, 2, 5) == 1 and planes.band_centre(1, 2, 5) == 3


def test_crosshair_is_a_thin_dashed_line_through_the_point():
    rgb = np.full((6, 6, 3), 100, np.uint8)
    out = planes.crosshair(rgb, 2, 3, dash=2)
    assert out[..., 0].tolist() == [
        [100, 100, 100, 255, 100, 100],
        [100, 100, 100, 255, 100, 100],
        [255, 255, 0, 0, 255, 255],
        [100, 100, 100, 0, 100, 100],
        [100, 100, 100, 255, 100, 100],
        [100, 100, 100, 255, 100, 100]]
    assert (out[..., 0] == out[..., 2]).all() and (rgb == 100).all()  # gray dashes; the input is untouched


def test_display_stretches_z_enlarges_and_crosses_at_the_point():
    rgb = np.full((2, 3, 3), 100, np.uint8)  # an xz plane: 2 slices, 3 columns
    shown = planes.display(rgb, "xz", (1, 0, 2), stretch=2.0, factor=2)
    assert shown.shape == (8, 6, 3)  # z x2 stretch x2 enlargement, x x2
    assert (shown[6, :, 0] != 100).all() and (shown[:, 5, 0] != 100).all()  # row of z=1, column of x=2
    assert (np.delete(np.delete(shown[..., 0], 6, 0), 5, 1) == 100).all()  # and nothing else
    assert planes.display(rgb, "xz", (0, 0, 0), stretch=None).shape == (2, 3, 3)  # unknown: as it is
    assert planes.display(rgb, "xy", (0, 0, 0), stretch=None, factor=3).shape == (6, 9, 3)


def test_plane_panels_and_one_colour_per_object_in_every_plane():
    ids = np.zeros((2, 3, 4), np.int32)
    ids[:, 1, 1:3] = 7  # one object through both slices
    ids[1, 0, 3] = 2
    mask = ids > 0
    mask[0, 2, 0] = True  # a speck: foreground in no object
    point = (1, 1, 2)
    cuts = {p: planes.plane_panels(planes.cut(VOLUME / 200, p, point), None, planes.cut(mask, p, point),
                                   planes.cut(ids, p, point)) for p in planes.PLANES}
    assert list(cuts["xz"]) == ["Image", "Prediction", "Objects"]
    assert cuts["xz"]["Objects"].shape == (2, 4, 3) and cuts["yz"]["Objects"].shape == (2, 3, 3)
    colour = cuts["xy"]["Objects"][1, 1].tolist()
    assert colour != [0, 0, 0] and colour != list(pictures.SPECK)
    assert cuts["xz"]["Objects"][0, 1].tolist() == colour == cuts["yz"]["Objects"][0, 1].tolist()
    assert cuts["xy"]["Objects"][0, 3].tolist() not in (colour, [0, 0, 0])  # another object, another colour
    assert planes.cut(pictures.objects_rgb(ids, mask), "xy", (0, 0, 0))[2, 0].tolist() == list(pictures.SPECK)
    with_truth = planes.plane_panels(np.zeros((2, 2)), np.eye(2), np.zeros((2, 2), bool), np.zeros((2, 2), int))
    assert list(with_truth) == ["Image", "Ground truth", "Prediction", "Objects"]
    assert with_truth["Ground truth"][:, :, 0].tolist() == [[255, 0], [0, 255]]


def test_large_ids_are_coloured_without_a_palette_of_every_id():
    ids = np.array([[0, 3_000_000_000]], np.int64)  # a palette 0..max would need gigabytes
    rgb = pictures.objects_rgb(ids)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() != [0, 0, 0]


def test_captions_name_the_fixed_coordinate_and_the_axes():
    assert planes.caption("xy", (1, 2, 3), (2, 3, 4)) == "xy at z = 1 · y 0–2 down, x 0–3 across"
    assert planes.caption("xz", (1, 2, 3), (2, 3, 4)) == "xz at y = 2 · z 0–1 down, x 0–3 across"
    assert planes.caption("yz", (1, 2, 3), (2, 3, 4)) == "yz at x = 3 · z 0–1 down, y 0–2 across"
    assert "×4 in z" in planes.stretch_note((2.0, 0.5, 0.5))
    assert planes.stretch_note(None).startswith("Voxel size unknown")
    assert planes.stretch_note((1.0, 1.0, 1.0)).startswith("Isotropic")


def test_object_ids_are_linked_through_the_slices():
    prob = np.zeros((3, 16, 16), np.float32)
    prob[:, 2:8, 2:8] = 0.95  # a column through all three slices (36 pixels a slice)
    prob[1, 9:15, 9:15] = 0.95  # a blob in the middle slice only
    prob[2, 12:14, 12:14] = 0.95  # a speck: under the minimum object size, in no object
    ids = planes.object_ids(prob, 0.5)
    assert ids.shape == prob.shape and ids.dtype == np.int32
    column = {int(ids[z, 4, 4]) for z in range(3)}
    assert len(column) == 1 and column != {0}
    assert ids[1, 11, 11] not in (0, *column) and (ids[[0, 2], 9:15, 9:15] == 0).all()
    assert planes.object_ids(prob, 0.99).max() == 0  # above every probability: nothing


def test_near_isotropic_stacks_get_solid_3d_objects_and_serial_sections_linked_slices():
    """Two blobs in slice 0 that join in slices 1 and 2 (a Y): one solid object in 3-D; slice by slice,
    the join continues one blob and the other ends, so two ids."""
    prob = np.zeros((3, 20, 20), np.float32)
    prob[0, 2:8, 2:8] = prob[0, 2:8, 11:17] = 0.95
    prob[1:, 2:8, 2:17] = 0.95
    for voxel_size, count in ((None, 2), ((4.0, 1.0, 1.0), 2), ((1.0, 1.0, 1.0), 1)):
        ids = planes.object_ids(prob, 0.5, voxel_size)
        assert len(np.unique(ids[ids > 0])) == count, voxel_size
        assert ((ids > 0) == (prob >= 0.5)).all()
    assert len(np.unique(planes.object_ids(prob, 0.5, (1.0, 1.0, 1.0), instances="2d"))) == 3  # 0 and two ids


def test_scores_3d_are_the_summary_keys_ending_in_3d():
    summary = {"dice": 0.9, "object_f1": 0.8, "vi_split_3d": 0.25, "object_f1_3d": 0.5, "ap50_3d": 0.4,
               "new_score_3d": 1}
    assert planes.scores_3d(summary) == {"object_f1_3d": ("Object F1", 0.5), "ap50_3d": ("AP50", 0.4),
                                         "vi_split_3d": ("VI split", 0.25), "new_score_3d": ("New score", 1.0)}
    assert planes.scores_3d({"dice": 0.9}) == {}
