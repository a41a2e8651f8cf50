"""One way to open a volume: `open_volume(path)` gives a lazy `(Z, Y, X)` grayscale array read slice by
slice (or block by block), with its voxel size where the file records one. Every mistake comes out as an
`InputError` that names the file.

Formats, and how a path names them:
- multi-page TIFF and OME-TIFF (ImageJ and OME calibration), a single 2-D TIFF or PNG;
- `.npy` (memory-mapped), and folders of 2-D TIFF/PNG slices (natural sort order);
- MRC (`.mrc`, `.rec`, `.st`, `.map`, `.mrcs`), memory-mapped; a 2-D MRC is one slice. MRC headers give the
  voxel size in ångström; it is reported in nm (divided by 10) so that tomograms and volume-EM stacks
  share a unit. A header voxel size of 0 means "not set" (`voxel_size` None);
- a Zarr folder (`*.zarr`, `*.ome.zarr`, or any folder holding `zarr.json` / `.zarray` / `.zgroup`): an
  OME-Zarr image (NGFF 0.1-0.5, also the bioformats2raw layout), read at level 0 of its multiscales, its
  scale from `coordinateTransformations` (the level's times the image's) and its unit from `axes`; a
  `c` or `t` axis of size 1 is dropped, more than one channel or time point is refused. A plain Zarr
  array (`image.ome.zarr/1` included) is read as `(Z, Y, X)` or `(Y, X)` after dropping leading size-1 axes;
- HDF5 as `file.h5:/path/to/dataset` (also `.hdf5`, `.hdf`); the dataset may be left out when the file
  holds exactly one. Voxel size from the dataset's `element_size_um` (Fiji, ilastik; unit µm) or
  `resolution` (unit from a `unit` attribute, else None), ilastik `axistags` name the axes.

Voxel size: `volume.voxel_size` is `(z, y, x)` in `volume.unit`, each axis None where the file does not give
it (a size the file does not give is unknown, never guessed: serial sections of 50 nm cut from 4 nm pixels
must not become 4 nm cubes), and None as a whole when no axis is known. Axes given in different units are
converted to x's (`NM_PER_UNIT`). Where each format keeps it: ImageJ TIFF `unit` + X/YResolution (+ `spacing`,
`yunit`, `zunit`; ImageJ omits `spacing` when it is 1 or unset, so such a stack has z unknown); OME-TIFF
`PhysicalSize{X,Y,Z}` and their `...Unit` (µm when absent, as the OME schema says); MRC header (0 = unset);
OME-Zarr scale and axis units (an axis without a unit while others have one is unknown, and so is every
axis when none has a unit and every scale is 1: the writers' defaults); HDF5 as above. A calibration that
is there but cannot be used (zero, negative, not a number) is a `CalibrationWarning` naming the file and
that axis is unknown; in OME-Zarr metadata it is an `InputError` (the structure is checked field by field).

Missing chunks: a Zarr array whose chunk files are missing (an interrupted copy) would read as holes of the
fill value. `open_volume` lists the array's folder once and refuses when any chunk the read will touch (the
whole array, or those meeting `region`) is absent, giving the count and the first keys; with
`allow_missing_chunks=True` they are read as the fill value after one warning. An array (or its OME-Zarr
image group) whose attributes hold `"sparse_chunks": true` was written sparse on purpose (absent chunks are
the fill value, as zarr-python writes by default); `emunet.core.omezarr` sets it on every result it writes.

Options, keyword arguments of `open_volume` (and `read_volume`), the same for every format (`ReadOptions`
holds them, for entry points to pass on unchanged: `open_volume(path, **asdict(options))`):
- `level=1`: another level of an OME-Zarr multiscale image (0 is full resolution); an error elsewhere.
- `region="z0:z1,y0:y1,x0:x1"`: a lazy sub-block; only that block is read. Python slice bounds (a negative
  one counts from the end, a single number is one index), any part may be empty ("10:20,,", ",0:512").
- `allow_missing_chunks=True`: read absent Zarr chunks as the fill value (one warning) instead of refusing.
- `voxel_size="50,4,4"` (z,y,x; a part may be empty, "50,," gives z only) and `unit="nm"`: what the file
  lacks. A value that contradicts the file's is used, with a warning; `unit` alone converts the file's.

    with open_volume("tomo.tif") as volume:
        volume.shape, volume.dtype, volume.voxel_size, volume.unit   # (30, 512, 512), uint8, (50.0, 4.0, 4.0), "nm"
        volume[12]          # (Y, X) slice, read now
        volume[0:4]         # (4, Y, X)
    with open_volume("cells.ome.zarr", level=1, region="10:20,,") as volume: ...
    with open_volume("sample.h5:/volumes/raw") as volume: ...

The package, read top-down: `volume` (the `Volume` every reader returns, dtypes, voxel sizes and units),
one module per family of formats (`tiff`: TIFF, `.npy`, PNG, folders of slices; `arrays`: chunked arrays
and their missing chunks; `mrc_hdf5`; `ome`: Zarr and OME-Zarr), `opener` (`open_volume`, its options)
and `label_files` (labels checked against their image). What other modules use is named here.
"""

from emunet.core.io.arrays import SPARSE_ATTR
from emunet.core.io.label_files import (VOXEL_TOLERANCE, check_finite_labels, check_labels, check_same_shape,
                                        nonfinite, read_label_slices, read_mask, voxel_mismatch)
from emunet.core.io.ome import UNKNOWN_AXES_ATTR, ZARR_MARKERS
from emunet.core.io.opener import (HDF5_SPEC, MRC_SUFFIXES, STACK_SUFFIXES, ReadOptions, check_chunks, crop_volume,
                                   list_stack_paths, open_volume, parse_region, parse_unit, parse_voxel_size,
                                   read_options, read_volume, stack_exists, with_calibration)
from emunet.core.io.tiff import SLICE_SUFFIXES, natural_key
from emunet.core.io.volume import (ACCEPTED_KINDS, NM_PER_UNIT, UNITS, CalibrationWarning, Volume, available_memory,
                                   check_fits, describe_voxel, read_dtype)

__all__ = ["ACCEPTED_KINDS", "HDF5_SPEC", "MRC_SUFFIXES", "NM_PER_UNIT", "SLICE_SUFFIXES", "SPARSE_ATTR",
           "STACK_SUFFIXES", "UNITS", "UNKNOWN_AXES_ATTR", "VOXEL_TOLERANCE", "ZARR_MARKERS", "CalibrationWarning",
           "ReadOptions", "Volume", "available_memory", "check_chunks", "check_finite_labels", "check_fits",
           "check_labels", "check_same_shape", "crop_volume", "describe_voxel", "list_stack_paths", "natural_key",
           "nonfinite", "open_volume", "parse_region", "parse_unit", "parse_voxel_size", "read_dtype",
           "read_label_slices", "read_mask", "read_options", "read_volume", "stack_exists", "voxel_mismatch",
           "with_calibration"]
