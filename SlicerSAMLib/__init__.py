"""Slicer-side library of the SlicerSAM module: its Logic and MRML helpers (imports slicer)."""
