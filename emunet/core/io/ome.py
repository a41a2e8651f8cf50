"""Reader of Zarr folders: OME-Zarr images (NGFF 0.1-0.5, bioformats2raw), their multiscales, scale and
units checked field by field, and plain Zarr arrays (`emunet.core.io`)."""

import math
from pathlib import Path

import numpy as np

from emunet.core.errors import InputError
from emunet.core.io.arrays import SPARSE_ATTR, _array_volume
from emunet.core.io.volume import Volume, _one_unit, _unit, _warn


ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


# Written by `emunet.core.omezarr` in an image group's attributes: axes whose scale is a placeholder (1.0,
# NGFF needs one per axis) because the size was unknown.
UNKNOWN_AXES_ATTR = "em-unet.unknown_axes"


def _attrs_file(path: Path, node) -> Path:
    """The file holding a Zarr node's attributes, for messages."""
    inner = Path(path) / node.path if node.path else Path(path)
    return inner / ("zarr.json" if node.metadata.zarr_format == 3 else ".zattrs")


def _bad_field(where: Path, name: str, found, expected: str) -> InputError:
    shown = repr(found)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return InputError(f"{where}: OME-Zarr metadata field {name} is {shown} but should be {expected}; correct that "
                      f"field or write the image again (e.g. with ome-zarr-py)")


def _number_list(where, name: str, values, n: int, positive: bool) -> list[float]:
    if not isinstance(values, list) or len(values) != n:
        raise _bad_field(where, name, values, f"a list of {n} numbers, one per axis")
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise _bad_field(where, f"{name}[{j}]", v, "a positive finite number" if positive else "a finite number")
    return [float(v) for v in values]


def _ome_scale(where, name: str, transforms, n: int) -> np.ndarray:
    """The product of the `scale` transformations of a `coordinateTransformations` list (ones when absent)."""
    scale = np.ones(n)
    if transforms is None:
        return scale
    if not isinstance(transforms, list):
        raise _bad_field(where, name, transforms, "a list of transformations")
    for i, t in enumerate(transforms):
        field_name = f"{name}[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("type"), str):
            raise _bad_field(where, field_name, t, 'an object with a "type" (scale, translation)')
        if t["type"] == "scale":
            if "scale" not in t:
                raise _bad_field(where, f"{field_name}.scale", None, "the scale values inline (a scale kept in a "
                                 "file named by 'path' is not read)")
            scale = scale * np.asarray(_number_list(where, f"{field_name}.scale", t["scale"], n, True))
        elif t["type"] == "translation":
            if "translation" not in t:
                raise _bad_field(where, f"{field_name}.translation", None, "the translation values inline")
            _number_list(where, f"{field_name}.translation", t["translation"], n, False)
    return scale


def _ome_multiscale(where: Path, attrs: dict) -> dict | None:
    """The first image of an OME-Zarr group's attributes, checked field by field (NGFF 0.1-0.5); None when
    the group has no `multiscales` (not an image)."""
    root = attrs
    if "ome" in attrs:
        if not isinstance(attrs["ome"], dict):
            raise _bad_field(where, "ome", attrs["ome"], "an object holding multiscales")
        root = attrs["ome"]
    if "multiscales" not in root and root is not attrs and "multiscales" in attrs:
        root = attrs
    if root.get("multiscales") is None:
        return None
    multiscales = root["multiscales"]
    if not isinstance(multiscales, list) or not multiscales:
        raise _bad_field(where, "multiscales", multiscales, "a non-empty list of images")
    multiscale = multiscales[0]
    if not isinstance(multiscale, dict):
        raise _bad_field(where, "multiscales[0]", multiscale, "an object with datasets and axes")
    datasets = multiscale.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise _bad_field(where, "multiscales[0].datasets", datasets, "a non-empty list of levels")
    for i, dataset in enumerate(datasets):
        if not isinstance(dataset, dict):
            raise _bad_field(where, f"multiscales[0].datasets[{i}]", dataset, 'an object with a "path"')
        if not isinstance(dataset.get("path"), str) or not dataset["path"].strip("/"):
            raise _bad_field(where, f"multiscales[0].datasets[{i}].path", dataset.get("path"),
                             "the name of the level's array")
    axes = multiscale.get("axes")
    if axes is not None:
        if not isinstance(axes, list) or not axes:
            raise _bad_field(where, "multiscales[0].axes", axes, "a list of axes")
        for i, axis in enumerate(axes):
            name = axis.get("name") if isinstance(axis, dict) else axis
            if not isinstance(name, str) or not name:
                raise _bad_field(where, f"multiscales[0].axes[{i}].name", name, 'an axis name ("z", "y", "x", "c")')
            if isinstance(axis, dict) and axis.get("unit") is not None and not isinstance(axis["unit"], str):
                raise _bad_field(where, f"multiscales[0].axes[{i}].unit", axis["unit"], 'a unit name ("nanometer")')
    return multiscale


