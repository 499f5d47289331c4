"""What the header pass records: one file's pixel data (`_Source`), one 2D image placed in
space (`_Frame`), one image series (`SeriesInfo`), and the errors reading raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from medfound.errors import MedfoundError


@dataclass
class _Source:
    """One DICOM file that holds pixel data, and where that data starts."""

    path: str
    transfer_syntax: UID
    rows: int
    cols: int
    frames: int
    samples: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    signed: bool
    keyword: str  # PixelData, FloatPixelData or DoubleFloatPixelData
    offset: int | None  # byte offset of the pixel data value; None: only pydicom can find it
    length: int  # value length from the element header (_UNDEFINED if encapsulated)
    file_size: int
    options: dict[str, Any]  # pydicom decoding options (rows, columns, bits, ...)
    instance: int  # InstanceNumber, only to order images that have no position
    problem: str | None = None  # why the file cannot be read, if it cannot
    problem_kind: str = "bad_header"  # DicomReadError.kind of that problem
    problem_hint: str = ("fix or remove this file; its header does not describe its pixel "
                         "data")

    def refuse(self, problem: str, kind: str = "bad_header", hint: str | None = None) -> None:
        """Record the first reason this file cannot be read (read_series raises it)."""
        if self.problem is None:
            self.problem, self.problem_kind = problem, kind
            if hint:
                self.problem_hint = hint


@dataclass
class _Frame:
    """One 2D image to place in the volume, with its geometry in LPS mm."""

    source: _Source
    index: int  # frame number inside the file
    position: np.ndarray | None  # ImagePositionPatient of its first pixel
    orientation: np.ndarray | None  # ImageOrientationPatient (6 cosines)
    spacing: tuple[float, float] | None  # PixelSpacing (row spacing, column spacing)
    slope: float
    intercept: float
    rescaled: bool = True  # the header gives a modality LUT (RescaleSlope/Intercept)


@dataclass
class SeriesInfo:
    """One image series found by `find_series`: what a user needs to choose it.

    count is the number of image files (instances); frames the number of 2D images in them
    (larger for multi-frame objects). `header` is the first file's header, without pixels.
    """

    series_uid: str
    modality: str
    description: str
    count: int
    frames: int
    files: list[str]
    number: int | None = None
    header: Dataset | None = field(default=None, repr=False)
    root: str = ""
    _frames: list[_Frame] = field(default_factory=list, repr=False)
    # Files that look like part of this series (its SeriesInstanceUID, or a DICOM file in its
    # folder that cannot be parsed) but cannot be read: (path, why).
    unreadable: list[tuple[str, str]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"series_uid": self.series_uid, "modality": self.modality,
                "description": self.description, "count": self.count, "frames": self.frames}


class MultipleSeriesError(MedfoundError):
    """A folder holds several image series and none was chosen; `.series` lists them."""

    exit_code = 3

    def __init__(self, path: str | Path, series: list[SeriesInfo]):
        self.series = series
        super().__init__(
            f"{len(series)} image series here ("
            + ", ".join(f"{s.modality} '{s.description}' ×{s.count}" for s in series[:4])
            + (", ..." if len(series) > 4 else "") + ")",
            path=path, hint="choose one with series_uid= (CLI: --series UID)")


class DicomReadError(MedfoundError):
    """A file or series that cannot be read as an image. `kind` is its category, a fixed
    word that QC can count without the message's free text (file names, header values):
    truncated, too_large, bad_header, invalid_rescale, invalid_geometry, undecodable,
    unsupported_codec, unreadable_files, gaps_or_uneven_spacing, duplicate_positions,
    mixed_geometry."""

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None,
                 kind: str = "bad_header"):
        self.kind = kind
        super().__init__(message, path=path, hint=hint)
