"""A client of the inference server (``python -m SlicerSAM serve``) with the session's interface.

:class:`RemoteSession` uploads a volume once, then forwards prompts, clicks, propagation and the
rest to a server-side :class:`~SlicerSAM.session.InteractiveSession`, and mirrors what comes back
(the result, the key slices, the ROI) locally. Accepting a result into a segment and undoing it
happen here, on the client's own label array (``SlicerSAM.editing``), exactly as the session does
in-process: the server never holds the user's segments, so a server that goes away loses none of
them. The Slicer module uses this class when set to compute on a server; it needs neither
PyTorch nor the model weights.

Plain standard-library HTTP (``urllib``): nothing to install in Slicer. Errors come back as
:class:`RemoteError` with the server's message (or a clear one when the server cannot be
reached).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional

import numpy as np

from SlicerSAM.editing import DEFAULT_UNDO_STEPS, Edit, UndoStack, apply_edit
from SlicerSAM.errors import Cancelled, PromptError, SlicerSAMError

__all__ = ["RemoteError", "RemoteSession"]


class RemoteError(SlicerSAMError):
    """The server refused a request (with its message) or could not be reached."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, eq=False)
class RemoteSliceResult:
    """What the server says of one segmented slice: predicted IoU per candidate, the chosen one,
    the boxes (model-image pixels) and whether the segmenter searched them."""

    index: int
    iou: np.ndarray
    best: int
    boxes_xyxy: Optional[np.ndarray]
    searched: bool


@dataclass(frozen=True, eq=False)
class RemoteKey:
    """A key slice as the server reports it (its mask is in ``RemoteSession.result()``)."""

    index: int
    candidate: int
    prompted: bool
    empty: bool


