"""Region-limited label writes, undo snapshots and IJK-to-RAS hand-over (SlicerSAM/editing.py)."""

from __future__ import annotations

import numpy as np
import pytest

from SlicerSAM import editing
from SlicerSAM.editing import Edit, Region, UndoStack
from SlicerSAM.errors import SlicerSAMError, VolumeError


class RecordingArray(np.ndarray):
    """An ndarray that records the index of every item assignment made on it."""

    def __new__(cls, array):
        obj = np.asarray(array).copy().view(cls)
        obj.writes = []
        return obj

    def __array_finalize__(self, obj):
        self.writes = getattr(obj, "writes", [])

    def __setitem__(self, key, value):
        self.writes.append(key)
        super().__setitem__(key, value)


@pytest.fixture
def labels():
    """Two labels (1 and 2) on an anisotropic (K, J, I) = (6, 9, 11) grid."""
    a = np.zeros((6, 9, 11), dtype=np.uint8)
    a[1:4, 2:6, 3:8] = 1
    a[2:5, 6:8, 1:4] = 2
    return a


# ---------------------------------------------------------------------------------------------
# Regions
# ---------------------------------------------------------------------------------------------
def test_region_extent_is_vtk_order_inclusive_i_first():
    region = Region((1, 2, 3), (4, 6, 8))
    assert region.shape == (3, 4, 5)
    assert region.size == 60
    assert region.extent == (3, 7, 2, 5, 1, 3)
    assert region.slices == (slice(1, 4), slice(2, 6), slice(3, 8))


def test_region_rejects_inverted_bounds():
    with pytest.raises(ValueError):
        Region((2, 0, 0), (1, 1, 1))


def test_bounding_region_and_union():
    mask = np.zeros((5, 5, 5), bool)
    assert editing.bounding_region(mask) is None
    mask[1, 2, 3] = mask[3, 0, 4] = True
    assert editing.bounding_region(mask) == Region((1, 0, 3), (4, 3, 5))
    a, b = Region((0, 0, 0), (1, 1, 1)), Region((2, 2, 2), (3, 4, 5))
    assert a.union(b) == Region((0, 0, 0), (3, 4, 5))
    assert a.union(None) == a


def test_slice_scope_along_each_axis():
    shape = (6, 9, 11)
    assert editing.slice_scope(0, 2, shape) == Region((2, 0, 0), (3, 9, 11))
    assert editing.slice_scope(1, 4, shape) == Region((0, 4, 0), (6, 5, 11))
    assert editing.slice_scope(2, 10, shape) == Region((0, 0, 10), (6, 9, 11))
    with pytest.raises(ValueError):
        editing.slice_scope(0, 6, shape)


# ---------------------------------------------------------------------------------------------
# Region-limited writes
# ---------------------------------------------------------------------------------------------
def test_write_touches_only_the_bounding_box_of_changed_voxels(labels):
    original = labels.copy()
    target = RecordingArray(labels)
    scope = editing.slice_scope(0, 2, labels.shape)
    mask = np.zeros(scope.shape, bool)
    mask[0, 3:5, 4:9] = True  # overlaps the existing label 1 at 3:5, 4:8; new at column 8
    region = editing.write_mask(target, mask, scope=scope, value=1, mode="replace", overwrite=False)

    # exactly one assignment, to the returned region
    assert target.writes == [region.slices]
    changed = editing.bounding_region(np.asarray(target) != original)
    assert region == changed
    # everything outside the region is byte-identical
    outside = np.ones(labels.shape, bool)
    outside[region.slices] = False
    assert np.array_equal(np.asarray(target)[outside], original[outside])
    # the other label is untouched everywhere
    assert np.array_equal(np.asarray(target) == 2, original == 2)


def test_replace_clears_only_own_label_inside_scope(labels):
    original = labels.copy()
    scope = editing.slice_scope(0, 2, labels.shape)
    editing.write_mask(labels, np.zeros(scope.shape, bool), scope=scope, value=1)
    assert not (labels[2] == 1).any()  # label 1 cleared on slice 2
    assert np.array_equal(labels[2] == 2, original[2] == 2)  # label 2 kept
    assert np.array_equal(labels[[0, 1, 3, 4, 5]], original[[0, 1, 3, 4, 5]])  # other slices


def test_overwrite_flag_protects_other_labels(labels):
    mask = np.zeros(labels.shape, bool)
    mask[3, 6:8, 1:4] = True  # all label 2 on slice 3
    kept = labels.copy()
    assert editing.write_mask(kept, mask, value=1, mode="add", overwrite=False) is None
    assert np.array_equal(kept, labels)
    over = labels.copy()
    region = editing.write_mask(over, mask, value=1, mode="add", overwrite=True)
    assert region == Region((3, 6, 1), (4, 8, 4))
    assert (over[3, 6:8, 1:4] == 1).all()


