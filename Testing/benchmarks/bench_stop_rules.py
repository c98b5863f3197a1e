"""Replay stop rules on recorded keyslice-box walks: how much do stopping and prompting cost?

For every structure of ``../shared/data/ct-abdomen-3mm`` (>= 200 voxels) this runs the
``keyslice-box`` protocol once with ``stop=NO_STOP`` (every walk goes on until its mask is empty
or the volume ends), recording each visited slice's mask, predicted IoU and mask features
(``Segmenter.mask_features``). Stop rules only cut
a walk short, they never change its prompts, so any rule set can then be replayed on the
recording exactly, with the hysteresis of :func:`SlicerSAM.propagation.propagate`. It prints
the mean Dice over structures for

* ``no stop``: the walks as recorded;
* ``reference extent``: each walk cut at the first slice where the reference is empty;
* ``best cut (oracle)``: each walk cut where its structure's 3D Dice is highest (reads the
  reference: the most any stop rule could get from these prompts);
* ``default rules``: ``StopRules()``, the same with other predicted-IoU floors, and without the
  feature-similarity rule;
* leaks: slices predicted beyond the reference's extent (and which structures), and reference
  slices left without a mask, for no stop, the defaults without the feature rule and the defaults;
* the feature rule's two settings swept over the other default rules;
* two candidate signals from the model's logits, not adopted (``logit_signals``): a floor on
  SAM's stability score, and the predicted-IoU rule applied only where the mask's boundary is
  wide (low confidence that does not come from a small size);
* the best rule sets of a small grid (min_iou x patience x min_overlap x min_area_fraction x
  max_feature_drop).

docs/propagation.md ("Stopping") quotes its output. Run from the repository root:

    python Testing/benchmarks/bench_stop_rules.py [--axis axial] [--window 40,400]
        [--strategy "key_roi=0.15"] [--cache-dir DIR]

``--strategy`` holds ``PropagationStrategy`` keyword arguments (numbers, None, words such as
``grow_match=range``) over the default
``"adaptive"`` strategy. ``--cache-dir`` keeps the slice embeddings between runs.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, also when imported

from bench_common import case_parser, open_case  # noqa: E402

from SlicerSAM import protocols as P  # noqa: E402
from SlicerSAM.prompts import SlicePrompts  # noqa: E402
from SlicerSAM.propagation import (  # noqa: E402
    NO_STOP,
    STRATEGIES,
    StopRules,
    feature_similarity,
    propagate,
)


class _Recorder:
    """A segmenter that remembers (index, chosen mask, predicted IoU, mask features) of every
    call; the features (``Segmenter.mask_features``: vector and cells) are None for an empty mask
    or a segmenter without them."""

    def __init__(self, segmenter, timings=None):
        self._segmenter = segmenter
        self.calls = []
        # {index: (stability, boundary width)} of the chosen mask's logits (see logit_signals)
        self.signals = {}
        # {"segment": [ms, ...], "mask_features": [ms, ...]}: what the feature rule adds per slice
        self.timings = timings if timings is not None else {"segment": [], "mask_features": []}

    def __getattr__(self, name):
        return getattr(self._segmenter, name)

    def segment(self, index, prompts, multimask=None):
        t0 = time.perf_counter()
        result = self._segmenter.segment(index, prompts, multimask=multimask)
        self.timings["segment"].append((time.perf_counter() - t0) * 1000.0)
        best = int(result.best)
        iou = float(np.asarray(result.iou).reshape(-1)[best])
        mask = np.asarray(result.masks[best], dtype=bool)
        features = None
        if mask.any() and hasattr(self._segmenter, "mask_features"):
            t0 = time.perf_counter()
            features = self._segmenter.mask_features(index, mask)
            self.timings["mask_features"].append((time.perf_counter() - t0) * 1000.0)
        self.calls.append((index, mask, iou, features))
        low_res = getattr(result, "low_res_logits", None)
        if low_res is not None:
            self.signals[index] = logit_signals(np.asarray(low_res)[best])
        return result


def logit_signals(logits: np.ndarray):
    """(stability, boundary width) of one mask's (256, 256) low-res logits: the stability score
    of SAM's automatic mask generator, area(logits > 1) / area(logits > -1), and the same band
    per pixel of the mask's outline, (area(> -1) - area(> 1)) / outline pixels of (> 0), a
    boundary width in low-res pixels that does not shrink with the mask's size. (1.0, 0.0) for
    an empty mask. Candidate stop signals (docs/propagation.md, "When a walk stops")."""
    inner, outer, mask = logits > 1.0, logits > -1.0, logits > 0.0
    if not outer.any() or not mask.any():
        return 1.0, 0.0
    core = mask.copy()
    core[1:] &= mask[:-1]
    core[:-1] &= mask[1:]
    core[:, 1:] &= mask[:, :-1]
    core[:, :-1] &= mask[:, 1:]
    outline = int(np.count_nonzero(mask & ~core))
    band = int(np.count_nonzero(outer)) - int(np.count_nonzero(inner))
    return float(np.count_nonzero(inner)) / float(np.count_nonzero(outer)), band / max(outline, 1)


def record_walks(segmenter, reference, names, strategy, timings=None, signals=None):
    """{name: (key call, walk down, walk up, reference grids)} for every structure; ``timings``
    (a dict of lists, see ``_Recorder``) collects the call times, ``signals`` (a dict) each
    structure's {index: (stability, boundary width)}."""
    plane = segmenter.plane
    walks = {}
    for label, name, _ in P.select_structures(reference, names, 200):
        mask3d = reference == label
        key = P.largest_slice(plane, mask3d)
        box = P.reference_box(plane, np.asarray(plane.grid(mask3d, key), dtype=bool))
        recorder = _Recorder(segmenter, timings)
        propagate(recorder, {key: SlicePrompts(key, box_xyxy=box)}, strategy=strategy, stop=NO_STOP)
        key_call, rest = recorder.calls[0], recorder.calls[1:]
        down = [c for c in rest if c[0] < key]
        up = [c for c in rest if c[0] > key]
        refs = {k: np.asarray(plane.grid(mask3d, k), dtype=bool) for k in range(plane.num_slices)}
        walks[name] = (key_call, down, up, refs)
        if signals is not None:
            signals[name] = recorder.signals
    return walks


