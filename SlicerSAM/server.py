"""`python -m SlicerSAM serve`: the engine's interactive sessions behind an HTTP API (FastAPI).

A client (the Slicer module set to "compute on a server", a script with
:class:`SlicerSAM.remote.RemoteSession`, any HTTP client) uploads a volume once and then sends
prompts; the server holds the model and one :class:`~SlicerSAM.session.InteractiveSession` per
uploaded volume, so a click costs one small request and the mask comes back bit-packed
(:mod:`SlicerSAM.transport`). FastAPI serves the OpenAPI description at ``/docs``.

Safe by default:

- it binds 127.0.0.1; any other address needs a token (``--token`` or ``SLICERSAM_TOKEN``), and
  with a token every request but ``/health`` needs ``Authorization: Bearer <token>``;
- uploads are bounded in bytes and voxels, sessions in number and idle time (an idle session and
  its embeddings are freed), and every session's embeddings share one memory-bounded cache;
- a volume from a path on the server only under a folder the operator names (``--data-root``);
- nothing a client sends is unpickled; a bad request gets a 4xx naming the problem, a failure in
  one request never stops the server.

Endpoints (JSON unless said): ``GET /health``, ``GET /models``; ``POST /sessions`` (body: NIfTI
or NRRD bytes, or raw voxels with an ``X-SlicerSAM-Array`` header, see
:mod:`SlicerSAM.transport`), ``POST /sessions/from-path``, ``GET /sessions/{id}``,
``DELETE /sessions/{id}``; per session ``POST .../prompts``, ``.../clicks``, ``.../candidate``,
``.../roi``, ``.../settings``, ``.../clear``, ``.../accept``, ``.../undo``, ``GET .../result``,
``GET .../labels``; ``POST .../propagate`` starts a job, ``GET /jobs/{id}`` follows it and
``DELETE /jobs/{id}`` cancels it.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, and
# postponed ones would name types (Request) imported inside create_app, which it cannot resolve.
import logging
import os
import secrets
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from SlicerSAM.errors import Cancelled, PromptError, SlicerSAMError, VolumeError

logger = logging.getLogger(__name__)

__all__ = ["ServerSettings", "SessionStore", "create_app", "serve"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
VOLUME_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "array": None}


@dataclass
class ServerSettings:
    """What the operator decides (``python -m SlicerSAM serve --help`` has the same options)."""

    model: str = "litemedsam"
    checkpoint: Optional[str] = None
    device: str = "auto"
    backend: Optional[str] = None  # the image encoder's runtime (SlicerSAM/backends.py)
    precision: Optional[str] = None
    onnx_dir: Optional[str] = None
    token: Optional[str] = None
    max_upload_mb: float = 512.0
    max_voxels: int = 600 * 512 * 512
    max_sessions: int = 8
    idle_seconds: float = 1800.0
    cache_mb: float = 2048.0
    data_root: Optional[str] = None


class ServerError(SlicerSAMError):
    """A refusal with its HTTP status: 401, 403, 404, 409, 413, 503."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """A propagation running on a worker thread: progress, cancel, its end."""

    id: str
    session_id: str
    state: str = "running"  # running, done, cancelled, failed
    done: int = 0
    total: int = 1
    message: str = ""
    summary: str = ""
    error: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)

    def as_dict(self) -> dict:
        return {
            "job": self.id,
            "session": self.session_id,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "message": self.message,
            "summary": self.summary,
            "error": self.error,
        }


@dataclass
class Entry:
    session: object
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)
    job: Optional[Job] = None


class SessionStore:
    """The server's sessions, its one model and its one embedding cache."""

    def __init__(self, settings: ServerSettings, prefix: str = ""):
        from SlicerSAM.cache import EmbeddingCache

        self.settings = settings
        self.prefix = prefix  # session and job ids start with it (a Ray worker's index)
        self.cache = EmbeddingCache(budget_mb=settings.cache_mb)
        self._sessions: Dict[str, Entry] = {}
        self._jobs: Dict[str, Job] = {}
        self._lock = threading.Lock()
        self._model = None
        self._model_lock = threading.Lock()

    # ---------------------------------------------------------------- model
    def model(self):
        with self._model_lock:
            if self._model is None:
                from sam_core.zoo import load_model
                from SlicerSAM.backends import request_runtime

                model = load_model(
                    self.settings.model, self.settings.checkpoint, device=self.settings.device
                )
                settings = self.settings
                request_runtime(model, settings.backend, settings.precision, settings.onnx_dir)
                self._model = model
            return self._model

    # ---------------------------------------------------------------- sessions
    def create(self, volume, orientation: str, window: str, point_prompts: str) -> str:
        from SlicerSAM.intensity import parse_intensity
        from SlicerSAM.session import InteractiveSession

        self.reap()
        intensity = parse_intensity(window)
        with self._lock:
            if len(self._sessions) >= self.settings.max_sessions:
                raise ServerError(
                    503,
                    f"the server holds {len(self._sessions)} sessions, its limit: close one "
                    "(DELETE /sessions/{id}) or try later",
                )
        session = InteractiveSession(
            volume,
            self.model(),
            orientation=orientation,
            intensity=intensity,
            cache=self.cache,
            point_prompts=point_prompts,
        )
        session_id = self.prefix + uuid.uuid4().hex
        with self._lock:
            self._sessions[session_id] = Entry(session)
        logger.info("session %s: volume %s, %s", session_id, volume.shape, orientation)
        return session_id

    def open(self, volume, orientation: str, window: str, point_prompts: str) -> dict:
        """A new session on ``volume``: {"session": id, "shape", "ijk_to_ras", the state}."""
        session_id = self.create(volume, orientation, window, point_prompts)
        return {
            "session": session_id,
            "shape": list(volume.shape),
            "ijk_to_ras": volume.ijk_to_ras.tolist(),
            **_state(self.entry(session_id).session),
        }

    def call(self, session_id: str, op: str, args: Optional[dict] = None) -> dict:
        """Run operation ``op`` (a name in ``OPERATIONS``) on the session, which it has to
        itself: requests on one session take turns; during a propagation they get a 409."""
        work = OPERATIONS[op]
        entry = self.entry(session_id)
        if entry.job is not None and entry.job.state == "running":
            raise ServerError(409, "the session is busy: a propagation is running (GET /jobs/...)")
        if not entry.lock.acquire(timeout=120):
            raise ServerError(409, "the session is busy")
        try:
            return work(entry.session, **(args or {}))
        finally:
            entry.lock.release()

    def entry(self, session_id: str) -> Entry:
        with self._lock:
            entry = self._sessions.get(session_id)
        if entry is None:
            raise ServerError(404, f"no session {session_id} (closed, expired or never made)")
        entry.last_used = time.monotonic()
        return entry

    def close(self, session_id: str) -> None:
        with self._lock:
            entry = self._sessions.pop(session_id, None)
        if entry is None:
            raise ServerError(404, f"no session {session_id}")
        if entry.job is not None:
            entry.job.cancel.set()
        entry.session.close()

    def reap(self) -> int:
        """Close the sessions idle for longer than ``idle_seconds``; returns how many."""
        now = time.monotonic()
        with self._lock:
            idle = [
                sid
                for sid, e in self._sessions.items()
                if now - e.last_used > self.settings.idle_seconds
                and (e.job is None or e.job.state != "running")
            ]
        for sid in idle:
            logger.info("session %s idle: closed", sid)
            try:
                self.close(sid)
            except ServerError:
                pass
        return len(idle)

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # ---------------------------------------------------------------- jobs
    def start_propagation(self, session_id: str, direction: str) -> Job:
        entry = self.entry(session_id)
        if not entry.lock.acquire(blocking=False):
            raise ServerError(409, "the session is busy (a propagation is running)")
        job = Job(self.prefix + uuid.uuid4().hex, session_id)
        with self._lock:
            self._jobs[job.id] = job
        entry.job = job

        def progress(done, total, message=""):
            job.done, job.total, job.message = int(done), int(total), str(message)
            entry.last_used = time.monotonic()

        def run():
            try:
                result = entry.session.propagate(
                    direction, progress=progress, cancel=job.cancel.is_set
                )
                job.summary = result.summary()
                job.state = "done"
            except Cancelled:
                job.state = "cancelled"
            except SlicerSAMError as exc:
                job.state, job.error = "failed", str(exc)
            except Exception as exc:  # noqa: BLE001 - reported in the job, the server stays up
                logger.exception("propagation of session %s failed", session_id)
                job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                entry.lock.release()

        threading.Thread(target=run, name=f"slicersam-job-{job.id[:8]}", daemon=True).start()
        return job

    def job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ServerError(404, f"no job {job_id}")
        return job

    # ---------------------------------------------------------------- what the app calls
    def propagate(self, session_id: str, direction: str) -> dict:
        return self.start_propagation(session_id, direction).as_dict()

    def job_state(self, job_id: str) -> dict:
        return self.job(job_id).as_dict()

    def cancel_job(self, job_id: str) -> dict:
        job = self.job(job_id)
        job.cancel.set()
        return job.as_dict()

    def describe(self) -> dict:
        from sam_core.device import select_device

        memo = getattr(self._model, "_slicersam_runtime_choices", None) or {}
        runtimes = sorted({choice.runtime.name for choice in memo.values()})
        return {
            "device": str(select_device(self.settings.device)),
            "sessions": self.count(),
            "runtime": ", ".join(runtimes) or None,
        }


