"""Prompts: RAS / voxel -> model-image pixels of one slice, slice inference, errors, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from synthetic import awkward_volume, nifti_like_volume

from SlicerSAM.errors import PromptError
from SlicerSAM.prompts import (
    Box,
    Point,
    Prompts,
    SlicePrompts,
    box_slice_range,
    load_prompt_file,
    mask_box_xyxy,
    prompts_on_slice,
    save_prompt_file,
)
from SlicerSAM.slicing import plane_for
from SlicerSAM.volume import Volume


@pytest.fixture(scope="module")
def awkward():
    return awkward_volume()


def _ras_volume(shape=(6, 8, 10), spacing=(1.0, 1.0, 1.0)):
    """i -> right, j -> anterior, k -> superior (the NIfTI RAS+ layout), origin 0."""
    m = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    return Volume(np.zeros(shape, dtype=np.int16), m)


def test_ras_point_lands_on_hand_computed_pixel():
    vol = _ras_volume()
    plane = plane_for(vol, "axial")
    # axial rows run anterior -> posterior and columns right -> left: the most anterior, most
    # right voxel (j = J-1, i = I-1) is the image's top-left pixel (x, y) = (0, 0)
    ras = vol.kji_to_ras(np.array([[2.0, 7.0, 9.0], [2.0, 0.0, 0.0], [2.0, 7.0, 0.0]]))
    prompts = Prompts(points=tuple(Point(p) for p in ras))
    sp = prompts_on_slice(prompts, vol, plane)
    assert sp.index == 2
    np.testing.assert_allclose(sp.points_xy, [[0, 0], [9, 7], [9, 0]], atol=1e-5)
    np.testing.assert_array_equal(sp.point_labels, [1, 1, 1])


def test_ras_and_voxel_frames_agree_on_an_oblique_resampled_volume(awkward):
    for orientation in ("axial", "coronal", "sagittal"):
        plane = plane_for(awkward, orientation)
        kji = np.array([[10.0, 5.0, 7.0], [12.0, 5.0, 20.0]])
        kji[:, plane.axis] = 5.0  # both on slice 5
        ras = awkward.kji_to_ras(kji)
        in_ras = prompts_on_slice(
            Prompts(points=(Point(ras[0]), Point(ras[1], False))), awkward, plane
        )
        in_kji = prompts_on_slice(
            Prompts(points=(Point(kji[0]), Point(kji[1], False)), frame="kji"), awkward, plane
        )
        assert in_ras.index == in_kji.index == 5
        np.testing.assert_allclose(in_ras.points_xy, in_kji.points_xy, atol=1e-4)
        np.testing.assert_array_equal(in_ras.point_labels, [1, 0])
        # and back through the plane's inverse: the model-image pixel is that voxel
        back = plane.xy_to_voxel(5, in_ras.points_xy)
        np.testing.assert_allclose(back, kji, atol=1e-3)


def test_points_within_half_a_voxel_share_a_slice_and_others_are_rejected(awkward):
    plane = plane_for(awkward, "axial")  # slicing axis is array axis 1 (5 mm)
    base = np.array([10.0, 4.0, 8.0])
    near = base + np.array([0.0, 0.45, 3.0])
    far = base + np.array([0.0, 0.8, -2.0])
    ras = awkward.kji_to_ras(np.array([base, near, far]))
    ok = prompts_on_slice(Prompts(points=(Point(ras[0]), Point(ras[1]))), awkward, plane)
    assert ok.index == 4
    with pytest.raises(PromptError, match=r"one axial slice.*point 2 .* on slice 4\.80"):
        prompts_on_slice(Prompts(points=tuple(Point(p) for p in ras)), awkward, plane)
    with pytest.raises(PromptError, match="within half a voxel of slice 6"):
        prompts_on_slice(Prompts(points=(Point(ras[0]),)), awkward, plane, index=6)


def test_point_outside_the_volume_names_point_voxel_and_extent(awkward):
    plane = plane_for(awkward, "axial")
    inside = awkward.kji_to_ras([5.0, 3.0, 4.0])
    outside = awkward.kji_to_ras([5.0, 3.0, 40.0])  # i runs 0..31
    prompts = Prompts(points=(Point(inside), Point(outside)))
    with pytest.raises(PromptError) as err:
        prompts_on_slice(prompts, awkward, plane)
    text = str(err.value)
    assert "point 1" in text and "outside the volume" in text
    assert "(5.0, 3.0, 40.0)" in text  # its voxel coordinates
    assert "i 0..31" in text and "(36, 12, 32)" in text  # the extent


def test_index_outside_the_volume_is_a_prompt_error(awkward):
    plane = plane_for(awkward, "axial")
    with pytest.raises(PromptError, match=r"slices run 0\.\.11"):
        prompts_on_slice(Prompts(points=(Point((5, 3, 4)),), frame="kji"), awkward, plane, 12)


def test_flat_box_is_2d_and_thick_box_gives_a_slice_range(awkward):
    plane = plane_for(awkward, "axial")
    flat = Box((5.0, 3.2, 4.0), (20.0, 2.9, 25.0), frame="kji")
    assert box_slice_range(flat, awkward, plane) == (3, 3)
    thick = Box((5.0, 2.0, 4.0), (20.0, 7.0, 25.0), frame="kji")
    assert box_slice_range(thick, awkward, plane) == (2, 7)
    # a box sticking out of the volume is clipped to it
    big = Box((5.0, -3.0, 4.0), (20.0, 30.0, 25.0), frame="kji")
    assert box_slice_range(big, awkward, plane) == (0, 11)

    sp = prompts_on_slice(Prompts(box=thick, frame="kji"), awkward, plane)
    assert sp.index == 4  # the middle slice of 2..7
    with pytest.raises(PromptError, match=r"outside the box's slice range 2\.\.7"):
        prompts_on_slice(Prompts(box=thick, frame="kji"), awkward, plane, index=9)


def test_box_corners_map_to_xyxy_and_match_the_mask_box(awkward):
    plane = plane_for(awkward, "sagittal")  # resampled 12 x 36 grid -> 75 x 36 image
    index = 9
    mask = np.zeros(plane.grid_shape, dtype=bool)
    mask[3:8, 10:25] = True
    # the voxel (k, j, i) of two opposite grid corners, read off the plane's own grid
    kji = np.stack(np.indices(awkward.shape), axis=-1)
    corners = np.array([plane.grid(kji[..., a], index)[[3, 7], [10, 24]] for a in range(3)]).T
    ras = awkward.kji_to_ras(corners.astype(float))
    sp = prompts_on_slice(Prompts(box=Box(corners[0], corners[1]), frame="kji"), awkward, plane)
    assert sp.index == index
    expected = mask_box_xyxy(mask, awkward, plane, index)
    np.testing.assert_allclose(sp.box_xyxy, expected, atol=1e-4)
    x0, y0, x1, y1 = sp.box_xyxy
    assert 0 <= x0 < x1 <= plane.image_shape[1] - 1 and 0 <= y0 < y1 <= plane.image_shape[0] - 1
    # in RAS, the 8 corners of the RAS-aligned box enclose the voxel-aligned rectangle
    sp_ras = prompts_on_slice(Prompts(box=Box(ras[0], ras[1])), awkward, plane, index=index)
    assert sp_ras.box_xyxy[0] <= x0 + 1e-3 and sp_ras.box_xyxy[2] >= x1 - 1e-3
    assert mask_box_xyxy(np.zeros_like(mask), awkward, plane, index) is None


def test_box_wholly_outside_the_volume_is_rejected(awkward):
    plane = plane_for(awkward, "axial")
    box = Box((50.0, 3.0, 4.0), (60.0, 3.0, 9.0), frame="kji")
    with pytest.raises(PromptError, match="lies outside the volume"):
        prompts_on_slice(Prompts(box=box, frame="kji"), awkward, plane)


def test_mask_prompts_3d_and_2d(awkward):
    plane = plane_for(awkward, "coronal")
    mask3d = np.zeros(awkward.shape, dtype=bool)
    mask3d[7, 2:5, 3:9] = True
    mask3d[8, 2:3, 3:4] = True
    sp = prompts_on_slice(Prompts(mask=mask3d), awkward, plane)
    assert sp.index == 7  # the slice with the most foreground
    np.testing.assert_array_equal(sp.mask, plane.grid(mask3d, 7))
    sp2 = prompts_on_slice(Prompts(mask=sp.mask), awkward, plane, index=7)
    np.testing.assert_array_equal(sp2.mask, sp.mask)
    with pytest.raises(PromptError, match="needs a slice index"):
        prompts_on_slice(Prompts(mask=sp.mask), awkward, plane)
    with pytest.raises(PromptError, match="differs from the coronal slice grid"):
        prompts_on_slice(Prompts(mask=np.ones((3, 3), bool)), awkward, plane, index=7)


def test_empty_prompts_and_mismatched_frames_are_rejected():
    vol = nifti_like_volume()
    with pytest.raises(PromptError, match="no prompt"):
        prompts_on_slice(Prompts(), vol, plane_for(vol))
    with pytest.raises(PromptError, match="frame"):
        Prompts(box=Box((0, 0, 0), (1, 1, 1), frame="kji"), frame="ras")
    with pytest.raises(PromptError, match="frame"):
        Prompts(frame="lps")
    with pytest.raises(PromptError, match="3 finite numbers"):
        Point((1.0, np.nan, 2.0))


def test_prompt_values_compare_and_slice_prompts_normalise():
    a = Prompts(points=(Point((1, 2, 3)),), box=Box((0, 0, 0), (1, 1, 1)))
    b = Prompts(points=(Point((1.0, 2.0, 3.0), True),), box=Box((0, 0, 0), (1, 1, 1), "ras"))
    assert a == b
    sp = SlicePrompts(index=np.int64(3), points_xy=[[1, 2]], point_labels=[1])
    assert sp.index == 3 and sp.points_xy.dtype == np.float32 and sp.num_points == 1
    with pytest.raises(PromptError, match="together"):
        SlicePrompts(index=0, points_xy=[[1, 2]])


def test_prompt_file_round_trip(tmp_path, awkward):
    prompts = Prompts(
        points=(Point((1.5, -2.0, 80.25)), Point((3.0, 4.0, 5.0), positive=False)),
        box=Box((0.0, 1.0, 2.0), (10.0, 11.0, 12.0)),
        orientation="sagittal",
        index=7,
    )
    path = tmp_path / "prompts.json"
    save_prompt_file(path, prompts)
    data = json.loads(path.read_text())
    assert data["frame"] == "ras" and data["slice"] == 7 and data["orientation"] == "sagittal"
    assert data["points"][1] == {"position": [3.0, 4.0, 5.0], "positive": False}
    assert load_prompt_file(path) == prompts


def test_prompt_file_slice_and_orientation_are_used(tmp_path, awkward):
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "frame": "kji",
                "orientation": "axial",
                "box": {"corners": [[5, 2, 4], [20, 7, 25]]},
                "slice": 6,
            }
        )
    )
    prompts = load_prompt_file(path)
    assert prompts_on_slice(prompts, awkward, plane_for(awkward, "axial")).index == 6
    with pytest.raises(PromptError, match="axial slice 6.*sliced sagittal"):
        prompts_on_slice(prompts, awkward, plane_for(awkward, "sagittal"))


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"frame": "lps", "points": [{"position": [0, 0, 0]}]}, "'frame'"),
        ({"orientation": "oblique", "points": [{"position": [0, 0, 0]}]}, "'orientation'"),
        ({"points": [{"positive": True}]}, r"'points\[0\]\.position'"),
        ({"points": [{"position": [0, 0]}]}, r"'points\[0\]\.position'"),
        ({"points": [{"position": [0, 0, 0], "positive": "yes"}]}, r"'points\[0\]\.positive'"),
        ({"points": [{"position": [0, 0, 0], "label": 1}]}, r"'points\[0\]\.label'"),
        ({"box": {"corners": [[0, 0, 0]]}}, "'box.corners'"),
        ({"box": {"corners": [[0, 0, 0], [1, "a", 1]]}}, r"'box\.corners\[1\]'"),
        ({"points": [{"position": [0, 0, 0]}], "slice": -1}, "'slice'"),
        ({"points": [{"position": [0, 0, 0]}], "point": []}, "'point'"),
        ({"frame": "ras"}, "no prompt"),
    ],
)
def test_prompt_file_errors_name_the_field(tmp_path, content, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(PromptError, match=field):
        load_prompt_file(path)


def test_prompt_file_that_is_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{points: [")
    with pytest.raises(PromptError, match="not valid JSON"):
        load_prompt_file(path)
    with pytest.raises(PromptError, match="cannot read"):
        load_prompt_file(tmp_path / "missing.json")
