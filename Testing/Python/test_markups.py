"""Slicer markups files (.mrk.json) -> prompts: points, polarity, ROIs, LPS, errors."""

from __future__ import annotations

import numpy as np
import pytest
from markups_files import fiducial as _fiducial
from markups_files import point as _point
from markups_files import roi as _roi
from markups_files import write as _write
from synthetic import awkward_volume

from SlicerSAM.errors import PromptError
from SlicerSAM.markups import point_polarity, read_markups
from SlicerSAM.prompts import Box, box_slice_range, prompts_on_slice
from SlicerSAM.slicing import plane_for


def test_point_list_becomes_positive_points(tmp_path):
    path = _write(tmp_path, _fiducial("F", [_point("F-1", (1, 2, 3)), _point("F-2", (4, 5, 6))]))
    prompts = read_markups(path)
    assert prompts.frame == "ras" and prompts.box is None
    assert [p.position for p in prompts.points] == [(1, 2, 3), (4, 5, 6)]
    assert all(p.positive for p in prompts.points)


def test_negative_list_names_and_point_label_overrides(tmp_path):
    path = _write(
        tmp_path,
        _fiducial("liver", [_point("liver-1", (0, 0, 0)), _point("-", (1, 0, 0))]),
        _fiducial(
            "liver-neg",
            [
                _point("liver-neg-1", (2, 0, 0)),
                _point("keep", (3, 0, 0), description="+ actually inside"),
                _point("positive", (4, 0, 0)),
            ],
        ),
        _fiducial("Background", [_point("B-1", (5, 0, 0))]),
        _fiducial("F", [_point("F-3", (6, 0, 0), description="background")]),
    )
    prompts = read_markups(path)  # all lists merged, in file order
    assert [p.positive for p in prompts.points] == [True, False, False, True, True, False, False]


@pytest.mark.parametrize(
    ("label", "description", "list_name", "positive"),
    [
        ("F-1", "", "F", True),
        ("F-1", "", "neg", False),
        ("F-1", "", "Exclude", False),
        ("F-1", "", "kidney_neg2", False),
        ("F-1", "", "negligible", True),  # "neg" must be a word of its own
        ("-1", "", "F", False),
        ("+", "", "negative", True),
        ("Positive seed", "", "background", True),
        ("", "neg", "F", False),
        ("F-1", "tumour", "F", True),
    ],
)
def test_point_polarity_rules(label, description, list_name, positive):
    assert point_polarity(label, description, list_name) is positive


def test_lps_points_are_flipped_to_ras_and_undefined_points_skipped(tmp_path):
    path = _write(
        tmp_path,
        _fiducial(
            "F",
            [_point("F-1", (10, -20, 30)), _point("F-2", (0, 0, 0), status="undefined")],
            system="LPS",
        ),
    )
    prompts = read_markups(path)
    assert [p.position for p in prompts.points] == [(-10, 20, 30)]


def test_roi_becomes_a_box_from_its_corners(tmp_path):
    # rotated 90 degrees about S: the ROI's x axis runs along A, so its 40 mm side lies along A
    rot = (0, -1, 0, 1, 0, 0, 0, 0, 1)
    path = _write(tmp_path, _roi("R", (10, 20, 30), (40, 10, 6), rot))
    box = read_markups(path).box
    np.testing.assert_allclose(box.corner_a, (5, 0, 27))
    np.testing.assert_allclose(box.corner_b, (15, 40, 33))
    # LPS: centre (10, 20, 30) LPS is (-10, -20, 30) RAS
    path = _write(tmp_path, _roi("R", (10, 20, 30), (4, 6, 8), system="LPS"), name="lps.mrk.json")
    box = read_markups(path).box
    np.testing.assert_allclose(box.corner_a, (-12, -23, 26))
    np.testing.assert_allclose(box.corner_b, (-8, -17, 34))


def test_thin_roi_is_a_2d_box_and_thick_roi_a_slice_range(tmp_path):
    vol = awkward_volume()
    plane = plane_for(vol, "axial")  # 5 mm slices (array axis 1), oblique by 8 degrees
    centre_kji = np.array([18.0, 6.0, 16.0])
    centre = vol.kji_to_ras(centre_kji)
    thin = read_markups(_write(tmp_path, _roi("thin", centre, (12, 12, 0.5)), name="t.mrk.json"))
    assert box_slice_range(thin.box, vol, plane) == (6, 6)
    sp = prompts_on_slice(thin, vol, plane)
    assert sp.index == 6 and sp.box_xyxy is not None and sp.points_xy is None
    thick = read_markups(_write(tmp_path, _roi("thick", centre, (12, 12, 21)), name="k.mrk.json"))
    first, last = box_slice_range(thick.box, vol, plane)
    assert first < 6 < last and last - first >= 4


def test_points_and_roi_are_merged(tmp_path):
    path = _write(
        tmp_path,
        _fiducial("F", [_point("F-1", (1, 2, 3))]),
        _roi("R", (1, 2, 3), (10, 10, 1)),
        _fiducial("neg", [_point("neg-1", (2, 2, 3))]),
    )
    prompts = read_markups(path)
    assert [p.positive for p in prompts.points] == [True, False]
    assert isinstance(prompts.box, Box) and prompts.box.frame == "ras"


def test_micrometre_units_are_scaled(tmp_path):
    markup = _fiducial("F", [_point("F-1", (1000, 2000, -3000))])
    markup["coordinateUnits"] = "um"
    prompts = read_markups(_write(tmp_path, markup))
    assert prompts.points[0].position == (1.0, 2.0, -3.0)


def test_unsupported_markups_type_is_named(tmp_path):
    curve = _fiducial("Path", [_point("P-1", (0, 0, 0)), _point("P-2", (1, 1, 1))])
    curve["type"] = "Curve"
    path = _write(tmp_path, _fiducial("F", [_point("F-1", (0, 0, 0))]), curve)
    with pytest.raises(PromptError, match=r"markups\[1\] \(Curve 'Path'\).*'Curve'"):
        read_markups(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json at all", "not a JSON file"),
        ("[1, 2]", "not a Slicer markups file"),
        ('{"@schema": "x", "markups": []}', "no markups"),
        ('{"@schema": "x"}', "no markups"),
        ('{"@schema": "x", "markups": [{"name": "a"}]}', "has no 'type'"),
        ('{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, 2]}]}]}', "3 "),
        ('{"markups": [{"type": "Fiducial", "controlPoints": []}]}', "no defined control point"),
        ('{"markups": [{"type": "ROI", "center": [0, 0, 0]}]}', "no 'size'"),
        ('{"markups": [{"type": "Fiducial", "coordinateSystem": "XYZ"}]}', "coordinateSystem"),
    ],
)
def test_malformed_files_raise_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.mrk.json"
    path.write_text(text)
    with pytest.raises(PromptError, match=message):
        read_markups(path)


def test_two_rois_are_refused_and_missing_file_reported(tmp_path):
    path = _write(tmp_path, _roi("A", (0, 0, 0), (1, 1, 1)), _roi("B", (5, 5, 5), (1, 1, 1)))
    with pytest.raises(PromptError, match=r"2 ROIs \(A, B\)"):
        read_markups(path)
    with pytest.raises(PromptError, match="cannot read"):
        read_markups(tmp_path / "missing.mrk.json")