def _check_file_voxels(path: Path, max_voxels: int) -> None:
    """Refuse a volume file with more voxels than ``max_voxels`` from its header alone (a small
    compressed file can hold a huge volume)."""
    try:
        if path.name.endswith(".nrrd"):
            import nrrd

            shape = nrrd.read_header(str(path)).get("sizes", [])
        else:
            import nibabel

            shape = nibabel.load(str(path)).shape
    except Exception as exc:  # noqa: BLE001 - the reader below names the problem precisely
        logger.debug("header of %s: %s", path, exc)
        return
    voxels = int(np.prod([int(n) for n in shape])) if len(shape) else 0
    if voxels > max_voxels:
        raise VolumeError(f"{voxels} voxels is more than this server takes ({max_voxels})")


def _check_token(settings: ServerSettings, authorization: Optional[str]) -> None:
    if settings.token is None:
        return
    if not authorization or not authorization.startswith("Bearer "):
        raise ServerError(401, "this server needs a token: send 'Authorization: Bearer <token>'")
    if not secrets.compare_digest(authorization[len("Bearer ") :], settings.token):
        raise ServerError(403, "wrong token")


def _slice_results(results: dict) -> dict:
    return {
        str(index): {
            "iou": [float(v) for v in np.asarray(r.iou).reshape(-1)],
            "best": int(r.best),
            "candidates": int(len(r.masks)),
            "boxes": None if r.boxes_xyxy is None else np.asarray(r.boxes_xyxy).tolist(),
            "searched": bool(r.searched),
        }
        for index, r in results.items()
    }


