"""Read 3D Slicer markups files (``.mrk.json``, schema markups-v1.0.3) as SAM prompts.

Supported markups and what they become (all merged into one :class:`~SlicerSAM.prompts.Prompts`
in RAS millimetres):

- ``Fiducial`` (a point list): every defined control point becomes a :class:`Point`.
  Positive or negative is decided per point, first rule that applies:

  1. the control point's ``label``, then its ``description``: starting with ``-``, or containing
     ``negative``, ``background``, ``exclude`` or the word ``neg`` -> negative; starting with ``+``,
     or containing ``positive``, ``foreground`` or the word ``pos`` -> positive;
  2. the point list's ``name``: containing ``negative``, ``background``, ``exclude`` or the word
     ``neg`` (e.g. ``neg``, ``F-neg``, ``neg2``) -> all its points negative;
  3. otherwise positive.

  So a radiologist keeps two point lists ("liver" and "liver-neg"), or renames single points
  "-" / "+" in Slicer's control-point table. Points whose ``positionStatus`` is ``undefined`` (not
  placed yet) are skipped.
- ``ROI``: ``center``, ``size`` and the 3x3 ``orientation`` (columns are the ROI axes) give its 8
  corners; their RAS bounding box becomes the :class:`Box`. Thinner than one slice along the
  slicing axis it is a 2D box on that slice, otherwise a 3D box whose slice range limits
  propagation (decided later, against the volume: :func:`SlicerSAM.prompts.box_slice_range`).
  One ROI per prompt (SAM takes one box); an inside-out ROI is refused.

``coordinateSystem`` ``LPS`` (the schema default) is converted to RAS by negating x and y;
``coordinateUnits`` ``um`` is scaled to mm. Any other markups type (Line, Angle, Curve,
ClosedCurve, Plane) is a :class:`PromptError` naming it: silently ignoring a prompt would segment
something else than the user asked for.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from SlicerSAM.errors import PromptError
from SlicerSAM.prompts import Box, Point, Prompts, read_json_file

logger = logging.getLogger(__name__)

# read_markups returns the merged prompts; the architecture table calls its result MarkupsContent
MarkupsContent = Prompts

_NEGATIVE_WORDS = re.compile(r"negative|background|exclude|(?<![a-z])neg(?![a-z])")
_POSITIVE_WORDS = re.compile(r"positive|foreground|(?<![a-z])pos(?![a-z])")
_UNSUPPORTED = ("Line", "Angle", "Curve", "ClosedCurve", "Plane")


def point_polarity(label: str, description: str = "", list_name: str = "") -> bool:
    """True (positive) or False (negative) for one control point, by the module's rules."""
    for text in (label, description):
        text = (text or "").strip().lower()
        if not text:
            continue
        if text.startswith("-") or _NEGATIVE_WORDS.search(text):
            return False
        if text.startswith("+") or _POSITIVE_WORDS.search(text):
            return True
    return not _NEGATIVE_WORDS.search((list_name or "").lower())


