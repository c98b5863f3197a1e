"""JSON/CSV writers (atomic, NaN/inf -> null, numpy values) and the PNG plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from SlicerSAM.errors import OutputError
from SlicerSAM.reports import (
    overlay_montage,
    plot_slice_dice,
    plot_structure_dice,
    to_jsonable,
    write_csv,
    write_json,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RESULTS = {
    "liver": {"label": 1, "dice": 0.91, "iou": 0.83, "hd95_mm": 4.2, "nsd": 0.88},
    "spleen": {"label": 2, "dice": np.float32(0.75), "iou": 0.6, "hd95_mm": math.inf, "nsd": 0.5},
    "aorta": {"label": 3, "dice": 0.97, "iou": 0.94, "hd95_mm": 1.0, "nsd": 1.0},
    "kidney": {"label": 4, "dice": float("nan"), "iou": None, "hd95_mm": None, "nsd": None},
}


def _assert_png(path: Path, min_bytes: int = 5000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes
    # IHDR: width and height are big-endian uint32 at bytes 16..24
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 200 and height > 150


def _leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_write_json_converts_nonfinite_to_null_and_numpy_to_python(tmp_path):
    data = {
        "structures": RESULTS,
        "array": np.arange(3, dtype=np.int64),
        "matrix": np.eye(2, dtype=np.float32),
        "scalars": [np.int16(7), np.float64(-math.inf), np.bool_(True), (1, 2)],
        np.int64(5): "numpy key",
        3: "int key",
        "path": tmp_path / "x.nii.gz",
    }
    path = write_json(tmp_path / "sub" / "results.json", data)
    assert path == tmp_path / "sub" / "results.json"
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["structures"]["spleen"]["hd95_mm"] is None
    assert back["structures"]["spleen"]["dice"] == pytest.approx(0.75)
    assert back["structures"]["kidney"]["dice"] is None
    assert back["array"] == [0, 1, 2]
    assert back["matrix"] == [[1.0, 0.0], [0.0, 1.0]]
    assert back["scalars"] == [7, None, True, [1, 2]]
    assert back["5"] == "numpy key" and back["3"] == "int key"
    assert back["path"].endswith("x.nii.gz")
    assert _leftovers(path.parent) == []
    assert path.stat().st_mode & 0o044  # readable like a normally created file, not 0600


def test_write_json_overwrite_rules(tmp_path):
    path = write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(OutputError, match="exists"):
        write_json(path, {"v": 2}, overwrite=False)
    assert json.loads(path.read_text()) == {"v": 1}
    write_json(path, {"v": 3})
    assert json.loads(path.read_text()) == {"v": 3}


def test_write_json_failure_leaves_the_old_file_and_no_temp(tmp_path):
    path = write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(TypeError):
        write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_to_jsonable_handles_dataclasses():
    from dataclasses import dataclass

    @dataclass
    class Row:
        name: str
        value: float

    assert to_jsonable(Row("a", math.nan)) == {"name": "a", "value": None}


def test_write_csv_columns_and_empty_cells(tmp_path):
    rows = [{"structure": name, **m} for name, m in RESULTS.items()]
    rows[0]["extra"] = [1, 2]
    path = write_csv(tmp_path / "results.csv", rows)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames == ["structure", "label", "dice", "iou", "hd95_mm", "nsd", "extra"]
    assert [r["structure"] for r in table] == ["liver", "spleen", "aorta", "kidney"]
    assert float(table[1]["dice"]) == pytest.approx(0.75)
    assert table[1]["hd95_mm"] == ""  # inf -> empty cell (null in JSON)
    assert table[3]["dice"] == "" and table[3]["iou"] == ""
    assert table[0]["extra"] == "[1, 2]" and table[1]["extra"] == ""

    path = write_csv(tmp_path / "two.csv", rows, columns=["structure", "dice"])
    assert path.read_text().splitlines()[0] == "structure,dice"
    with pytest.raises(OutputError):
        write_csv(path, rows, overwrite=False)


def test_plot_structure_dice_writes_a_png(tmp_path):
    path = plot_structure_dice(RESULTS, tmp_path / "plots" / "structure_dice.png")
    _assert_png(path)
    assert _leftovers(path.parent) == []


def test_plot_slice_dice_writes_a_png(tmp_path):
    per_slice = {
        "liver": {3: 0.5, 4: 0.8, 5: 0.9, 6: 0.85},
        "spleen": {"10": 0.7, "11": math.nan, "12": 0.6},  # JSON-loaded keys, a NaN
        "empty": {},
    }
    path = plot_slice_dice(per_slice, tmp_path / "slice_dice.png", axis_name="axial slice (k)")
    _assert_png(path)


def _montage_case():
    k, j, i = np.mgrid[0:8, 0:40, 0:48]
    image = np.where((j - 20) ** 2 + (i - 24) ** 2 < 15**2, 40, -1000).astype(np.int16)
    ref = (((j - 20) ** 2 + (i - 20) ** 2 < 6**2) & (k >= 2) & (k <= 5)).astype(np.uint8)
    ref[((j - 20) ** 2 + (i - 30) ** 2 < 4**2) & (k >= 3)] = 2
    pred = np.roll(ref, 2, axis=2)
    return image, ref, pred


def test_overlay_montage_from_volumes_and_from_slices(tmp_path):
    image, ref, pred = _montage_case()
    path = overlay_montage(image, ref, pred, tmp_path / "overlay.png", window=(-160, 240))
    _assert_png(path, min_bytes=10000)

    path2 = overlay_montage(
        [image[3], image[4]],
        [ref[3], ref[4]],
        [pred[3], pred[4]],
        tmp_path / "overlay2.png",
        slices=[1],
        aspect=2.0,
        slice_labels=["axial 4"],
        title="SYNTHETIC check",
    )
    _assert_png(path2)
    # no prediction at all still draws the reference
    _assert_png(overlay_montage(image, ref, None, tmp_path / "ref_only.png", slices=[3]))


def test_overlay_montage_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        overlay_montage([np.zeros((2, 2, 2))], None, None, tmp_path / "bad.png")