def replay(walk, rules: StopRules, extra=None):
    """{slice: mask} that ``propagate`` would return with ``rules`` (same hysteresis, overlap
    with the last accepted mask, feature similarity to the last non-empty mask against the median
    of the accepted steps). ``extra(index, mask, iou) -> bool``, if given, is one more rule: a
    non-empty slice for which it is true fails too (a candidate rule, measured before it is
    written into StopRules)."""
    (key_index, key_mask, _, key_features), down, up, _ = walk
    key_area = int(key_mask.sum())
    out = {key_index: key_mask}
    for calls in (down, up):
        # the overlap baseline is the last accepted mask, the similarity's the last non-empty one
        good, pending, previous_features, similarities = key_mask, [], key_features, []
        for index, mask, iou, features in calls:
            similarity = None
            if rules.max_feature_drop is not None and features is not None:
                if previous_features is not None:
                    similarity = feature_similarity(features, previous_features, rules)
            typical = float(np.median(similarities)) if similarities else None
            if features is not None:
                previous_features = features
            failed = rules.failures(mask, good, iou, key_area, similarity, typical)
            if not failed and extra is not None and mask.any():
                failed = bool(extra(index, mask, iou))
            if failed:
                pending.append((index, mask))
                if len(pending) >= rules.patience:
                    pending = []
                    break
            else:
                out.update({i: m for i, m in pending if m.any()})
                pending = []
                if mask.any():
                    out[index] = mask
                    good = mask
                if similarity is not None:
                    similarities.append(similarity)
        out.update({i: m for i, m in pending if m.any()})
    return out


def cut_at_reference_extent(walk):
    (key_index, key_mask, _, _), down, up, refs = walk
    out = {key_index: key_mask}
    for calls in (down, up):
        for index, mask, _, _ in calls:
            if not refs[index].any():
                break
            out[index] = mask
    return out