class RemoteSession:
    """A server-side interactive session, used like :class:`~SlicerSAM.session.InteractiveSession`.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8765``.
        volume: the :class:`~SlicerSAM.volume.Volume` to segment (uploaded once, as raw voxels).
        token: the server's token, if it has one.
        orientation, window: as the session's (``window`` as the CLI's ``--window``).
        timeout: seconds a request may take (an upload gets ten times this).
        poll: seconds between progress checks of a propagation.
    """

    def __init__(
        self,
        url: str,
        volume,
        *,
        token: Optional[str] = None,
        orientation: str = "axial",
        window: str = "abdomen",
        point_prompts: str = "auto",
        timeout: float = 60.0,
        poll: float = 0.2,
        undo_stack: Optional[UndoStack] = None,
    ):
        from urllib.parse import urlencode

        from SlicerSAM.transport import encode_array

        self.url = url.rstrip("/")
        self.token = token
        self.timeout = float(timeout)
        self.poll = float(poll)
        self.volume = volume
        self.undo_stack = undo_stack if undo_stack is not None else UndoStack(DEFAULT_UNDO_STEPS)
        self.labels: Optional[np.ndarray] = None
        self._orientation = orientation
        self._window = window
        header, body = encode_array(volume.array, volume.ijk_to_ras)
        query = urlencode(
            {"orientation": orientation, "window": window, "point_prompts": point_prompts}
        )
        state = self._request(
            "POST",
            f"/sessions?{query}",
            body,
            headers={
                "Content-Type": "application/octet-stream",
                "X-SlicerSAM-Format": "array",
                "X-SlicerSAM-Array": json.dumps(header),
            },
            timeout=10 * self.timeout,
        )
        self.id = state["session"]
        self._mirror(state)

    # ---------------------------------------------------------------- HTTP
    def _request(self, method, path, body=None, headers=None, timeout=None) -> dict:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None and not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return json.loads(response.read().decode("utf-8") or "{}")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read().decode("utf-8")).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = exc.reason
            raise RemoteError(f"server: {message}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteError(
                f"cannot reach the SlicerSAM server at {self.url} ({reason}); the segments "
                "already accepted are kept"
            ) from None

    def _mirror(self, state: dict) -> None:
        from SlicerSAM.transport import decode_masks

        self._result = decode_masks(state["result"])
        self.keys: Dict[int, RemoteKey] = {
            int(i): RemoteKey(int(i), k["candidate"], k["prompted"], k["empty"])
            for i, k in state["keys"].items()
        }
        self._orientation = state["orientation"]
        self._roi = state.get("roi")

    def _segmented(self, state: dict) -> Dict[int, RemoteSliceResult]:
        self._mirror(state)
        return {
            int(i): RemoteSliceResult(
                int(i),
                np.asarray(r["iou"], dtype=np.float32),
                int(r["best"]),
                None if r["boxes"] is None else np.asarray(r["boxes"], dtype=np.float32),
                bool(r["searched"]),
            )
            for i, r in state.get("segmented", {}).items()
        }

    # ---------------------------------------------------------------- the session's interface
    @property
    def orientation(self) -> str:
        return self._orientation

    @property
    def plane(self):
        from SlicerSAM.slicing import plane_for

        return plane_for(self.volume, self._orientation)

    @property
    def roi(self):
        if self._roi is None:
            return None
        from SlicerSAM.session import Roi

        return Roi(tuple(self._roi["slice_range"]), self._roi["bounds_xyxy"])

    def plan(self, prompts):
        """Validated per-slice prompts, here, before any request (as the session's ``plan``)."""
        from SlicerSAM.session import InteractiveSession

        return InteractiveSession(self.volume, None, orientation=self._orientation).plan(prompts)

    def set_prompts(self, prompts, multimask=None) -> Dict[int, RemoteSliceResult]:
        from SlicerSAM.prompts import prompts_to_dict

        self.plan(prompts)
        data = prompts_to_dict(prompts, orientation=self._orientation)
        state = self._request(
            "POST", f"/sessions/{self.id}/prompts", {"prompts": data, "multimask": multimask}
        )
        return self._segmented(state)

    def add_click(self, index: int, xy, positive: bool = True) -> RemoteSliceResult:
        x, y = (float(v) for v in np.asarray(xy, dtype=np.float64).reshape(2))
        body = {"index": int(index), "x": x, "y": y, "positive": bool(positive)}
        return self._segmented(self._request("POST", f"/sessions/{self.id}/clicks", body))[
            int(index)
        ]

    def select_candidate(self, index: int, candidate: int) -> np.ndarray:
        body = {"index": int(index), "candidate": int(candidate)}
        self._mirror(self._request("POST", f"/sessions/{self.id}/candidate", body))
        return self._result.get(int(index), np.zeros(self.plane.grid_shape, dtype=bool))

    def set_roi(self, box) -> None:
        body = (
            {"box": None}
            if box is None
            else {
                "box": {"corners": [list(box.corner_a), list(box.corner_b)]},
                "frame": box.frame or "ras",
            }
        )
        self._mirror(self._request("POST", f"/sessions/{self.id}/roi", body))

    def set_orientation(self, orientation: str) -> None:
        self._mirror(
            self._request("POST", f"/sessions/{self.id}/settings", {"orientation": orientation})
        )

    def set_intensity(self, intensity) -> None:
        """``intensity``: an IntensityMapping or the CLI's ``--window`` text."""
        window = intensity if isinstance(intensity, str) else intensity.as_text()
        self._window = window
        self._mirror(self._request("POST", f"/sessions/{self.id}/settings", {"window": window}))

    def clear(self) -> None:
        self._mirror(self._request("POST", f"/sessions/{self.id}/clear"))

    def propagate(
        self,
        direction: str = "both",
        progress: Optional[Callable[[int, int, str], None]] = None,
        cancel: Optional[Callable[[], bool]] = None,
    ):
        """Propagate on the server; ``progress`` and ``cancel`` as in-process (the job is
        cancelled on the server). Returns an object with ``masks`` and ``summary()``."""
        job = self._request("POST", f"/sessions/{self.id}/propagate", {"direction": direction})
        while True:
            if cancel is not None and cancel():
                self._request("DELETE", f"/jobs/{job['job']}")
            job = self._request("GET", f"/jobs/{job['job']}")
            if progress is not None:
                progress(job["done"], job["total"], job["message"])
            if job["state"] != "running":
                break
            time.sleep(self.poll)
        if job["state"] == "cancelled":
            raise Cancelled("propagation cancelled")
        if job["state"] == "failed":
            raise RemoteError(f"server: {job['error']}")
        self._mirror(self._request("GET", f"/sessions/{self.id}/result"))
        return _RemoteResult(dict(self._result), job["summary"])

    def result(self) -> Dict[int, np.ndarray]:
        return {i: m for i, m in sorted(self._result.items()) if m.any()}

    def result_volume(self, dtype=np.uint8) -> np.ndarray:
        return self.plane.stack(self.result(), dtype=dtype)

    def accept(
        self,
        target: Optional[np.ndarray] = None,
        mode: str = "replace",
        key: Hashable = "session",
        masks=None,
    ) -> Optional[Edit]:
        """As :meth:`InteractiveSession.accept`, on the client's own target; the server's session
        starts afresh."""
        from SlicerSAM.session import InteractiveSession

        local = InteractiveSession(self.volume, None, orientation=self._orientation)
        local.undo_stack = self.undo_stack
        local.labels = self.labels
        masks = self.result() if masks is None else masks
        if not isinstance(masks, np.ndarray) and not masks:
            raise PromptError("nothing to accept: segment a slice or propagate first")
        edit = local.accept(target, mode=mode, key=key, masks=masks)
        self.labels = local.labels
        self.clear()
        return edit

    def undo(self) -> Optional[List[Edit]]:
        step = self.undo_stack.pop()
        if step is None:
            return None
        for edit in reversed(step):
            if edit.key == "session" and self.labels is not None:
                apply_edit(self.labels, edit, undo=True)
        return step

    def close(self) -> None:
        """Close the server's session (its embeddings are freed); errors are not raised."""
        try:
            self._request("DELETE", f"/sessions/{self.id}")
        except RemoteError:
            pass


@dataclass(frozen=True, eq=False)
class _RemoteResult:
    masks: Dict[int, np.ndarray]
    _summary: str

    def summary(self) -> str:
        return self._summary