def _state(session) -> dict:
    """What a client mirrors after each change: the result, the key slices, the ROI."""
    from SlicerSAM.transport import encode_masks

    roi = session.roi
    return {
        "result": encode_masks(session.result()),
        "keys": {
            str(i): {
                "candidate": int(k.candidate),
                "prompted": k.prompts is not None,
                "empty": not bool(k.mask.any()),
            }
            for i, k in sorted(session.keys.items())
        },
        "roi": None
        if roi is None
        else {"slice_range": list(roi.slice_range), "bounds_xyxy": roi.bounds_xyxy.tolist()},
        "orientation": session.orientation,
        "num_slices": int(session.plane.num_slices),
        "grid": [int(n) for n in session.plane.grid_shape],
    }


# ---------------------------------------------------------------- operations on a session
# Each takes the session and plain arguments and returns JSON-able data: the app sends their
# names and arguments to a backend (this process's SessionStore, or a Ray worker holding it).
def _op_prompts(session, prompts, multimask=None) -> dict:
    results = session.set_prompts(prompts, multimask=multimask)
    return {"segmented": _slice_results(results), **_state(session)}


def _op_click(session, index: int, x: float, y: float, positive: bool = True) -> dict:
    result = session.add_click(index, (x, y), positive)
    return {"segmented": _slice_results({index: result}), **_state(session)}


