"""Readers of MRC (header checked, voxel size in ångström reported in nm) and HDF5 datasets (`emunet.core.io`)."""

import struct
import warnings
from pathlib import Path

import numpy as np

from emunet.core.errors import InputError
from emunet.core.io.arrays import _array_volume
from emunet.core.io.volume import Volume, _one_unit, _size, _unit, _warn


MRC_MODES = (0, 1, 2, 3, 4, 6, 12, 101)


def _check_mrc_header(path: Path) -> None:
    """Refuse what is not an MRC header before `mrcfile` reads it: in permissive mode it allocates whatever
    extended-header length a corrupt header declares (gigabytes for random bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1024)
    if len(head) == 1024:
        for order in "<>":  # the machine stamp may be wrong: accept either byte order that makes sense
            mode, nsymbt = struct.unpack_from(order + "i", head, 12)[0], struct.unpack_from(order + "i", head, 92)[0]
            if mode in MRC_MODES and 0 <= nsymbt <= size - 1024:
                return
    raise InputError(f"{path}: not a readable MRC file, it may be truncated or corrupt (" +
                     ("its header declares no known data mode, or more extended header than the file holds)"
                      if len(head) == 1024 else f"{size} bytes, less than the 1024-byte header)"))


def _open_mrc(path: Path) -> Volume:
    import mrcfile

    _check_mrc_header(path)
    # Permissive: files from older tools often lack the map ID or machine stamp yet hold good data.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        except Exception as exc:
            raise InputError(f"{path}: not a readable MRC file, it may be truncated or corrupt ({exc})") from None
    if mrc.data is None:
        mrc.close()
        reason = "; ".join(str(w.message) for w in caught[:2]) or "no data block"
        raise InputError(f"{path}: not a readable MRC file, it may be truncated or corrupt ({reason})")
    size = mrc.voxel_size  # Å; 0 means "not set": unknown, not guessed
    axes = {a: (_size(float(getattr(size, a)) / 10, path, f"the MRC header's {a} voxel size")
                if float(getattr(size, a)) != 0 else None, "nm") for a in "zyx"}
    calibration = _one_unit(path, axes)
    try:
        return _array_volume(path, mrc.data, copy=True, close=mrc.close, **calibration)
    except BaseException:
        mrc.close()
        raise


def _h5_datasets(group) -> list[str]:
    import h5py

    found = []
    prefix = group.name.rstrip("/")
    group.visititems(lambda name, obj: found.append(f"{prefix}/{name}") if isinstance(obj, h5py.Dataset) else None)
    return found


def _h5_calibration(dataset, names: list[str] | None, path) -> dict:
    """(z, y, x) from `element_size_um` (Fiji's HDF5 plugin, ilastik) or `resolution` (CREMI and others); an
    axis the attribute does not cover (a 2-D image's z) is unknown."""
    for key, unit in (("element_size_um", "µm"), ("resolution", None)):
        if key in dataset.attrs:
            try:
                sizes = [float(v) for v in np.ravel(dataset.attrs[key])]
            except (TypeError, ValueError):
                _warn(f"{path}: the {key} attribute {dataset.attrs[key]!r} is not a list of numbers; read as "
                      f"uncalibrated")
                continue
            spatial = [n for n in (names or "zyx"[3 - min(len(sizes), 3):]) if n in ("z", "y", "x")]
            if names and len(sizes) == len(names):
                sizes = [s for s, n in zip(sizes, names) if n in ("z", "y", "x")]
            if len(sizes) != len(spatial) or "x" not in spatial:
                _warn(f"{path}: the {key} attribute has {len(sizes)} values for the axes {''.join(spatial)}; "
                      f"read as uncalibrated")
                continue
            if unit is None:
                unit = dataset.attrs.get("unit", dataset.attrs.get("units", ""))
                unit = _unit(unit.decode() if isinstance(unit, bytes) else unit)
            return _one_unit(path, {a: (_size(v, path, f"the {key} attribute's {a}"), unit)
                                    for a, v in zip(spatial, sizes)})
    return {}


def _open_hdf5(file: Path, inner: str | None, spec: str) -> Volume:
    import h5py

    try:
        h5 = h5py.File(file, "r")
    except Exception as exc:
        raise InputError(f"{file}: not a readable HDF5 file, it may be truncated or corrupt ({exc})") from None
    try:
        inner = (inner or "").strip()
        node = h5.get(inner) if inner not in ("", "/") else h5
        if not isinstance(node, h5py.Dataset):
            datasets = _h5_datasets(node if isinstance(node, h5py.Group) else h5)
            if node is h5 and len(datasets) == 1:
                node = h5[datasets[0]]  # one dataset in the file: no need to name it
            else:
                listed = ", ".join(datasets[:8]) + (f", ... ({len(datasets)} in all)" if len(datasets) > 8 else "")
                where = f"no dataset {inner!r}" if inner not in ("", "/") else "no dataset path was given"
                raise InputError(f"{file}: {where}; name one as {file.name}:/path/to/dataset, "
                                 + (f"the file holds {listed}" if datasets else "the file holds no dataset"))
        names = None
        if "axistags" in node.attrs:  # ilastik: JSON {"axes": [{"key": "z"}, ...]}
            try:
                import json
                names = [a["key"] for a in json.loads(node.attrs["axistags"])["axes"]]
            except (KeyError, TypeError, ValueError):
                names = None
        return _array_volume(spec, node, names, close=h5.close, **_h5_calibration(node, names, spec))
    except BaseException:
        h5.close()
        raise