def _ome_calibration(where, multiscale: dict, level: int, names: list[str], units: list, unknown) -> dict:
    """`voxel_size` (z, y, x) and `unit` of one level: its scale times the image's. An axis without a unit
    while another has one, or named in `unknown` (our writer's placeholders), is unknown; with no unit at
    all, scales that are all 1 (the writers' default) say nothing."""
    n = len(names)
    scale = _ome_scale(where, f"multiscales[0].datasets[{level}].coordinateTransformations",
                       multiscale["datasets"][level].get("coordinateTransformations"), n)
    scale = scale * _ome_scale(where, "multiscales[0].coordinateTransformations",
                               multiscale.get("coordinateTransformations"), n)
    axis = {str(a).lower(): (float(s), _unit(u)) for a, s, u in zip(names, scale, units)}
    spatial = {a: axis[a] for a in "zyx" if a in axis and a not in (unknown or ())}
    if not any(u for _, u in spatial.values()):
        if all(s == 1 for s, _ in spatial.values()):
            return {}
        return {"voxel_size": tuple(spatial[a][0] if a in spatial else None for a in "zyx"), "unit": None}
    return _one_unit(where, {a: v for a, v in spatial.items() if v[1]})


def _open_ome_image(path: Path, group, multiscale: dict, level) -> tuple:
    where = _attrs_file(path, group)
    datasets = multiscale["datasets"]
    level = 0 if level is None else level
    if not 0 <= level < len(datasets):
        raise InputError(f"{path}: level {level} does not exist; the image has levels 0-{len(datasets) - 1}")
    name = datasets[level]["path"].strip("/")
    try:
        array = group[name]
    except Exception:
        array = None
    if array is None or not hasattr(array, "shape"):
        raise InputError(f"{path}: the multiscales metadata names level {level} as {name!r} "
                         f"but the group holds no such array")
    axes = multiscale.get("axes") or list("tczyx"[5 - array.ndim:])  # NGFF 0.1/0.2: always tczyx
    if len(axes) != array.ndim:
        raise _bad_field(where, "multiscales[0].axes", axes, f"{array.ndim} axes, one per dimension of level "
                         f"{level}'s array {tuple(array.shape)}")
    names = [a["name"] if isinstance(a, dict) else a for a in axes]
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
    for i, dataset in enumerate(datasets):  # every level's, not only the one read: the metadata is one document
        _ome_scale(where, f"multiscales[0].datasets[{i}].coordinateTransformations",
                   dataset.get("coordinateTransformations"), len(names))
    unknown = dict(group.attrs).get(UNKNOWN_AXES_ATTR)
    return array, names, _ome_calibration(where, multiscale, level, names, units, unknown)


def _group_multiscale(path: Path, group) -> dict | None:
    attrs = dict(group.attrs)
    return _ome_multiscale(_attrs_file(path, group), attrs)


def _open_zarr(path: Path, level) -> Volume:
    import zarr

    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as exc:
        raise InputError(f"{path}: not a readable Zarr array or group ({type(exc).__name__}: {exc})") from None
    names, calibration, sparse = None, {}, False
    if isinstance(node, zarr.Group):
        multiscale = _group_multiscale(path, node)
        attrs = dict(node.attrs)
        if multiscale is None and "bioformats2raw.layout" in (attrs.get("ome") if isinstance(attrs.get("ome"), dict)
                                                              else attrs) and "0" in node.group_keys():
            node = node["0"]  # bioformats2raw: the first image is the group "0"
            multiscale = _group_multiscale(path, node)
        if multiscale is None:
            arrays = sorted(node.array_keys())
            listed = ", ".join(f"{path}/{k}" for k in arrays[:5]) + (", ..." if len(arrays) > 5 else "")
            raise InputError(f"{path}: a Zarr group without OME-Zarr 'multiscales' metadata is not an image; "
                             + (f"open one of its arrays: {listed}" if arrays else "it holds no array"))
        sparse = bool(dict(node.attrs).get(SPARSE_ATTR))
        node, names, calibration = _open_ome_image(path, node, multiscale, level)
    elif level is not None:
        raise InputError(f"{path}: level {level} asked for, but this is a plain Zarr array, not a multiscale image")
    elif any((path.parent / m).exists() for m in ZARR_MARKERS):  # a level inside an OME-Zarr image
        try:
            parent = zarr.open_group(store=str(path.parent), mode="r")
        except Exception:
            parent = None  # a folder that merely sits beside Zarr files
        if parent is not None:
            try:
                multiscale = _group_multiscale(path.parent, parent)
                for i, dataset in enumerate((multiscale or {}).get("datasets") or ()):
                    if dataset["path"].strip("/") == path.name:
                        _, names, calibration = _open_ome_image(path.parent, parent, multiscale, i)
                        sparse = bool(dict(parent.attrs).get(SPARSE_ATTR))
            except InputError as exc:  # the array itself is fine: read it, but say why it is uncalibrated
                _warn(f"{exc}; {path} is read as a plain array, uncalibrated")
                names, calibration = None, {}
    return _array_volume(path, node, names, sparse=sparse, **calibration)