def test_add_and_remove_modes(labels):
    mask = np.zeros(labels.shape, bool)
    mask[0, 0, 0] = True
    mask[1, 2, 3] = True  # already label 1
    added = labels.copy()
    assert editing.write_mask(added, mask, mode="add") == Region((0, 0, 0), (1, 1, 1))
    removed = labels.copy()
    assert editing.write_mask(removed, mask, mode="remove") == Region((1, 2, 3), (2, 3, 4))
    assert removed[1, 2, 3] == 0 and removed[0, 0, 0] == 0


def test_plan_edit_does_not_modify_and_returns_none_without_change(labels):
    before = labels.copy()
    mask = labels == 1
    assert editing.plan_edit(labels, mask, value=1) is None
    mask[0, 0, 0] = True
    edit = editing.plan_edit(labels, mask, value=1, key=("seg", "s1"))
    assert np.array_equal(labels, before)
    assert edit.key == ("seg", "s1")
    assert edit.region == Region((0, 0, 0), (1, 1, 1))
    assert edit.before.tolist() == [[[0]]] and edit.after.tolist() == [[[1]]]
    assert edit.changed_voxels == 1


def test_two_dimensional_mask_for_a_one_slice_scope(labels):
    scope = editing.slice_scope(1, 0, labels.shape)  # (K, 1, I)
    mask2d = np.zeros((labels.shape[0], labels.shape[2]), bool)
    mask2d[5, 10] = True
    region = editing.write_mask(labels, mask2d, scope=scope, mode="add")
    assert region == Region((5, 0, 10), (6, 1, 11))
    assert labels[5, 0, 10] == 1


def test_mask_shape_mismatch_is_an_error(labels):
    with pytest.raises(ValueError):
        editing.plan_edit(labels, np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError):
        editing.plan_edit(labels, labels > 0, mode="invert")
    with pytest.raises(ValueError):
        editing.plan_edit(labels, labels > 0, value=0)


# ---------------------------------------------------------------------------------------------
# Undo
# ---------------------------------------------------------------------------------------------
def test_undo_restores_exactly_after_several_overlapping_edits():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, size=(7, 12, 10)).astype(np.uint8)
    original = labels.copy()
    stack = UndoStack(max_steps=20)
    for n, mode in enumerate(["replace", "add", "remove", "replace", "add"]):
        scope = editing.slice_scope(n % 3, 2 + n, labels.shape)
        mask = rng.random(scope.shape) > 0.5
        editing.write_mask(labels, mask, scope=scope, value=1 + n % 2, mode=mode, undo_stack=stack)
    assert not np.array_equal(labels, original)
    while stack.can_undo:
        editing.undo(labels, stack)
    assert labels.tobytes() == original.tobytes()
    assert editing.undo(labels, stack) is None


def test_one_step_of_several_edits_is_undone_together(labels):
    original = labels.copy()
    first = editing.plan_edit(labels, labels > 0, value=1, mode="replace")
    editing.apply_edit(labels, first)
    mask = np.zeros(labels.shape, bool)
    mask[0, 0, :3] = True
    second = editing.plan_edit(labels, mask, value=2, mode="add")
    editing.apply_edit(labels, second)
    stack = UndoStack()
    stack.push([first, second])
    assert len(stack) == 1
    region = editing.undo(labels, stack)
    assert region == first.region.union(second.region)
    assert np.array_equal(labels, original)


