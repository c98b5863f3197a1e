"""Prompt-to-mask on one slice at a time, with lazily computed, cached slice embeddings.

A :class:`Segmenter` binds a volume, a SAM-family model, a slicing orientation and an intensity
mapping. Nothing is encoded up front: the first prompt on a slice encodes that slice only (the
image encoder is the expensive step), later prompts on it reuse the cached embedding and run the
light prompt encoder and mask decoder alone. Embeddings live in an
:class:`~SlicerSAM.cache.EmbeddingCache` (private by default; share one between segmenters, e.g.
the GUI's, to keep embeddings across prompts, orientations and windowings).

Per slice, encoding is: ``plane.grid`` (the oriented voxel grid) -> ``plane.to_image`` (square
pixels) -> ``intensity.apply`` (to uint8 with bounds computed once per segmenter) -> 3 channels
-> ``predictor.encode``. Masks come back on the slice grid directly (``predict(output_size=
plane.grid_shape)``), so they can be written into the label volume with ``plane.set_grid``.

Clicks on a box-trained model (LiteMedSAM, MedSAM): the model was never shown a point, so
``point_prompts="auto"`` turns clicks given without a box into the box around them that the
model is surest of (:mod:`SlicerSAM.box_search`); models trained with points get the clicks.

Thread safety: ``segment``/``embedding`` may be called from several threads; each slice is encoded
at most once even when a foreground call and the background prefetch want it at the same time
(per-key in-flight tracking), and the predictor's state (``set_embedding`` + ``predict``) is held
under a lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from SlicerSAM.box_search import POINT_PROMPTS
from SlicerSAM.box_search import BoxCandidate as BoxCandidateLike
from SlicerSAM.cache import CacheKey, EmbeddingCache
from SlicerSAM.errors import PromptError
from SlicerSAM.intensity import IntensityMapping, model_image
from SlicerSAM.prompts import Prompts, SlicePrompts, prompts_on_slice
from SlicerSAM.slicing import plane_for

logger = logging.getLogger(__name__)

# Set when the interpreter shuts down: concurrent.futures joins its worker threads at exit, so a
# prefetch of 100 slices would otherwise delay the exit until it has encoded them all. Threading's
# exit hooks run newest first, so this one runs before the executor's join.
_SHUTTING_DOWN = threading.Event()
getattr(threading, "_register_atexit", lambda fn: None)(_SHUTTING_DOWN.set)


# A correction prefers the masks that keep at least this fraction of the mask it corrects: a
# positive click says "this too", not "something else"; a negative click inside a one-piece mask
# trims it when a candidate keeps this much of it, and otherwise rejects the whole mask (a click
# at the middle of a mask leaves no box that holds half of it).
KEEP_FRACTION = 0.5

# A correction with positive clicks only grows the mask by the candidate that wins (their union)
# instead of replacing the mask by it: the clicks add, and take away nothing they did not point at
# (docs/prompts.md, "Corrections"; what it is worth: docs/propagation.md, "Corrections").
POSITIVE_CORRECTIONS_GROW = True


def _without_clicked_parts(mask: np.ndarray, negative: np.ndarray) -> Optional[np.ndarray]:
    """``mask`` (H, W bool) without its connected parts (8-connected) under the negative clicks
    (N, 2) (x, y), when it is in several parts and some part is left; else None."""
    from scipy import ndimage

    parts, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n < 2:
        return None
    cols = np.clip(np.rint(negative[:, 0]).astype(int), 0, mask.shape[1] - 1)
    rows = np.clip(np.rint(negative[:, 1]).astype(int), 0, mask.shape[0] - 1)
    hit = {int(v) for v in parts[rows, cols] if v}
    if not hit:
        return None
    left = mask & ~np.isin(parts, sorted(hit))
    return left if left.any() else None


# Decodes the box search keeps (a slice's candidates and their re-prompts: 11 per click set);
# each holds a mask and 256 x 256 float32 logits, about 0.5 MB for a 512 x 512 slice.
_BOX_MEMO_SIZE = 44


@dataclass(frozen=True, eq=False)
class SliceResult:
    """The masks SAM returned for one slice's prompts, on the slice grid.

    masks (C, rows, cols) bool; iou (C,) predicted IoU; best: the chosen mask (argmax(iou) for
    the model's own candidates); low_res_logits (C, 256, 256) float32 (feed
    ``low_res_logits[best][None]`` back as ``SlicePrompts.mask_logits`` to refine);
    boxes_xyxy (C, 4) float32, model-image pixels: the box each mask was decoded from (the box
    prompt, or the box the segmenter chose for clicks on a box-trained model); None when no box
    was involved. searched: True when the segmenter chose the best mask's box itself (clicks
    on a box-trained model) rather than taking the box prompt as given. Propagation calibrates
    its box margins against a given box only: a searched box is loose by design.
    """

    index: int
    masks: np.ndarray
    iou: np.ndarray
    best: int
    low_res_logits: np.ndarray
    boxes_xyxy: Optional[np.ndarray] = None
    searched: bool = False

    @property
    def mask(self) -> np.ndarray:
        """The chosen mask (rows, cols) bool."""
        return self.masks[self.best]

    @property
    def best_logits(self) -> np.ndarray:
        """Low-res logits (1, 256, 256) of the chosen mask, ready as a mask prompt."""
        return self.low_res_logits[self.best][None]


@dataclass(frozen=True)
class SegmenterStats:
    """Counters and timings of one segmenter (a snapshot)."""

    slices_encoded: int = 0  # image-encoder runs (cache misses)
    encode_ms: float = 0.0  # total, including slice extraction and intensity mapping
    embedding_hits: int = 0  # embeddings served by the cache
    decodes: int = 0  # prompt -> mask runs
    decode_ms: float = 0.0  # total


def _model_identity(sam) -> tuple:
    """(model name, checkpoint sha256) for the cache key of a given Sam instance."""
    spec = getattr(sam, "spec", None)
    name = getattr(spec, "name", None) or type(sam).__name__
    sha = getattr(sam, "checkpoint_sha256", None)
    if not sha:
        # Unknown weights (a model built in code): a per-instance identity, so two different
        # models never share embeddings; such entries are useless on disk across processes.
        sha = getattr(sam, "_slicersam_identity", None)
        if sha is None:
            sha = f"unverified-{uuid.uuid4().hex}"
            try:
                sam._slicersam_identity = sha
            except AttributeError:
                pass
    return str(name), str(sha)


class Segmenter:
    """Segment one slice at a time from prompts (see the module docstring).

    Args:
        volume: the :class:`~SlicerSAM.volume.Volume` to segment.
        model: a model name from ``sam_core.zoo.MODEL_SPECS`` (loaded here), or a loaded ``Sam``.
        orientation: "axial" | "coronal" | "sagittal" slicing.
        intensity: how voxel values map to the model's uint8 image.
        device: "auto" | "cpu" | "cuda" | "cuda:N" | "mps"; for a given ``Sam`` instance, "auto"
            keeps it where it is and anything else moves it there.
        cache: an embedding cache to share; None creates a private one.
        checkpoint: checkpoint path when ``model`` is a name (None: the zoo's default location).
        point_prompts: what clicks given without a box become. "box": the box around them that
            the model is surest of (:mod:`SlicerSAM.box_search`); "model": the model's own
            point prompts; "auto": "box" for a model trained with boxes only (its
            ``ModelSpec.point_prompts`` is False: LiteMedSAM, MedSAM), else "model".
        backend, precision: the image encoder's runtime (:mod:`SlicerSAM.backends`): "torch" |
            "openvino" | "onnxruntime" and "fp32" | "bf16" | "fp16", or "auto" (None:
            ``$SLICERSAM_BACKEND`` / ``$SLICERSAM_PRECISION``, else auto). ``self.runtime`` and
            ``self.runtime_reason`` say what was chosen and why.
        onnx_dir: a folder from ``export-onnx`` for the ONNX backends (None: exported once into
            the user cache).
        runtime_progress: ``progress(done, total, message)`` while auto calibrates (first use).
    """

    def __init__(
        self,
        volume,
        model="litemedsam",
        *,
        orientation: str = "axial",
        intensity: Optional[IntensityMapping] = None,
        device="auto",
        cache: Optional[EmbeddingCache] = None,
        checkpoint=None,
        point_prompts: str = "auto",
        backend: Optional[str] = None,
        precision: Optional[str] = None,
        onnx_dir=None,
        runtime_progress=None,
    ):
        from sam_core.predictor import SamPredictor
        from SlicerSAM.backends import requested

        requested(backend, precision)  # an unknown name is refused before the model loads

        if isinstance(model, str):
            from sam_core.zoo import load_model

            sam = load_model(model, checkpoint, device=device)
            name = model
            _, sha = _model_identity(sam)
        else:
            sam = model
            if device not in (None, "auto"):
                from sam_core.device import select_device

                sam = sam.to(select_device(device))
            name, sha = _model_identity(sam)
        if point_prompts not in POINT_PROMPTS:
            raise ValueError(
                f"point_prompts must be one of {', '.join(POINT_PROMPTS)}, got {point_prompts!r}"
            )
        if point_prompts == "auto":
            # a model built in code (no spec) is taken at its word: it gets the points
            trained = getattr(getattr(sam, "spec", None), "point_prompts", True)
            point_prompts = "model" if trained else "box"
        self.point_prompts = point_prompts
        self.sam = sam
        self.model_name = name
        self.checkpoint_sha256 = sha
        self.predictor = SamPredictor(sam)
        self.device = torch.device(self.predictor.device)
        from SlicerSAM.backends import choose_runtime

        choice = choose_runtime(
            sam,
            (name, sha),
            backend,
            precision,
            onnx_dir,
            threads=getattr(self.predictor, "encode_threads", None),
            progress=runtime_progress,
        )
        self.predictor.encoder = choice.encoder
        self.runtime = choice.runtime  # sam_core.runtimes.Runtime of the image encoder
        self.runtime_reason = choice.reason
        logger.info(choice.reason)
        self.volume = volume
        self.orientation = orientation
        self.plane = plane_for(volume, orientation)
        self.intensity = intensity if intensity is not None else IntensityMapping()
        self.cache = cache if cache is not None else EmbeddingCache()

        self._bounds = None
        self._bounds_lock = threading.Lock()
        self._predict_lock = threading.Lock()  # predictor state: set_embedding + predict
        # box -> decode of the box search's recent candidates (held under _predict_lock)
        self._box_memo: OrderedDict = OrderedDict()
        self._inflight_lock = threading.Lock()
        self._inflight: Dict[CacheKey, Future] = {}
        self._stats_lock = threading.Lock()
        self._stats = SegmenterStats()
        self._executor: Optional[ThreadPoolExecutor] = None
        self._prefetch_jobs: List[tuple] = []  # (future, cancel event)
        # the key's fixed part: everything except the slice index
        self._key_base = dict(
            volume_digest=volume.digest(),
            orientation=self.plane.orientation,
            axis=int(self.plane.axis),
            intensity=self.intensity.signature(),
            model=self.model_name,
            checkpoint_sha256=self.checkpoint_sha256,
            precision=self.runtime.precision,
        )

    # ------------------------------------------------------------------ introspection
    @property
    def num_slices(self) -> int:
        return int(self.plane.num_slices)

    @property
    def stats(self) -> SegmenterStats:
        with self._stats_lock:
            return self._stats

    def timing(self) -> dict:
        """{"slices_encoded", "encode_ms_per_slice", "decode_ms_per_prompt"} (ms, rounded)."""
        s = self.stats
        return {
            "slices_encoded": s.slices_encoded,
            "encode_ms_per_slice": round(s.encode_ms / s.slices_encoded, 2)
            if s.slices_encoded
            else None,
            "decode_ms_per_prompt": round(s.decode_ms / s.decodes, 2) if s.decodes else None,
        }

    def _add_stats(self, **deltas) -> None:
        with self._stats_lock:
            values = {k: getattr(self._stats, k) + v for k, v in deltas.items()}
            self._stats = SegmenterStats(**{**self._stats.__dict__, **values})

    def check_index(self, index) -> int:
        """``index`` as an int in [0, num_slices), else PromptError."""
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise PromptError(f"slice index must be an integer, got {index!r}")
        index = int(index)
        if not 0 <= index < self.num_slices:
            raise PromptError(
                f"slice index {index} is outside the volume: {self.plane.orientation} slices run "
                f"0..{self.num_slices - 1}"
            )
        return index

    def cache_key(self, index: int) -> CacheKey:
        return CacheKey(index=self.check_index(index), **self._key_base)

    # ------------------------------------------------------------------ images and embeddings
    def intensity_bounds(self):
        """(lo, hi) of the intensity mapping, computed once per segmenter (percentiles: costly)."""
        with self._bounds_lock:
            if self._bounds is None:
                self._bounds = self.intensity.bounds(self.volume)
            return self._bounds

    def model_image(self, index: int) -> np.ndarray:
        """The (H, W, 3) uint8 image the model sees for slice ``index``."""
        index = self.check_index(index)
        return model_image(self.plane, self.volume, index, self.intensity, self.intensity_bounds())

    def embedding(self, index: int):
        """The ImageEmbedding of slice ``index``: from the cache, else encoded now (and cached)."""
        return self._embeddings([self.check_index(index)], batch_size=1)[0][0]

    def encode_many(self, indices: Iterable[int], batch_size: Optional[int] = None) -> list:
        """Embeddings of several slices, encoding the missing ones in batches (GPU throughput).

        ``batch_size`` defaults to 8 on a GPU and 1 on the CPU (where batching gains nothing and
        delays the first result). Returns the embeddings in the order of ``indices``.
        """
        indices = [self.check_index(i) for i in indices]
        if batch_size is None:
            batch_size = 1 if self.device.type == "cpu" else 8
        return self._embeddings(indices, batch_size=max(1, int(batch_size)))[0]

    def _claim(self, key: CacheKey):
        """(future, True) when this thread must encode ``key``; (future, False) to wait on it."""
        with self._inflight_lock:
            fut = self._inflight.get(key)
            if fut is not None:
                return fut, False
            fut = Future()
            self._inflight[key] = fut
            return fut, True

    def _release(self, key: CacheKey) -> None:
        with self._inflight_lock:
            self._inflight.pop(key, None)

    def _embeddings(self, indices: Sequence[int], batch_size: int) -> Tuple[list, int]:
        """(embeddings in the order of ``indices``, number of slices this call encoded)."""
        found: Dict[int, object] = {}
        mine: List[tuple] = []  # (index, key, future) this call encodes
        theirs: List[tuple] = []  # (index, future) another thread is encoding
        for index in dict.fromkeys(indices):  # unique, in order
            key = self.cache_key(index)
            emb = self.cache.get(key, device=self.device)
            if emb is None:
                fut, owner = self._claim(key)
                if not owner:
                    theirs.append((index, fut))
                    continue
                # finished by another thread between our miss and our claim?
                emb = self.cache.get(key, device=self.device) if key in self.cache else None
                if emb is None:
                    mine.append((index, key, fut))
                    continue
                fut.set_result(emb)
                self._release(key)
            found[index] = emb
            self._add_stats(embedding_hits=1)
        try:
            for start in range(0, len(mine), batch_size):
                batch = mine[start : start + batch_size]
                embeddings = self._encode([index for index, _, _ in batch])
                for (index, key, fut), emb in zip(batch, embeddings):
                    # use exactly what the cache holds (float16-rounded): the first and every
                    # later prompt on this slice see the same embedding
                    stored = self.cache.put(key, emb, device=self.device)
                    found[index] = stored
                    fut.set_result(stored)
                    self._release(key)
        except BaseException as exc:
            for _, key, fut in mine:
                if not fut.done():
                    fut.set_exception(exc)
                self._release(key)
            raise
        for index, fut in theirs:
            found[index] = fut.result()
        return [found[index] for index in indices], len(mine)

    def _encode(self, indices: Sequence[int]) -> list:
        t0 = time.perf_counter()
        images = [self.model_image(index) for index in indices]
        if len(images) == 1:
            embeddings = [self.predictor.encode(images[0])]
        else:
            embeddings = list(self.predictor.encode_batch(images))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest timings: kernels run asynchronously
        ms = (time.perf_counter() - t0) * 1000.0
        self._add_stats(slices_encoded=len(indices), encode_ms=ms)
        self.cache.count_encode(len(indices))
        logger.debug("encoded %s slice(s) %s in %.1f ms", self.plane.orientation, indices, ms)
        return embeddings

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, indices: Iterable[int]) -> Future:
        """Encode ``indices`` in the background (one worker thread), nearest-first as given.

        A new call supersedes (cancels) earlier prefetches. Returns a Future of the number of
        slices encoded. Foreground calls never encode a slice the worker is encoding: they wait
        for its result instead.
        """
        indices = [self.check_index(i) for i in indices]
        self.cancel_prefetch(wait=False)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="slicersam-prefetch"
            )
        cancel = threading.Event()
        fut = self._executor.submit(self._prefetch_job, indices, cancel)
        self._prefetch_jobs = [(f, e) for f, e in self._prefetch_jobs if not f.done()]
        self._prefetch_jobs.append((fut, cancel))
        return fut

    def _prefetch_job(self, indices: List[int], cancel: threading.Event) -> int:
        done = 0
        for index in indices:
            if cancel.is_set() or _SHUTTING_DOWN.is_set():
                break
            if self.cache_key(index) in self.cache:  # no counters touched for a mere check
                continue
            try:
                done += self._embeddings([index], batch_size=1)[1]
            except Exception:  # a background failure must not go unnoticed, nor kill the GUI
                logger.exception("prefetch of %s slice %d failed", self.plane.orientation, index)
                break
        return done

    def cancel_prefetch(self, wait: bool = True) -> None:
        """Stop background encoding after the slice in progress (which is cached normally)."""
        jobs, self._prefetch_jobs = self._prefetch_jobs, []
        for fut, cancel in jobs:
            cancel.set()
            fut.cancel()  # a job not started yet never starts
        if wait:
            for fut, _ in jobs:
                if not fut.cancelled():
                    try:
                        fut.result()
                    except Exception:
                        pass

    def close(self) -> None:
        """Cancel prefetching and stop the worker thread."""
        self.cancel_prefetch(wait=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ prompts -> masks
    @contextlib.contextmanager
    def predictor_on(self, embedding):
        """The predictor with ``embedding`` set, held for this thread alone (the predictor's
        state is shared by every prompt on any slice): ``with seg.predictor_on(emb) as p:``."""
        with self._predict_lock:
            self.predictor.set_embedding(embedding)
            yield self.predictor

    def _mask_prompt_logits(self, mask: np.ndarray) -> np.ndarray:
        if tuple(mask.shape) != tuple(self.plane.grid_shape):
            raise PromptError(
                f"mask prompt shape {mask.shape} differs from the {self.plane.orientation} slice "
                f"grid {tuple(self.plane.grid_shape)} (rows, cols)"
            )
        image = self.plane.to_image(mask.astype(np.float32), order=1) >= 0.5
        return np.asarray(self.predictor.mask_to_low_res(image), dtype=np.float32)

    def segment(
        self,
        index: int,
        prompts: SlicePrompts,
        multimask: Optional[bool] = None,
        max_area: Optional[float] = None,
    ) -> SliceResult:
        """Masks for ``prompts`` on slice ``index`` (encoding the slice first if needed).

        Args:
            index: slice index along the plane; must equal ``prompts.index``.
            prompts: model-image prompts of that slice (``prompts_on_slice`` makes them).
            multimask: ask SAM for 3 candidates; None: only for an ambiguous prompt (a single
                point with no box and no mask), as SAM's authors recommend.
            max_area: the largest plausible mask (pixels of the slice grid) for clicks on a
                box-trained model: larger candidates rank after the others that honour as many
                clicks (the session derives it from the neighbouring slices' masks).

        Raises:
            PromptError: index outside [0, num_slices), prompts of another slice, or no prompt.
        """
        index = self.check_index(index)
        if not isinstance(prompts, SlicePrompts):
            raise PromptError(
                f"segment() takes SlicePrompts (see prompts_on_slice), got {type(prompts).__name__}"
            )
        if prompts.index != index:
            raise PromptError(f"the prompts are for slice {prompts.index}, not slice {index}")
        if prompts.is_empty:
            raise PromptError(f"no prompt for slice {index}: give points, a box or a mask")
        if multimask is None:
            multimask = (
                prompts.num_points == 1
                and prompts.box_xyxy is None
                and prompts.mask_logits is None
                and prompts.mask is None
            )
        embedding = self.embedding(index)
        if self.point_prompts == "box" and prompts.points_xy is not None:
            return self._segment_clicks_as_box(index, prompts, embedding, bool(multimask), max_area)
        t0 = time.perf_counter()
        with self.predictor_on(embedding):  # first: mask_to_low_res uses its frame
            mask_input = prompts.mask_logits
            if mask_input is None and prompts.mask is not None:
                mask_input = self._mask_prompt_logits(prompts.mask)
            masks, iou, low_res = self.predictor.predict(
                point_coords=prompts.points_xy,
                point_labels=prompts.point_labels,
                box=prompts.box_xyxy,
                mask_input=mask_input,
                multimask_output=bool(multimask),
                output_size=tuple(int(n) for n in self.plane.grid_shape),
            )
        ms = (time.perf_counter() - t0) * 1000.0
        self._add_stats(decodes=1, decode_ms=ms)
        iou = np.asarray(iou, dtype=np.float32).reshape(-1)
        boxes = None
        if prompts.box_xyxy is not None:  # every candidate answers the one box given
            boxes = np.repeat(np.asarray(prompts.box_xyxy, dtype=np.float32)[None], len(iou), 0)
        return SliceResult(
            index=index,
            masks=np.asarray(masks).astype(bool, copy=False),
            iou=iou,
            best=int(np.argmax(iou)),
            low_res_logits=np.asarray(low_res, dtype=np.float32),
            boxes_xyxy=boxes,
        )

    def _segment_clicks_as_box(
        self,
        index: int,
        prompts: SlicePrompts,
        embedding,
        multimask: bool,
        max_area: Optional[float] = None,
    ) -> SliceResult:
        """Clicks on a box-trained model: the clicks choose among boxes (module docstring).

        - Clicks alone: :func:`SlicerSAM.box_search.search_box`, the box around them that the
          model is surest of (inside ``prompts.bounds_xyxy`` when given, as every box here).
        - Clicks with a box (a box drawn on the slice, or a 3D ROI's rectangle): the box's own
          mask when it honours every click, so a click inside a box never changes a mask that
          already agrees with it; otherwise the box, the candidate boxes around the positive
          clicks clipped to it and the box cut at each negative click compete.
        - Clicks with a mask (``SlicePrompts.mask``: a correction of an existing result): the
          mask's box decoded again, that box reaching out to the positive clicks, the candidates
          around the positive clicks and the mask's box cut at each negative click compete.
          Positive clicks only: the mask grows by the winner (their union), so the correction
          never takes away what the clicks did not point at. With negative clicks only, nothing
          is left when no candidate honours them: the structure is not on the slice where the
          user said "not this".

        Candidates compete as in :func:`SlicerSAM.box_search.rank_boxes`: the clicks they
        honour first, then predicted IoU x stability x self-consistency. ``multimask``: the 3 best
        distinct candidates, else the best one. A mask logits prompt is not passed on (LiteMedSAM
        was not trained with one either: docs/propagation.md).
        """
        from SlicerSAM.box_search import (
            candidate_boxes,
            cut_boxes,
            distinct,
            honours_all,
            rank_boxes,
            tight_box,
            within,
        )

        plane = self.plane
        grid_shape = tuple(int(n) for n in plane.grid_shape)
        same_grid = tuple(plane.image_shape) == grid_shape
        decodes = 0
        slice_key = self.cache_key(index)
        points, labels = prompts.points_xy, prompts.point_labels
        positive = points[labels == 1]
        negative = points[labels != 1]
        pixel_mm = float(min(plane.pixel_spacing))

        def to_image(grid):
            if same_grid:
                return np.asarray(grid, dtype=bool)
            return plane.to_image(np.asarray(grid, dtype=np.float32), order=1) >= 0.5

        def decode(box):
            # A negative click or a moved one often asks for boxes already decoded on this slice
            # (the candidates depend on the positive clicks only): remember the last few.
            nonlocal decodes
            memo_key = (slice_key, np.asarray(box, dtype=np.float32).tobytes())
            hit = self._box_memo.get(memo_key)
            if hit is not None:
                self._box_memo.move_to_end(memo_key)
                return hit
            masks, iou, low_res = self.predictor.predict(
                box=box, multimask_output=False, output_size=grid_shape
            )
            decodes += 1
            grid = np.asarray(masks[0], dtype=bool)
            logits = np.asarray(low_res, dtype=np.float32)[0]
            out = (to_image(grid), float(np.asarray(iou).reshape(-1)[0]), logits, (grid, logits))
            self._box_memo[memo_key] = out
            while len(self._box_memo) > _BOX_MEMO_SIZE:
                self._box_memo.popitem(last=False)
            return out

        # the search's boxes around the positive clicks, and around each click the smallest one
        # (what "the click's surroundings" means to a correction)
        around = near = np.zeros((0, 4), dtype=np.float32)
        if len(positive):
            ones = np.ones(len(positive))
            around = candidate_boxes(positive, ones, plane.image_shape, pixel_mm)
            near = np.stack(
                [candidate_boxes(c[None], [1], plane.image_shape, pixel_mm)[0] for c in positive]
            )

        # pixels of the model image per pixel of the slice grid (for max_area)
        scale = float(np.prod(plane.image_shape)) / float(np.prod(grid_shape))

        def plausible(mask):
            return max_area is None or np.count_nonzero(mask) <= max_area * scale

        def limit(boxes):  # candidate boxes stay inside the bounds (an ROI's rectangle)
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            return boxes if prompts.bounds_xyxy is None else within(boxes, prompts.bounds_xyxy)

        t0 = time.perf_counter()
        with self.predictor_on(embedding):
            previous = None
            if prompts.mask is not None and prompts.box_xyxy is None:
                previous = tight_box(to_image(prompts.mask))
            if prompts.box_xyxy is not None:
                box = np.asarray(prompts.box_xyxy, dtype=np.float32)
                first = rank_boxes(decode, [box], points, labels, rerank=0)
                if honours_all(first[0].mask, points, labels) and not multimask:
                    found = first
                else:
                    cuts = cut_boxes(box, negative, first[0].mask)
                    boxes = [box[None], within(around, box), cuts]
                    found = rank_boxes(decode, limit(np.concatenate(boxes)), points, labels)
                    if honours_all(first[0].mask, points, labels):
                        # the box's own mask agrees with the clicks: it stays first
                        found = [c for c in found if np.allclose(c.box_xyxy, box)] + [
                            c for c in found if not np.allclose(c.box_xyxy, box)
                        ]
            elif previous is not None:
                before = to_image(prompts.mask)
                removed = None if len(positive) else _without_clicked_parts(before, negative)
                if removed is not None:
                    found = [removed]
                else:
                    boxes = [previous[None]]
                    if len(positive):
                        reach = np.concatenate([previous[None], near])
                        corners = [reach[:, :2].min(0), reach[:, 2:].max(0)]
                        boxes.append(np.concatenate(corners)[None])
                    boxes += [around, cut_boxes(previous, negative, before)]

                    def keeps(mask):  # a correction keeps most of what it corrects
                        return np.count_nonzero(mask & before) >= KEEP_FRACTION * before.sum()

                    found = rank_boxes(
                        decode,
                        limit(np.concatenate(boxes)),
                        points,
                        labels,
                        prefer=lambda mask: keeps(mask) and plausible(mask),
                    )
                    if POSITIVE_CORRECTIONS_GROW and len(positive) and not len(negative) and found:
                        # clicks that only add ("this too") grow the mask by the best candidate
                        # and take away nothing they did not point at: a candidate that holds
                        # the click often holds only one part of a mask in several parts (two
                        # veins on one slice), and replacing the mask by it would drop the rest
                        grown = before | found[0].mask
                        if honours_all(grown, points, labels):
                            found = [grown]
                    elif len(positive) and found and not keeps(found[0].mask):
                        # no mask holds the click and keeps the corrected one: "this too" adds
                        # what the model found at the click instead of replacing the mask by it
                        # (a click at a mask's edge would otherwise leave a sliver)
                        union = before | found[0].mask
                        if honours_all(union, points, labels):
                            found = [union]
                    if not len(positive) and not (
                        found
                        and honours_all(found[0].mask, points, labels)
                        and keeps(found[0].mask)
                    ):
                        found = []  # "not this", and nothing of it is left: the slice is empty
            elif len(positive):
                # search_box, with the candidates kept inside the bounds
                found = rank_boxes(decode, limit(around), points, labels, prefer=plausible)
            else:
                raise PromptError(
                    f"slice {index}: negative clicks alone say what is not the structure, not "
                    "where it is: add a positive click, a box, or correct an existing result"
                )
        ms = (time.perf_counter() - t0) * 1000.0
        self._add_stats(decodes=decodes, decode_ms=ms)
        if found and not isinstance(found[0], BoxCandidateLike):
            grid = found[0] if same_grid else plane.to_grid(found[0].astype(np.float32)) >= 0.5
            return SliceResult(
                index=index,
                masks=np.asarray(grid, dtype=bool)[None],
                iou=np.ones(1, dtype=np.float32),
                best=0,
                low_res_logits=np.zeros((1, 256, 256), dtype=np.float32),
                boxes_xyxy=None,
            )
        if not found:
            return SliceResult(
                index=index,
                masks=np.zeros((1,) + grid_shape, dtype=bool),
                iou=np.zeros(1, dtype=np.float32),
                best=0,
                low_res_logits=np.full((1, 256, 256), -20.0, dtype=np.float32),
                boxes_xyxy=None,
            )
        chosen = distinct(found, 3 if multimask else 1)
        given = prompts.box_xyxy
        return SliceResult(
            index=index,
            masks=np.stack([c.payload[0] for c in chosen]),
            iou=np.array([c.iou for c in chosen], dtype=np.float32),
            best=0,
            low_res_logits=np.stack([c.payload[1] for c in chosen]),
            boxes_xyxy=np.stack([c.box_xyxy for c in chosen]).astype(np.float32),
            searched=given is None or not np.allclose(chosen[0].box_xyxy, given),
        )

    def mask_features(self, index: int, mask: np.ndarray) -> Optional[Tuple[np.ndarray, float]]:
        """(mean image-embedding vector (C,) float32 of slice ``index`` under ``mask``, the number
        of embedding cells the mask covers); None for an empty mask. ``mask`` is (rows, cols) on
        the slice grid. Encodes the slice if needed. Propagation compares these between slices
        (``StopRules.max_feature_drop``); ``SamPredictor.mask_features`` says how."""
        index = self.check_index(index)
        mask = np.asarray(mask)
        if tuple(mask.shape) != tuple(self.plane.grid_shape):
            raise PromptError(
                f"mask shape {mask.shape} differs from the {self.plane.orientation} slice grid "
                f"{tuple(self.plane.grid_shape)} (rows, cols)"
            )
        return self.predictor.mask_features(mask, self.embedding(index))

    def segment_prompts(
        self, prompts: Prompts, index: Optional[int] = None, multimask: Optional[bool] = None
    ) -> SliceResult:
        """Convenience: user-level ``Prompts`` (RAS or voxel) -> ``prompts_on_slice`` -> segment."""
        slice_prompts = prompts_on_slice(prompts, self.volume, self.plane, index)
        return self.segment(slice_prompts.index, slice_prompts, multimask=multimask)


__all__ = ["POINT_PROMPTS", "Segmenter", "SegmenterStats", "SliceResult"]