def _op_candidate(session, index: int, candidate: int) -> dict:
    session.select_candidate(index, candidate)
    return _state(session)


def _op_roi(session, corners=None, frame: str = "ras") -> dict:
    from SlicerSAM.prompts import Box

    if corners is None:
        session.set_roi(None)
    else:
        a, b = corners
        session.set_roi(Box(tuple(a), tuple(b), frame=frame))
    return _state(session)


def _op_settings(session, orientation=None, window=None) -> dict:
    from SlicerSAM.intensity import parse_intensity

    if orientation is not None:
        session.set_orientation(orientation)
    if window is not None:
        session.set_intensity(parse_intensity(window))
    return _state(session)


def _op_clear(session) -> dict:
    session.clear()
    return _state(session)


def _op_accept(session, mode: str = "replace") -> dict:
    edit = session.accept(mode=mode)
    return {"changed_voxels": 0 if edit is None else edit.changed_voxels, **_state(session)}


def _op_undo(session) -> dict:
    return {"undone": session.undo() is not None, **_state(session)}


def _op_labels(session) -> dict:
    from SlicerSAM.transport import encode_masks

    if session.labels is None:
        return {"labels": encode_masks({})}
    plane = session.plane
    grids = {i: np.asarray(plane.grid(session.labels, i)) > 0 for i in range(plane.num_slices)}
    return {"labels": encode_masks(grids)}


OPERATIONS = {
    "state": _state,
    "prompts": _op_prompts,
    "click": _op_click,
    "candidate": _op_candidate,
    "roi": _op_roi,
    "settings": _op_settings,
    "clear": _op_clear,
    "accept": _op_accept,
    "undo": _op_undo,
    "labels": _op_labels,
}


