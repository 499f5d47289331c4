"""DICOM → `Volume`: find the series in a file or folder, sort their slices in space, decode.

Reading happens in two passes. The header pass parses every file up to its pixel data (no pixel
bytes are read), groups images by SeriesInstanceUID and notes where each file's pixel data
starts. The pixel pass decodes the chosen series with a thread pool, each frame written
straight into one preallocated float32 array with the modality LUT applied in place, so the
peak memory stays close to the size of the volume itself.

Geometry follows the DICOM definitions (PS3.3 C.7.6.2): ImageOrientationPatient holds the
direction of increasing column index i and of increasing row index j; PixelSpacing is
(row spacing = step along j, column spacing = step along i). Slices are ordered by their
ImagePositionPatient projected on the slice normal (row cosine × column cosine), never by file
name or InstanceNumber, and the slice step k comes from those positions, never from
SliceThickness.

This package's modules, in the order a read goes through them:

    series.py      find_series, read_dicom, read_series: the two passes, end to end
    header.py      the header pass over one file, its declared sizes checked against its bytes
    attributes.py  header values read leniently (absent, empty or garbled: None)
    records.py     _Source (one file's pixel data), _Frame (one 2D image), SeriesInfo, errors
    geometry.py    image planes: ordering, gaps, tilt, the (i, j, k) → LPS affine
    units.py       modality LUT, units by modality, PET SUV
    decode.py      the decode pool: numpy for native pixel data, pydicom's decoders otherwise

Names with a leading underscore are private to the package; the public ones are re-exported
here.
"""

from medfound.io.dicom.decode import LUMA, MAX_TILES
from medfound.io.dicom.geometry import (
    COSINE_TOL,
    DUPLICATE_MM,
    GAP_ABS_MM,
    GAP_REL_TOL,
    SPACING_REL_TOL,
    TILT_REL_TOL,
)
from medfound.io.dicom.records import DicomReadError, MultipleSeriesError, SeriesInfo
from medfound.io.dicom.series import find_series, read_dicom, read_series

__all__ = [
    "COSINE_TOL",
    "DUPLICATE_MM",
    "GAP_ABS_MM",
    "GAP_REL_TOL",
    "LUMA",
    "MAX_TILES",
    "SPACING_REL_TOL",
    "TILT_REL_TOL",
    "DicomReadError",
    "MultipleSeriesError",
    "SeriesInfo",
    "find_series",
    "read_dicom",
    "read_series",
]
