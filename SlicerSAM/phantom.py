"""A SYNTHETIC CT-like abdominal phantom with known labels: the demo's sample on a fresh clone.

`make_phantom(seed)` builds a small int16 Hounsfield-unit volume (40 axial slices of 192 x 192)
and its reference label map, with the geometry of a real scan rather than an identity grid:
anisotropic voxels (0.8 x 0.8 mm in plane, 2.5 mm slices), DICOM-like LPS storage (rows run
anterior -> posterior, columns patient right -> left), a 10 degree rotation about the S axis and a
non-zero origin.

The anatomy is defined in patient RAS millimetres by implicit functions evaluated at every
voxel's RAS position (`Volume.kji_to_ras`), so it is placed correctly whatever the grid's
orientation: the liver on the patient's right (RAS x > 0: in RAS, +x points to the patient's
right, as in Slicer and NIfTI), the spleen on the left (x < 0), the kidneys
posterior on both sides (the right one lower), the aorta anterior and left of the vertebra, the
vertebra posterior in the midline. It is child-sized (about 13 x 10 cm across) so that a 192 x 192
grid at 0.8 mm holds it.

It is not a patient scan and makes no claim of realism beyond "CT-like": smooth organs of nominal
attenuation surrounded by thin fat planes, a subcutaneous fat ring, a few unlabelled bowel loops
with gas, slight partial-volume blur and mildly correlated Gaussian noise (SD ~12 HU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from SlicerSAM.volume import Volume

logger = logging.getLogger(__name__)

__all__ = ["Phantom", "make_phantom", "LABELS", "NOMINAL_HU", "SHAPE", "SPACING"]

SHAPE = (40, 192, 192)  # (K, J, I)
SPACING = (2.5, 0.8, 0.8)  # (sk, sj, si) mm
ROTATION_DEG = 10.0  # about the S axis: the grid is deliberately not axis-aligned
CENTRE_RAS = (4.0, -12.0, -160.0)  # RAS mm of the volume's (and the body's) centre

LABELS = {
    1: "liver",
    2: "spleen",
    3: "right kidney",
    4: "left kidney",
    5: "aorta",
    6: "vertebra",
}
# Nominal attenuation (HU) of the labelled structures; the noise has mean 0 around them.
NOMINAL_HU = {
    "liver": 60.0,
    "spleen": 50.0,
    "right kidney": 150.0,  # contrast-enhanced cortex
    "left kidney": 150.0,
    "aorta": 200.0,  # contrast-filled lumen
    "vertebra": 700.0,
}
AIR_HU = -1000.0
SOFT_TISSUE_HU = 40.0
SUBCUTANEOUS_FAT_HU = -100.0
VISCERAL_FAT_HU = -90.0
BOWEL_HU = 25.0
GAS_HU = -950.0
CANAL_HU = 15.0
NOISE_SD_HU = 12.0

# Painting order: a structure painted later wins where two overlap, and lower-priority organs
# keep a fat plane of FAT_GAP_MM from higher-priority ones (organs in a CT touch through thin fat).
PRIORITY = ("liver", "spleen", "right kidney", "left kidney", "aorta", "vertebra")
FAT_GAP_MM = 2.4
BODY_FAT_MM = 6.0  # subcutaneous fat thickness
WALL_MARGIN_MM = 3.0  # organs stay this far inside the subcutaneous fat (abdominal wall muscle)


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT volume and its reference labels on the same grid.

    Attributes:
        image: int16 Hounsfield units, (K, J, I), non-identity geometry.
        labels: uint8 label map on the image's grid (0 = background, keys of `names`).
        names: label value -> structure name.
        description: one paragraph saying what this is (SYNTHETIC) and how it was made.
        nominal_hu: structure name -> nominal attenuation in HU.
    """

    image: Volume
    labels: Volume
    names: dict
    description: str
    nominal_hu: dict = field(default_factory=lambda: dict(NOMINAL_HU))