def test_undo_stack_is_bounded_in_steps_and_bytes():
    def edit(n, nbytes):
        block = np.zeros(nbytes // 2, dtype=np.uint8).reshape(1, 1, -1)
        return Edit(key=n, region=Region((0, 0, 0), block.shape), before=block, after=block)

    stack = UndoStack(max_steps=3)
    for n in range(5):
        stack.push(edit(n, 10))
    assert len(stack) == 3
    assert [step[0].key for step in [stack.pop(), stack.pop(), stack.pop()]] == [4, 3, 2]
    assert stack.pop() is None

    stack = UndoStack(max_steps=10, max_bytes=100)
    for n in range(4):
        stack.push(edit(n, 40))
    assert len(stack) == 2 and stack.nbytes <= 100
    stack.push(edit(9, 1000))  # larger than the budget: kept alone, the newest always survives
    assert len(stack) == 1 and stack.peek()[0].key == 9
    with pytest.raises(ValueError):
        UndoStack(max_steps=0)


def test_undo_stack_discard_drops_a_target():
    block = np.zeros((1, 1, 1), np.uint8)
    stack = UndoStack()
    stack.push([Edit("a", Region((0, 0, 0), (1, 1, 1)), block, block)])
    stack.push(
        [
            Edit("a", Region((0, 0, 0), (1, 1, 1)), block, block),
            Edit("b", Region((0, 0, 0), (1, 1, 1)), block, block),
        ]
    )
    stack.discard("a")
    assert len(stack) == 1 and [e.key for e in stack.peek()] == ["b"]
    stack.push([])  # empty steps are ignored
    assert len(stack) == 1


# ---------------------------------------------------------------------------------------------
# Slice masks -> block (needs the engine's SlicePlane)
# ---------------------------------------------------------------------------------------------
def _oblique_volume(shape=(5, 7, 9)):
    """A non-axis-aligned, anisotropic volume: spacing (si, sj, sk) = (0.8, 1.1, 3.0) mm."""
    from SlicerSAM.volume import Volume

    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([0.8, 1.1, 3.0])
    matrix[:3, 3] = (-12.0, 30.5, 7.25)
    return Volume(np.arange(np.prod(shape), dtype=np.int16).reshape(shape), matrix)


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_masks_to_block_matches_plane_stack(orientation):
    slicing = pytest.importorskip("SlicerSAM.slicing")
    volume = _oblique_volume()
    plane = slicing.plane_for(volume, orientation)
    rng = np.random.default_rng(3)
    masks = {i: rng.random(plane.grid_shape) > 0.5 for i in (1, 3)}
    scope, block = editing.masks_to_block(plane, masks, volume.shape)
    full = plane.stack(masks, dtype=bool)
    assert scope.shape[plane.axis] == 3  # slices 1..3, slice 2 empty but in scope
    assert np.array_equal(block, full[scope.slices])
    outside = np.ones(volume.shape, bool)
    outside[scope.slices] = False
    assert not full[outside].any()


# ---------------------------------------------------------------------------------------------
# IJK-to-RAS hand-over
# ---------------------------------------------------------------------------------------------
def test_as_ijk_to_ras_accepts_nested_and_flat_and_rejects_bad():
    m = np.arange(16, dtype=float).reshape(4, 4)
    m[3] = (0, 0, 0, 1)
    m[:3, :3] = np.diag([0.5, 2.0, 3.0])
    assert np.array_equal(editing.as_ijk_to_ras(m.tolist()), m)
    assert np.array_equal(editing.as_ijk_to_ras(m.ravel()), m)
    bad = m.copy()
    bad[3, 0] = 1
    for matrix in (bad, np.zeros((4, 4)), np.eye(3), np.full((4, 4), np.nan)):
        with pytest.raises(VolumeError):
            editing.as_ijk_to_ras(matrix)


def test_spacing_from_oblique_anisotropic_matrix_is_array_order():
    pytest.importorskip("SlicerSAM.volume")
    volume = _oblique_volume()
    assert editing.spacing_from_ijk_to_ras(volume.ijk_to_ras) == pytest.approx((3.0, 1.1, 0.8))
    assert editing.spacing_from_ijk_to_ras(volume.ijk_to_ras) == pytest.approx(volume.spacing)


def test_volume_from_arrays_copies_and_keeps_geometry():
    pytest.importorskip("SlicerSAM.volume")
    reference = _oblique_volume()
    slicer_array = np.array(reference.array)  # what arrayFromVolume hands over (a view there)
    volume = editing.volume_from_arrays(slicer_array, reference.ijk_to_ras.ravel().tolist())
    slicer_array[0, 0, 0] = 999  # Slicer reallocating/modifying its buffer must not leak in
    assert volume.array[0, 0, 0] == reference.array[0, 0, 0]
    assert volume.shape == (5, 7, 9)
    kji = np.array([[4.0, 6.0, 8.0], [0.0, 0.0, 0.0], [2.5, 1.0, 3.0]])
    ijk1 = np.c_[kji[:, ::-1], np.ones(3)]
    assert np.allclose(volume.kji_to_ras(kji), (ijk1 @ reference.ijk_to_ras.T)[:, :3])
    array, matrix = editing.arrays_from_volume(volume)
    assert np.array_equal(array, reference.array) and np.array_equal(matrix, reference.ijk_to_ras)
    with pytest.raises(VolumeError):
        editing.volume_from_arrays(np.zeros((4, 4)), np.eye(4))


def test_same_grid_tolerates_float_noise_only():
    pytest.importorskip("SlicerSAM.volume")
    volume = _oblique_volume()
    m = volume.ijk_to_ras
    noisy = m.copy()
    noisy[:3] += 1e-6  # a float round-trip through a file
    assert editing.same_grid(volume.shape, m, volume.shape, noisy)
    shifted = m.copy()
    shifted[0, 3] += 0.5
    assert not editing.same_grid(volume.shape, m, volume.shape, shifted)
    assert not editing.same_grid(volume.shape, m, (5, 7, 8), m)


def test_check_labels_on_grid():
    editing.check_labels_on_grid(np.zeros((2, 3, 4)), (2, 3, 4))
    with pytest.raises(SlicerSAMError):
        editing.check_labels_on_grid(np.zeros((2, 3, 5)), (2, 3, 4), "segment s")
