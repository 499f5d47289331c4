"""Imaging I/O: DICOM series, NIfTI and MetaImage → `Volume`; de-identification."""

from medfound.io.volume import Volume

__all__ = ["Volume"]
