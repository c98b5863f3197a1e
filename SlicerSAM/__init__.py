"""SlicerSAM engine: Slicer-independent SAM segmentation of CT/MRI volumes.

Kept free of side effects: inside 3D Slicer this file does not run (SlicerSAM.py acts as the
package there), so nothing may be initialised here.
"""