def phantom_geometry(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """The phantom's 4x4 IJK-to-RAS matrix: LPS-like storage, rotated 10 degrees about S.

    Columns i and j point to the patient's left and posterior (as DICOM axial images store
    them), then the in-plane axes are rotated by ROTATION_DEG about S; the volume's centre voxel
    lands on CENTRE_RAS.
    """
    sk, sj, si = spacing
    t = np.deg2rad(ROTATION_DEG)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    directions = rot @ np.diag([-1.0, -1.0, 1.0])  # columns: i -> L, j -> P, k -> S
    linear = directions * np.array([si, sj, sk])
    centre_ijk = (np.array(shape[::-1], dtype=np.float64) - 1.0) / 2.0
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = np.asarray(CENTRE_RAS) - linear @ centre_ijk
    return matrix


def _ball(radius_mm: float, spacing) -> np.ndarray:
    """A boolean ellipsoidal structuring element of `radius_mm` on a grid of `spacing` (mm)."""
    half = [int(np.floor(radius_mm / s)) for s in spacing]
    axes = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    dist2 = sum((a * s) ** 2 for a, s in zip(axes, spacing))
    return dist2 <= radius_mm**2


def _ellipse_value(x, y, cx, cy, rx, ry, angle_deg=0.0):
    """(x', y') normalised radius squared of an axial ellipse rotated by angle_deg (RAS mm)."""
    a = np.deg2rad(angle_deg)
    dx, dy = x - cx, y - cy
    u = dx * np.cos(a) + dy * np.sin(a)
    v = -dx * np.sin(a) + dy * np.cos(a)
    return (u / rx) ** 2 + (v / ry) ** 2


def _shapes(x, y, z, rng) -> dict:
    """Boolean masks (K, J, I) of the body and every structure, from mm relative to the centre.

    x: towards the patient's LEFT (+), i.e. minus RAS x; y: anterior (+) / posterior (-), RAS y;
    z: superior (+), RAS z. (Left-positive x lets the shapes read "left lobe at +x".)
    """
    jitter = rng.uniform(-1.5, 1.5, size=(8, 3))  # small per-seed shifts of the organs (mm)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=4)
    shapes = {}

    # body: an ellipse whose size breathes a little along z; subcutaneous fat under the skin
    a = 66.0 * (1.0 + 0.025 * np.sin(z / 30.0))
    b = 50.0 * (1.0 + 0.02 * np.cos(z / 25.0))
    shapes["body"] = (x / a) ** 2 + (y / b) ** 2 <= 1.0
    shapes["inner"] = (x / (a - BODY_FAT_MM)) ** 2 + (y / (b - BODY_FAT_MM)) ** 2 <= 1.0
    cavity = (x / (a - BODY_FAT_MM - WALL_MARGIN_MM)) ** 2 + (
        y / (b - BODY_FAT_MM - WALL_MARGIN_MM)
    ) ** 2 <= 1.0

    # liver: patient right, anterior-lateral; largest in the upper slices, tapering to an
    # inferior tip that drifts lateral and posterior; smooth lobulations; a left lobe crossing
    # the midline in the upper slices.
    jx, jy, jz = jitter[0]
    profile = np.clip(1.0 - ((z - 12.0 - jz) / 48.0) ** 2, 0.0, None) ** 0.5
    below = np.clip(12.0 - z, 0.0, None)
    cx, cy = -26.0 + jx - 0.15 * below, 6.0 + jy - 0.12 * below
    theta = np.arctan2(y - cy, x - cx)
    wobble = 1.0 + 0.10 * np.sin(2.0 * theta + phases[0] + z / 30.0)
    wobble += 0.06 * np.cos(3.0 * theta + phases[1] - z / 40.0)
    right_lobe = _ellipse_value(x, y, cx, cy, 30.0, 33.0) <= (profile * wobble) ** 2
    left_lobe = (
        _ellipse_value(x, y, 2.0 + jx, 22.0 + jy, 22.0, 11.0, angle_deg=-15.0)
        + ((z - 30.0 - jz) / 20.0) ** 2
    ) <= 1.0
    shapes["liver"] = (right_lobe | left_lobe) & cavity

    # spleen: patient left, posterolateral, high; crescent (concave medial surface)
    jx, jy, jz = jitter[1]
    outer = _ellipse_value(x, y, 40.0 + jx, -8.0 + jy, 11.0, 19.0, angle_deg=-35.0)
    outer = outer + ((z - 18.0 - jz) / 24.0) ** 2 <= 1.0
    notch = _ellipse_value(x, y, 30.0 + jx, -4.0 + jy, 7.0, 12.0, angle_deg=-35.0)
    notch = notch + ((z - 18.0 - jz) / 20.0) ** 2 <= 1.0
    shapes["spleen"] = outer & ~notch & cavity

    # kidneys: posterior, either side of the spine, long axis along z, hilum facing
    # antero-medially; the right kidney sits lower (under the liver)
    kidneys = (("right kidney", -1.0, -14.0, jitter[2]), ("left kidney", 1.0, -6.0, jitter[3]))
    for name, side, zc, (jx, jy, jz) in kidneys:
        ell = _ellipse_value(x, y, side * 29.0 + jx, -19.0 + jy, 13.0, 8.0, angle_deg=side * -30.0)
        shapes[name] = (ell + ((z - zc - jz) / 26.0) ** 2 <= 1.0) & cavity

    # aorta: a contrast-filled tube anterior and left of the vertebral body, drifting slightly
    jx, jy, _ = jitter[4] * 0.5
    shapes["aorta"] = (x - (5.0 + jx + 0.02 * z)) ** 2 + (y - (-5.5 + jy)) ** 2 <= 5.5**2

    # vertebra: vertebral body (slightly waisted along z) plus the neural arch around the canal
    waist = 1.0 - 0.06 * np.cos(2.0 * np.pi * z / 25.0 + phases[2])
    vbody = _ellipse_value(x, y, 0.0, -22.0, 11.0 * waist, 8.5) <= 1.0
    r_canal = np.hypot(x, y + 35.5)
    arch = (r_canal <= 8.5) & (r_canal > 4.5)
    spinous = (np.abs(x) <= 2.0) & (y <= -41.0) & (y >= -46.0)
    shapes["canal"] = r_canal <= 4.5
    shapes["vertebra"] = (vbody | arch | spinous) & shapes["inner"]

    # unlabelled bowel loops (anterior, central) with a little gas
    loops = np.zeros(x.shape, dtype=bool)
    gas = np.zeros(x.shape, dtype=bool)
    for n in range(3):
        bx = -6.0 + 18.0 * n + rng.uniform(-3.0, 3.0)
        by = 30.0 + rng.uniform(-4.0, 4.0)
        bz = rng.uniform(-40.0, 10.0)
        loop = _ellipse_value(x, y, bx, by, 8.0, 6.0, angle_deg=30.0 * n) + ((z - bz) / 18.0) ** 2
        loops |= loop <= 1.0
        gas |= loop <= 0.15
    shapes["bowel"] = loops & cavity
    shapes["gas"] = gas & cavity
    return shapes


def make_phantom(seed: int = 0) -> Phantom:
    """Build the SYNTHETIC CT-like phantom (deterministic for a given `seed`).

    Args:
        seed: seeds the noise, the bowel loops and small (<= 1.5 mm) shifts and lobulations of
            the organs; the same seed gives identical arrays.

    Returns:
        `Phantom` with an int16 HU image (K, J, I) = (40, 192, 192), spacing (2.5, 0.8, 0.8) mm,
        a uint8 label map on the same grid, label names (`LABELS`) and a description.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    matrix = phantom_geometry()
    grid = Volume(np.zeros(SHAPE, dtype=np.int16), matrix)

    # RAS position of every voxel centre, relative to the body centre
    kji = np.indices(SHAPE, dtype=np.float32).reshape(3, -1).T
    ras = (grid.kji_to_ras(kji) - np.asarray(CENTRE_RAS)).astype(np.float32)
    x, y, z = (ras[:, n].reshape(SHAPE) for n in range(3))
    del kji, ras
    shapes = _shapes(-x, y, z, rng)  # _shapes takes x towards the patient's left
    del x, y, z

    # labels, in priority order; lower-priority organs keep a fat plane from higher ones
    gap = _ball(FAT_GAP_MM, SPACING)
    value_of = {name: value for value, name in LABELS.items()}
    labels = np.zeros(SHAPE, dtype=np.uint8)
    taken = np.zeros(SHAPE, dtype=bool)
    for name in reversed(PRIORITY):
        mask = shapes[name] & ~taken
        if name != "vertebra":  # bone abuts muscle directly: no fat plane needed around it
            mask &= ~ndimage.binary_dilation(taken, gap)
        labels[mask] = value_of[name]
        taken |= mask

    # intensities: air, soft tissue, subcutaneous fat, fat planes, bowel, organs
    image = np.full(SHAPE, AIR_HU, dtype=np.float32)
    image[shapes["body"]] = SOFT_TISSUE_HU
    image[shapes["body"] & ~shapes["inner"]] = SUBCUTANEOUS_FAT_HU
    soft_organs = taken & (labels != value_of["vertebra"])
    halo = ndimage.binary_dilation(soft_organs, _ball(2.0 * FAT_GAP_MM, SPACING))
    image[halo & shapes["inner"] & ~taken] = VISCERAL_FAT_HU
    free = shapes["inner"] & ~halo & ~taken
    image[shapes["bowel"] & free] = BOWEL_HU
    image[shapes["gas"] & free] = GAS_HU
    image[shapes["canal"] & ~taken] = CANAL_HU
    for value, name in LABELS.items():
        image[labels == value] = NOMINAL_HU[name]

    # slight partial-volume blur, then mildly correlated noise rescaled to NOISE_SD_HU
    image = ndimage.gaussian_filter(image, sigma=(0.3, 0.6, 0.6))
    noise = ndimage.gaussian_filter(
        rng.standard_normal(SHAPE, dtype=np.float32), sigma=(0.0, 0.6, 0.6)
    )
    noise *= NOISE_SD_HU / float(noise.std())
    image += noise * shapes["body"]  # air outside the body stays clean
    hu = np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    image_volume = Volume(hu, matrix)
    label_volume = image_volume.with_array(labels)
    counts = {name: int((labels == v).sum()) for v, name in LABELS.items()}
    sk, sj, si = SPACING
    description = (
        f"SYNTHETIC CT-like abdominal phantom generated by SlicerSAM (seed {seed}); not a patient "
        f"scan. {SHAPE[2]} x {SHAPE[1]} x {SHAPE[0]} voxels (I x J x K), {si} x {sj} x {sk} mm, "
        f"LPS-like storage rotated {ROTATION_DEG:g} degrees about S. Child-sized body (about "
        f"13 x 10 cm) of soft tissue ({SOFT_TISSUE_HU:g} HU) with subcutaneous fat "
        f"({SUBCUTANEOUS_FAT_HU:g} HU), fat planes around the organs and unlabelled bowel loops; "
        "labelled "
        + ", ".join(f"{name} ({NOMINAL_HU[name]:g} HU)" for name in LABELS.values())
        + f"; Gaussian noise SD {NOISE_SD_HU:g} HU."
    )
    logger.debug("phantom seed %d: voxel counts %s", seed, counts)
    return Phantom(image_volume, label_volume, dict(LABELS), description, dict(NOMINAL_HU))