def _vec(value, n: int, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{where}: expected {n} numbers, got {value!r}") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise PromptError(f"{where}: expected {n} finite numbers, got {value!r}")
    return arr


def _to_ras_factor(markup: dict, where: str) -> Tuple[np.ndarray, float]:
    """(per-axis sign to RAS, unit scale to mm) of one markup."""
    system = markup.get("coordinateSystem", "LPS")  # schema default
    if system == "LPS":
        sign = np.array([-1.0, -1.0, 1.0])
    elif system == "RAS":
        sign = np.ones(3)
    else:
        raise PromptError(f"{where}: coordinateSystem must be 'LPS' or 'RAS', got {system!r}")
    units = markup.get("coordinateUnits", "mm")
    if isinstance(units, list) and units:
        units = units[0]
    if units == "mm":
        scale = 1.0
    elif units == "um":
        scale = 1e-3
    else:
        raise PromptError(f"{where}: coordinateUnits must be 'mm' or 'um', got {units!r}")
    return sign, scale


def _defined_points(markup: dict, where: str) -> List[Tuple[dict, np.ndarray]]:
    points = markup.get("controlPoints", [])
    if not isinstance(points, list):
        raise PromptError(f"{where}: 'controlPoints' must be a list")
    out = []
    for n, cp in enumerate(points):
        if not isinstance(cp, dict):
            raise PromptError(f"{where}: controlPoints[{n}] must be an object")
        if cp.get("positionStatus", "defined") == "undefined" or "position" not in cp:
            logger.info("%s: controlPoints[%d] has no defined position, skipped", where, n)
            continue
        out.append((cp, _vec(cp["position"], 3, f"{where} controlPoints[{n}].position")))
    return out


def _fiducial_points(markup: dict, where: str) -> List[Point]:
    sign, scale = _to_ras_factor(markup, where)
    name = markup.get("name", "")
    points = []
    for cp, pos in _defined_points(markup, where):
        positive = point_polarity(
            str(cp.get("label", "")), str(cp.get("description", "")), str(name)
        )
        points.append(Point(tuple(pos * scale * sign), positive))
    return points


def _roi_box(markup: dict, where: str) -> Box:
    sign, scale = _to_ras_factor(markup, where)
    if markup.get("insideOut", False):
        raise PromptError(f"{where}: an inside-out ROI cannot be used as a box prompt")
    if "size" not in markup:
        raise PromptError(f"{where}: ROI has no 'size'")
    size = _vec(markup["size"], 3, f"{where} size")
    if np.any(size < 0):
        raise PromptError(f"{where}: ROI size must not be negative, got {size.tolist()}")
    if "center" in markup:
        center = _vec(markup["center"], 3, f"{where} center")
    else:  # an ROI's single control point is its centre
        defined = _defined_points(markup, where)
        if not defined:
            raise PromptError(f"{where}: ROI has neither 'center' nor a defined control point")
        center = defined[0][1]
    if "orientation" in markup:
        axes = _vec(markup["orientation"], 9, f"{where} orientation").reshape(3, 3)
    else:
        axes = np.eye(3)
    # orientation is row-major with the ROI's axes as columns (schema: [o0, o3, o6] is the x axis)
    half = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * (
        size / 2.0
    )
    corners = center[None, :] + half @ axes.T
    corners = corners * scale * sign[None, :]
    return Box(tuple(corners.min(axis=0)), tuple(corners.max(axis=0)), frame="ras")


def parse_markups(data, source: str = "<markups>") -> Prompts:
    """Prompts (RAS) from the decoded JSON of a markups file; see the module docstring."""
    if not isinstance(data, dict):
        raise PromptError(f"{source}: not a Slicer markups file (expected a JSON object)")
    markups = data.get("markups")
    if not isinstance(markups, list) or not markups:
        raise PromptError(f"{source}: no markups in the file (expected a non-empty 'markups' list)")
    if "@schema" not in data:
        logger.warning("%s: no '@schema' field; reading it as markups v1.0.3", source)
    points: List[Point] = []
    boxes: List[Tuple[Box, str]] = []
    for n, markup in enumerate(markups):
        if not isinstance(markup, dict):
            raise PromptError(f"{source}: markups[{n}] must be an object")
        mtype = markup.get("type")
        name = markup.get("name", "")
        where = f"{source}: markups[{n}] ({mtype} '{name}')" if name else f"{source}: markups[{n}]"
        if mtype == "Fiducial":
            points.extend(_fiducial_points(markup, where))
        elif mtype == "ROI":
            boxes.append((_roi_box(markup, where), name or f"markups[{n}]"))
        elif mtype is None:
            raise PromptError(f"{where}: has no 'type'")
        else:
            kind = "unsupported" if mtype in _UNSUPPORTED else "unknown"
            raise PromptError(
                f"{where}: {kind} markups type {mtype!r}; SlicerSAM reads point lists "
                "(Fiducial) and ROI markups only"
            )
    if len(boxes) > 1:
        raise PromptError(
            f"{source}: {len(boxes)} ROIs ({', '.join(b[1] for b in boxes)}); a prompt takes one "
            "box, so keep one ROI per file"
        )
    box: Optional[Box] = boxes[0][0] if boxes else None
    if not points and box is None:
        raise PromptError(f"{source}: the markups hold no defined control point or ROI")
    return Prompts(points=tuple(points), box=box, frame="ras")


def read_markups(path) -> Prompts:
    """Read a Slicer ``.mrk.json`` file: point lists and an ROI, merged into RAS prompts.

    Raises:
        PromptError: unreadable file, not JSON, no markups, malformed fields, an unsupported
            markups type (named), or more than one ROI.
    """
    path = Path(path)
    return parse_markups(read_json_file(path, "Slicer markups file (.mrk.json)"), source=str(path))
