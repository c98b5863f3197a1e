"""When a propagation walk stops: the stop rules and what each reason means for people.

A walk (:mod:`SlicerSAM.walk`) checks every new slice's mask against :class:`StopRules`; a walk
stops after ``patience`` consecutive failing slices. docs/propagation.md ("When a walk stops")
has the measurements behind the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from SlicerSAM.mask_geometry import dice

__all__ = ["NO_STOP", "STOP_TEXT", "StopRules", "feature_similarity"]


@dataclass(frozen=True)
class StopRules:
    """When a walk stops. Every threshold may be None (rule off); the rules combine (any fails).

    Attributes:
        min_overlap: stop when Dice(this slice's mask, the last accepted slice's mask) < this.
            Adjacent slices of one organ overlap well; a jump to a neighbouring structure does
            not. The baseline is the last *accepted* mask, not the previous slice's: a jump that
            lasts two slices then fails twice (the second slice agrees with the first).
        min_iou: stop when the model's predicted IoU of the chosen mask < this.
        min_area_fraction: stop when the mask's area < this fraction of the key slice's area
            (the organ is vanishing: its tip rarely carries a reliable segment).
        min_pixels: stop when the mask has fewer pixels than this (empty or nearly so).
        max_slices: visit at most this many slices per walk (None: no limit).
        growth_limit: stop when the area grows beyond this factor of the last accepted area
            (a leak into a neighbour typically grows the area fast).
        max_area_factor: stop when the area exceeds this factor of the key slice's area.
        max_feature_drop: stop when the similarity of this slice to the previous one, as the
            image encoder sees them, drops more than this below its typical value in the walk.
            The similarity is the cosine between the mean embedding vectors under the two masks
            (``Segmenter.mask_features``); "typical" is the median over the slices the walk has
            accepted so far (the first step cannot fail). Crossing into a neighbour that looks the
            same slice by slice (the next vertebra across a disc) makes it dip for a slice or two
            while the predicted IoU stays high. Needs a segmenter with ``mask_features``.
        feature_min_cells: the feature rule compares two slices only when both masks cover at
            least this many cells of the image embedding (64 x 64 for LiteMedSAM): the mean over
            a handful of cells is noise (a spinal cord's cross-section covers about 5).
        patience: stop only after this many consecutive failing slices, then drop them (1: stop at
            the first failing slice and drop it).
    """

    min_overlap: Optional[float] = 0.3
    min_iou: Optional[float] = 0.65
    min_area_fraction: Optional[float] = 0.1
    min_pixels: Optional[int] = 4
    max_slices: Optional[int] = None
    growth_limit: Optional[float] = None
    max_area_factor: Optional[float] = None
    max_feature_drop: Optional[float] = 0.06
    feature_min_cells: float = 24.0
    patience: int = 2

    def __post_init__(self):
        if int(self.patience) < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.max_slices is not None and int(self.max_slices) < 0:
            raise ValueError(f"max_slices must be >= 0, got {self.max_slices}")

    def failures(
        self,
        mask: np.ndarray,
        previous: Optional[np.ndarray],
        iou: float,
        key_area: int,
        similarity: Optional[float] = None,
        typical: Optional[float] = None,
    ) -> List[str]:
        """Names of the rules ``mask`` fails ("empty", "area", "iou", "overlap", "growth",
        "features"). ``similarity``: feature similarity to the previous slice, ``typical``: its
        median over the walk so far (either None: the feature rule is not checked)."""
        failed = []
        area = int(mask.sum())
        if self.min_pixels is not None and area < int(self.min_pixels):
            failed.append("empty")
        if self.min_area_fraction is not None and area < self.min_area_fraction * key_area:
            failed.append("area")
        if self.max_area_factor is not None and area > self.max_area_factor * key_area:
            failed.append("growth")
        if self.min_iou is not None and iou < self.min_iou:
            failed.append("iou")
        if previous is not None and previous.any():
            if self.min_overlap is not None and dice(mask, previous) < self.min_overlap:
                failed.append("overlap")
            if self.growth_limit is not None and area > self.growth_limit * int(previous.sum()):
                if "growth" not in failed:
                    failed.append("growth")
        if (
            self.max_feature_drop is not None
            and similarity is not None
            and typical is not None
            and similarity < typical - self.max_feature_drop
        ):
            failed.append("features")
        return failed


def feature_similarity(a, b, rules: StopRules) -> Optional[float]:
    """Cosine similarity of two ``mask_features`` results (vector, cells), or None when either
    mask covers fewer than ``rules.feature_min_cells`` embedding cells."""
    (va, cells_a), (vb, cells_b) = a, b
    if min(cells_a, cells_b) < float(rules.feature_min_cells):
        return None
    va, vb = np.asarray(va, dtype=np.float64), np.asarray(vb, dtype=np.float64)
    norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
    return float(va @ vb) / norm if norm > 0 else None


NO_STOP = StopRules(
    min_overlap=None,
    min_iou=None,
    min_area_fraction=None,
    min_pixels=None,
    max_feature_drop=None,
    patience=1,
)


# what each stop reason means, for people (PropagationResult.summary)
STOP_TEXT = {
    "end": "end of the range",
    "max_slices": "slice limit reached",
    "empty": "the mask vanished",
    "area": "the structure shrank away",
    "iou": "the model lost confidence",
    "overlap": "the mask jumped away from the slices before it",
    "growth": "the mask grew too fast (a leak)",
    "features": "the tissue under the mask changed (a look-alike neighbour?)",
    "absent": "reached a slice marked as not holding the structure",
    "rejoined": "rejoined the earlier result",
}