def best_cut(walk):
    """The walk cut where it scores best: in each direction the prefix (possibly empty) that,
    together with the other direction's, maximises the structure's 3D Dice. An oracle (it reads
    the reference): the most any stop rule could get from these prompts."""
    (key_index, key_mask, _, _), down, up, refs = walk
    ref_total = sum(int(r.sum()) for r in refs.values())

    def prefix_sums(calls):  # (intersection, area) of the first n slices, n = 0..len(calls)
        inter, area = [0], [0]
        for index, mask, _, _ in calls:
            inter.append(inter[-1] + int(np.logical_and(mask, refs[index]).sum()))
            area.append(area[-1] + int(mask.sum()))
        return inter, area

    key_inter = int(np.logical_and(key_mask, refs[key_index]).sum())
    key_area = int(key_mask.sum())
    (di, da), (ui, ua) = prefix_sums(down), prefix_sums(up)
    best, best_n = -1.0, (0, 0)
    for n_down in range(len(di)):
        for n_up in range(len(ui)):
            total = key_area + da[n_down] + ua[n_up] + ref_total
            score = 2.0 * (key_inter + di[n_down] + ui[n_up]) / total if total else 1.0
            if score > best + 1e-12:
                best, best_n = score, (n_down, n_up)
    out = {key_index: key_mask}
    out.update({c[0]: c[1] for c in down[: best_n[0]]})
    out.update({c[0]: c[1] for c in up[: best_n[1]]})
    return out


def dice3d(masks, refs) -> float:
    inter = sum(int(np.logical_and(m, refs[i]).sum()) for i, m in masks.items())
    total = sum(int(m.sum()) for m in masks.values()) + sum(int(r.sum()) for r in refs.values())
    return 2.0 * inter / total if total else 1.0


def leaks(walks, rules: StopRules):
    """(slices predicted where the reference is empty, the structures with such slices,
    reference slices left without a mask) over all walks replayed with ``rules``."""
    outside, leaking, given_up = 0, [], 0
    for name, walk in walks.items():
        masks, refs = replay(walk, rules), walk[3]
        extra = sum(1 for index in masks if not refs[index].any())
        outside += extra
        if extra:
            leaking.append(name)
        given_up += sum(1 for index, ref in refs.items() if ref.any() and index not in masks)
    return outside, leaking, given_up


def mean_dice(walks, choose) -> float:
    return float(np.mean([dice3d(choose(w), w[3]) for w in walks.values()]))


def _strategy(text: str):
    base = STRATEGIES["adaptive"]
    if not text:
        return base
    kwargs = {}
    for item in text.split(","):
        key, value = (part.strip() for part in item.split("="))
        try:
            kwargs[key] = None if value == "None" else float(value)
        except ValueError:  # a word, e.g. grow_match=range
            kwargs[key] = value
    return replace(base, **kwargs)


