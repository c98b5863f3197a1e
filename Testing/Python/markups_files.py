"""Slicer markups files (.mrk.json) written by hand for tests: point lists and ROIs that follow
Slicer's markups schema (validated against it when ../shared is present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED

SCHEMA_URL = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
    "Schema/markups-schema-v1.0.3.json#"
)
SCHEMA_FILE = SHARED / "slicer-api" / "markups-schema-v1.0.3.json"


def point(label, position, description="", status="defined"):
    return {
        "id": label,
        "label": label,
        "description": description,
        "associatedNodeID": "",
        "position": list(position),
        "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
        "selected": True,
        "locked": False,
        "visibility": True,
        "positionStatus": status,
    }


def fiducial(name, points, system="RAS"):
    return {
        "type": "Fiducial",
        "coordinateSystem": system,
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(points),
        "name": name,
        "controlPoints": points,
        "measurements": [],
        "display": {"visibility": True, "opacity": 1.0, "color": [0.4, 1.0, 1.0]},
    }


def roi(name, center, size, orientation=(1, 0, 0, 0, 1, 0, 0, 0, 1), system="RAS"):
    return {
        "type": "ROI",
        "coordinateSystem": system,
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": 1,
        "name": name,
        "roiType": "Box",
        "insideOut": False,
        "center": list(center),
        "orientation": list(orientation),
        "size": list(size),
        "controlPoints": [point(f"{name}-1", center)],
        "measurements": [],
        "display": {"visibility": True, "opacity": 1.0},
    }


def write(tmp_path: Path, *markups, name="prompts.mrk.json") -> Path:
    data = {"@schema": SCHEMA_URL, "markups": list(markups)}
    if SCHEMA_FILE.is_file():  # our hand-written files follow Slicer's schema
        jsonschema = pytest.importorskip("jsonschema")
        jsonschema.validate(data, json.loads(SCHEMA_FILE.read_text()))
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2))
    return path