def create_app(settings: Optional[ServerSettings] = None, backend=None):
    """The FastAPI application (the same one ``serve`` runs and Ray Serve deploys).

    ``backend`` holds the sessions: None, a :class:`SessionStore` in this process; the Ray
    deployment (:mod:`SlicerSAM.ray_serve`) passes one that forwards to its workers. It offers
    ``open``, ``call``, ``close``, ``propagate``, ``job_state``, ``cancel_job``, ``describe``.
    """
    from fastapi import Body, FastAPI, Header, Request
    from fastapi.responses import JSONResponse

    from SlicerSAM.intensity import parse_intensity
    from SlicerSAM.prompts import ORIENTATIONS, parse_prompt_dict

    settings = settings or ServerSettings()
    store = backend if backend is not None else SessionStore(settings)
    app = FastAPI(
        title="SlicerSAM",
        description="Segment Anything for CT and MRI: interactive sessions over HTTP.",
    )
    app.state.store = store

    @app.exception_handler(ServerError)
    async def _server_error(request, exc: ServerError):
        return JSONResponse(status_code=exc.status, content={"error": str(exc)})

    @app.exception_handler(SlicerSAMError)
    async def _user_error(request, exc: SlicerSAMError):
        return JSONResponse(status_code=400, content={"error": str(exc)})

    @app.exception_handler(ValueError)
    async def _value_error(request, exc: ValueError):
        return JSONResponse(status_code=400, content={"error": str(exc)})

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        logger.exception("request %s failed", request.url.path)
        return JSONResponse(
            status_code=500, content={"error": f"internal error ({type(exc).__name__}): {exc}"}
        )

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path not in ("/health", "/docs", "/openapi.json"):
            try:
                _check_token(settings, request.headers.get("authorization"))
            except ServerError as exc:
                return JSONResponse(status_code=exc.status, content={"error": str(exc)})
        return await call_next(request)

    def checked(orientation: str, window: str) -> None:
        if orientation not in ORIENTATIONS:
            raise PromptError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        parse_intensity(window)

    @app.get("/health")
    def health():
        return {"status": "ok", "sessions": store.describe()["sessions"]}

    @app.get("/models")
    def models():
        from sam_core.zoo import MODEL_SPECS

        return {
            "model": settings.model,
            "device": store.describe()["device"],
            "runtime": store.describe().get("runtime"),  # the encoder's, once the model loaded
            "models": sorted(MODEL_SPECS),
        }

    @app.post("/sessions")
    async def create_session(
        request: Request,
        orientation: str = "axial",
        window: str = "abdomen",
        point_prompts: str = "auto",
        x_slicersam_format: str = Header("nifti"),
        x_slicersam_array: Optional[str] = Header(None),
    ):
        from SlicerSAM.transport import decode_array_header
        from SlicerSAM.volume import Volume, load_volume

        checked(orientation, window)
        if x_slicersam_format not in VOLUME_FORMATS:
            raise VolumeError(
                f"X-SlicerSAM-Format must be one of {', '.join(VOLUME_FORMATS)}, "
                f"got {x_slicersam_format!r}"
            )
        limit = int(settings.max_upload_mb * 1024 * 1024)
        header = None
        if x_slicersam_format == "array":
            if not x_slicersam_array:
                raise VolumeError("an array upload needs its X-SlicerSAM-Array header")
            header = decode_array_header(x_slicersam_array, settings.max_voxels)
        # Read the body, keeping at most `limit` bytes. An oversized one is drained (up to twice
        # the limit) before the 413, so that a client still sending it reads the answer instead
        # of a broken connection.
        body, received = bytearray(), 0
        async for chunk in request.stream():
            received += len(chunk)
            if received <= limit:
                body += chunk
            elif received > 2 * limit:
                break
        if received > limit:
            raise ServerError(413, f"the upload ({received} bytes or more) is over {limit} bytes")
        if header is not None:
            dtype, shape, matrix = header
            expected = int(np.prod(shape)) * dtype.itemsize
            if len(body) != expected:
                raise VolumeError(
                    f"the array header says {expected} bytes, the body has {len(body)}"
                )
            array = np.frombuffer(bytes(body), dtype=dtype).reshape(shape)
            volume = Volume.from_array(array.astype(dtype.newbyteorder("="), copy=True), matrix)
        else:
            suffix = VOLUME_FORMATS[x_slicersam_format]
            with tempfile.TemporaryDirectory(prefix="slicersam-upload-") as folder:
                path = Path(folder) / f"volume{suffix}"
                path.write_bytes(bytes(body))
                _check_file_voxels(path, settings.max_voxels)
                volume = load_volume(path)
        return store.open(volume, orientation, window, point_prompts)

    @app.post("/sessions/from-path")
    def create_from_path(body: dict = Body(...)):
        from SlicerSAM.volume import load_volume

        if settings.data_root is None:
            raise ServerError(403, "this server takes no paths (its operator set no --data-root)")
        root = Path(settings.data_root).resolve()
        path = (root / str(body.get("path", ""))).resolve()
        if root not in path.parents and path != root:
            raise ServerError(403, f"{body.get('path')!r} is outside the server's data folder")
        orientation = body.get("orientation", "axial")
        window = body.get("window", "abdomen")
        checked(orientation, window)
        volume = load_volume(path)
        return store.open(volume, orientation, window, body.get("point_prompts", "auto"))

    @app.get("/sessions/{session_id}")
    def get_session(session_id: str):
        return store.call(session_id, "state")

    @app.delete("/sessions/{session_id}")
    def delete_session(session_id: str):
        store.close(session_id)
        return {"closed": session_id}

    @app.post("/sessions/{session_id}/prompts")
    def prompts(session_id: str, body: dict = Body(...)):
        parsed = parse_prompt_dict(body.get("prompts"), source="prompts")
        args = {"prompts": parsed, "multimask": body.get("multimask")}
        return store.call(session_id, "prompts", args)

    @app.post("/sessions/{session_id}/clicks")
    def clicks(session_id: str, body: dict = Body(...)):
        try:
            index, x, y = int(body["index"]), float(body["x"]), float(body["y"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PromptError(f"a click is {{index, x, y, positive}}: {exc}") from exc
        args = {"index": index, "x": x, "y": y, "positive": bool(body.get("positive", True))}
        return store.call(session_id, "click", args)

    @app.post("/sessions/{session_id}/candidate")
    def candidate(session_id: str, body: dict = Body(...)):
        try:
            args = {"index": int(body["index"]), "candidate": int(body["candidate"])}
        except (KeyError, TypeError, ValueError) as exc:
            raise PromptError(f"a candidate is {{index, candidate}}: {exc}") from exc
        return store.call(session_id, "candidate", args)

    @app.post("/sessions/{session_id}/roi")
    def roi(session_id: str, body: dict = Body(...)):
        box = body.get("box")
        corners = None
        if box is not None:
            try:
                a, b = box["corners"]
                corners = ([float(v) for v in a], [float(v) for v in b])
            except (KeyError, TypeError, ValueError) as exc:
                raise PromptError(f"an ROI is {{box: {{corners: [a, b]}}}}: {exc}") from exc
        args = {"corners": corners, "frame": body.get("frame", "ras")}
        return store.call(session_id, "roi", args)

    @app.post("/sessions/{session_id}/settings")
    def change_settings(session_id: str, body: dict = Body(...)):
        if "orientation" in body:
            checked(body["orientation"], "abdomen")
        if "window" in body:
            parse_intensity(body["window"])
        args = {"orientation": body.get("orientation"), "window": body.get("window")}
        return store.call(session_id, "settings", args)

    @app.post("/sessions/{session_id}/clear")
    def clear(session_id: str):
        return store.call(session_id, "clear")

    @app.post("/sessions/{session_id}/propagate")
    def propagate(session_id: str, body: dict = Body(default={})):
        direction = body.get("direction", "both")
        if direction not in ("both", "up", "down"):
            raise PromptError(f"direction must be both, up or down, got {direction!r}")
        return store.propagate(session_id, direction)

    @app.get("/jobs/{job_id}")
    def job_state(job_id: str):
        return store.job_state(job_id)

    @app.delete("/jobs/{job_id}")
    def cancel_job(job_id: str):
        return store.cancel_job(job_id)

    @app.get("/sessions/{session_id}/result")
    def result(session_id: str):
        return store.call(session_id, "state")

    @app.post("/sessions/{session_id}/accept")
    def accept(session_id: str, body: dict = Body(default={})):
        return store.call(session_id, "accept", {"mode": body.get("mode", "replace")})

    @app.post("/sessions/{session_id}/undo")
    def undo(session_id: str):
        return store.call(session_id, "undo")

    @app.get("/sessions/{session_id}/labels")
    def labels(session_id: str):
        return store.call(session_id, "labels")

    return app


def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the server until interrupted (uvicorn). A host other than loopback needs a token."""
    import uvicorn

    if host not in LOOPBACK and not settings.token:
        raise SlicerSAMError(
            f"serving on {host} reaches other computers: set a token (--token or "
            "SLICERSAM_TOKEN) that clients must send, or serve on 127.0.0.1"
        )
    app = create_app(settings)
    stop = threading.Event()

    def reaper():  # idle sessions go, even when no request comes
        while not stop.wait(min(60.0, settings.idle_seconds / 2)):
            app.state.store.reap()

    threading.Thread(target=reaper, name="slicersam-reaper", daemon=True).start()
    try:
        uvicorn.run(app, host=host, port=port, log_level=os.environ.get("SLICERSAM_LOG", "info"))
    finally:
        stop.set()