def main(argv=None) -> int:
    parser = case_parser(__doc__.split("\n")[0])
    parser.add_argument("--strategy", default="", help='e.g. "key_roi=0.15,grow_fraction=0.1"')
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    case = open_case(args)
    if case is None:
        return 2
    segmenter, reference, names = case
    timings = {"segment": [], "mask_features": []}
    signals = {}
    walks = record_walks(segmenter, reference, names, _strategy(args.strategy), timings, signals)
    print(
        f"{len(walks)} structures, {args.axis}, window {args.window}, strategy "
        f"{args.strategy or 'adaptive'} ({time.perf_counter() - t0:.0f} s)"
    )
    seg_ms, feat_ms = (float(np.median(timings[k])) for k in ("segment", "mask_features"))
    print(
        f"median per slice: segment {seg_ms:.1f} ms ({len(timings['segment'])} calls), "
        f"mask_features {feat_ms:.2f} ms ({len(timings['mask_features'])} calls, "
        f"{100.0 * feat_ms / seg_ms:.1f} % of a segment call)"
    )
    print(f"no stop           {mean_dice(walks, lambda w: replay(w, NO_STOP)):.4f}")
    print(f"reference extent  {mean_dice(walks, cut_at_reference_extent):.4f}")
    print(f"best cut (oracle) {mean_dice(walks, best_cut):.4f}")
    print(f"default rules     {mean_dice(walks, lambda w: replay(w, StopRules())):.4f}")
    floors = (0.6, 0.62, 0.65, 0.68, 0.7, 0.75)  # the default is 0.65
    scores = [mean_dice(walks, lambda w, f=f: replay(w, StopRules(min_iou=f))) for f in floors]
    print(
        f"  predicted-IoU floor {' / '.join(map(str, floors))}: "
        + " / ".join(f"{v:.4f}" for v in scores)
    )
    without = StopRules(max_feature_drop=None)
    print(f"  without features {mean_dice(walks, lambda w: replay(w, without)):.4f}")
    for label, rules in (
        ("no stop", NO_STOP),
        ("without features", without),
        ("defaults", StopRules()),
    ):
        outside, leaking, given_up = leaks(walks, rules)
        print(
            f"leaks, {label}: {outside} slices outside the reference's extent in "
            f"{len(leaking)} structures ({', '.join(leaking)}); {given_up} reference slices "
            "without a mask"
        )
    print("feature rule over the other default rules (rows: max_feature_drop; columns:")
    print("feature_min_cells):")
    cells = (0, 8, 24, 48)
    print("        " + "".join(f"{c:>8}" for c in cells))
    for drop in (0.04, 0.05, 0.06, 0.08, 0.1):
        rule_sets = [StopRules(max_feature_drop=drop, feature_min_cells=c) for c in cells]
        scores = [mean_dice(walks, lambda w, r=rules: replay(w, r)) for rules in rule_sets]
        print(f"  {drop:<6}" + "".join(f"{v:8.4f}" for v in scores))

    # candidate signals from the logits (not adopted; docs/propagation.md, "When a walk stops")
    def with_signal(rules, test):
        return lambda w, name: replay(w, rules, lambda i, m, iou: test(signals[name][i], iou))

    def mean_dice_named(choose):
        return float(np.mean([dice3d(choose(w, n), w[3]) for n, w in walks.items()]))

    floors = (0.55, 0.6, 0.65)
    scores = [
        mean_dice_named(with_signal(StopRules(), lambda sig, iou, t=t: sig[0] < t)) for t in floors
    ]
    joined = " / ".join(f"{v:.4f}" for v in scores)
    print(f"defaults + stability below {' / '.join(map(str, floors))}: {joined}")
    widths = (1.2, 1.6, 2.0)
    no_iou = StopRules(min_iou=None)
    scores = [
        mean_dice_named(with_signal(no_iou, lambda sig, iou, t=t: iou < 0.7 and sig[1] > t))
        for t in widths
    ]
    joined = " / ".join(f"{v:.4f}" for v in scores)
    print(
        "predicted IoU < 0.7 only where the boundary is wider than "
        f"{' / '.join(map(str, widths))} px: {joined}"
    )
    grid = []
    for min_iou, patience, min_overlap, min_area, drop in itertools.product(
        (None, 0.6, 0.65, 0.7, 0.75, 0.8),
        (1, 2, 3),
        (None, 0.3, 0.5),
        (None, 0.1, 0.2, 0.3),
        (None, 0.04, 0.06, 0.08, 0.1),
    ):
        rules = StopRules(
            min_iou=min_iou,
            patience=patience,
            min_overlap=min_overlap,
            min_area_fraction=min_area,
            max_feature_drop=drop,
        )
        grid.append((mean_dice(walks, lambda w, r=rules: replay(w, r)), rules))
    grid.sort(key=lambda item: -item[0])
    for score, rules in grid[:5]:
        print(
            f"best grid rules   {score:.4f}  min_iou={rules.min_iou} patience={rules.patience} "
            f"min_overlap={rules.min_overlap} min_area_fraction={rules.min_area_fraction} "
            f"max_feature_drop={rules.max_feature_drop}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
