"""Intensity mapping: volume values (CT Hounsfield units, MR signal) -> uint8 model-image pixels.

One function turns user text into a mapping, `parse_intensity(text)`; it accepts

- a preset name: ``abdomen`` (W400/L40), ``lung`` (W1500/L-600), ``bone`` (W1800/L400),
  ``brain`` (W80/L40), ``mediastinum`` (W350/L50) (see `PRESETS`, name -> (level, width));
- ``"LEVEL,WIDTH"``, a CT window in HU, e.g. ``"40,400"`` or ``"-600,1500"``;
- ``"mr"`` or ``"percentile"``: the 0.5-99.5 % percentiles of the whole volume (MR, any modality);
- ``"percentile:LOW,HIGH"``, other percentiles, e.g. ``"percentile:1,99"``.

A mapping gives its value `bounds(volume)` (lo, hi) once per volume and maps each slice with
`apply(image, bounds)`: a linear ramp clipped to 0..255. `signature()` is a stable string that
identifies the mapping in embedding-cache keys.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

PRESETS = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}

KINDS = ("window", "percentile")
PERCENTILE_NAMES = ("mr", "percentile")

VALID_FORMS = (
    f"a preset ({', '.join(PRESETS)}), 'LEVEL,WIDTH' (e.g. '40,400' or '-600,1500'), "
    "'mr' or 'percentile' (0.5-99.5 % of the volume), or 'percentile:LOW,HIGH' "
    "(e.g. 'percentile:1,99')"
)

# Percentile bounds per (volume digest, low, high): computing them sorts the whole volume.
_BOUNDS_CACHE: OrderedDict = OrderedDict()
_BOUNDS_CACHE_SIZE = 16
_BOUNDS_LOCK = threading.Lock()


@dataclass(frozen=True)
class IntensityMapping:
    """A linear map of voxel values to 0..255: a fixed window or volume percentiles.

    Attributes:
        kind: "window" (level/width, e.g. CT HU) or "percentile" (of the whole volume, e.g. MR).
        level, width: window centre and width (kind "window"); width > 0.
        low_percentile, high_percentile: percentiles (kind "percentile"), 0 <= low < high <= 100.
    """

    kind: str = "window"
    level: float = 40.0
    width: float = 400.0
    low_percentile: float = 0.5
    high_percentile: float = 99.5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown intensity kind {self.kind!r}; use 'window' or 'percentile'")
        for name in ("level", "width", "low_percentile", "high_percentile"):
            value = float(getattr(self, name))
            if not np.isfinite(value):
                raise ValueError(f"intensity {name} must be finite, got {value}")
            object.__setattr__(self, name, value)
        if self.width <= 0:
            raise ValueError(f"window width must be > 0, got {self.width:g}")
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise ValueError(
                "percentiles must satisfy 0 <= low < high <= 100, got "
                f"{self.low_percentile:g}, {self.high_percentile:g}"
            )

    def bounds(self, volume) -> tuple[float, float]:
        """(lo, hi) values mapped to 0 and 255; percentiles are computed once per volume."""
        if self.kind == "window":
            return (self.level - self.width / 2.0, self.level + self.width / 2.0)
        key = (volume.digest(), self.low_percentile, self.high_percentile)
        with _BOUNDS_LOCK:
            if key in _BOUNDS_CACHE:
                _BOUNDS_CACHE.move_to_end(key)
                return _BOUNDS_CACHE[key]
        lo, hi = np.percentile(volume.array, [self.low_percentile, self.high_percentile])
        result = (float(lo), float(hi))
        with _BOUNDS_LOCK:
            _BOUNDS_CACHE[key] = result
            while len(_BOUNDS_CACHE) > _BOUNDS_CACHE_SIZE:
                _BOUNDS_CACHE.popitem(last=False)
        return result

    def apply(self, image: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
        """Map values linearly from [lo, hi] to [0, 255], clipped and rounded, as uint8.

        A degenerate range (hi <= lo, e.g. a constant volume) maps values <= lo to 0, others 255.
        """
        lo, hi = float(bounds[0]), float(bounds[1])
        values = np.asarray(image, dtype=np.float32)
        if hi <= lo:
            return np.where(values > lo, 255, 0).astype(np.uint8)
        scaled = (values - np.float32(lo)) * np.float32(255.0 / (hi - lo))
        return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)

    def as_text(self) -> str:
        """The mapping as :func:`parse_intensity` reads it back ('40,400', 'percentile:0.5,99.5'):
        how it travels to the inference server."""
        if self.kind == "window":
            return f"{self.level:.10g},{self.width:.10g}"
        return f"percentile:{self.low_percentile:.10g},{self.high_percentile:.10g}"

    def describe(self) -> str:
        """The mapping for people, as reports print it: 'L40/W400' or 'percentile 0.5-99.5'."""
        if self.kind == "window":
            return f"L{self.level:g}/W{self.width:g}"
        return f"percentile {self.low_percentile:g}-{self.high_percentile:g}"

    def signature(self) -> str:
        """A stable text identifying the mapping (used in cache keys), e.g. 'window:L40:W400'."""
        if self.kind == "window":
            return f"window:L{self.level:.10g}:W{self.width:.10g}"
        return f"percentile:{self.low_percentile:.10g}-{self.high_percentile:.10g}"


def parse_intensity(text) -> IntensityMapping:
    """Parse a preset name, 'LEVEL,WIDTH', 'mr'/'percentile' or 'percentile:LOW,HIGH'.

    An `IntensityMapping` is returned unchanged. Raises ValueError naming the valid forms.
    """
    if isinstance(text, IntensityMapping):
        return text
    raw = str(text)
    key = raw.strip().lower()
    if key in PRESETS:
        level, width = PRESETS[key]
        return IntensityMapping(kind="window", level=level, width=width)
    if key in PERCENTILE_NAMES:
        return IntensityMapping(kind="percentile")
    kind = "window"
    if key.startswith("percentile:"):
        kind, key = "percentile", key[len("percentile:") :]
    elif key.startswith("window:"):
        key = key[len("window:") :]
    parts = [part.strip() for part in key.split(",")]
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 2:
        raise ValueError(f"cannot read intensity {raw!r}; use {VALID_FORMS}")
    try:
        if kind == "percentile":
            return IntensityMapping(
                kind="percentile", low_percentile=numbers[0], high_percentile=numbers[1]
            )
        return IntensityMapping(kind="window", level=numbers[0], width=numbers[1])
    except ValueError as error:
        raise ValueError(f"invalid intensity {raw!r}: {error}; use {VALID_FORMS}") from error


def model_image(plane, volume, index: int, mapping: IntensityMapping, bounds=None) -> np.ndarray:
    """The (H, W, 3) uint8 image a model sees for slice ``index`` of ``volume`` along ``plane``:
    the slice grid resampled to the plane's model-image grid, mapped by ``mapping`` (``bounds``:
    its (lo, hi), computed here when None), grey in all three channels."""
    grid = plane.grid(volume.array, index)
    image = plane.to_image(np.asarray(grid, dtype=np.float32), order=1)
    bounds = mapping.bounds(volume) if bounds is None else bounds
    u8 = np.asarray(mapping.apply(image, bounds), dtype=np.uint8)
    return np.repeat(u8[:, :, None], 3, axis=2)
