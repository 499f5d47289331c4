"""Imaging I/O: DICOM series, NIfTI and MetaImage → `Volume`; de-identification; DICOM SR and
SEG writers (sr.py, seg.py)."""

from medfound.io.volume import Volume

__all__ = ["Volume"]
