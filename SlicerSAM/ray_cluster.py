"""What SlicerSAM runs on Ray: the inference server on Ray Serve, and dataset cases as Ray tasks.

Both are optional (``pip install 'slicersam[ray]'``); without Ray, ``serve`` runs one process
(:func:`SlicerSAM.server.serve`) and ``benchmark --dataset`` a local process pool.

**The server** (``python -m SlicerSAM serve --ray [ADDRESS]``). The HTTP app is the same FastAPI
app as the plain server (:func:`SlicerSAM.server.create_app`), deployed on Ray Serve as the
ingress; the sessions live in ``--workers`` worker actors (:class:`SessionWorker`, one GPU each
when the cluster has them), each with its own model, embedding cache and sessions (a
:class:`~SlicerSAM.server.SessionStore`). A session's id starts with its worker's index, so every
request on it, through any ingress replica, reaches the worker that holds it; a new session goes
to the worker holding the fewest. Limits (sessions, cache) apply per worker.

**Datasets** (``python -m SlicerSAM benchmark --dataset DIR --ray [ADDRESS]``): each case is a Ray
task (one GPU each when the cluster has GPUs, else one CPU) that returns its results; the driver
writes each case's JSON file as it arrives, so a run is resumable exactly as the local one, and
the summary is the same file. Every node must see the dataset at the same path.

``ADDRESS``: none starts a Ray instance on this machine; ``auto`` joins the cluster this machine
belongs to; ``ray://host:10001`` reaches a remote cluster's client server.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, List, Optional

from SlicerSAM.errors import Cancelled, SlicerSAMError

logger = logging.getLogger(__name__)

__all__ = ["RayBackend", "SessionWorker", "connect", "deploy", "run_cases"]

NAMESPACE = "slicersam"


def _ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SlicerSAMError(
            "--ray needs Ray: pip install 'slicersam[ray]' (or 'ray[serve]')"
        ) from exc
    return ray


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None):
    """Ray, initialised: joined to ``address`` ("auto", "ray://host:port"), or a new local
    instance when ``address`` is None or "local"; an instance already initialised is kept."""
    ray = _ray()
    if not ray.is_initialized():
        if address in (None, "", "local"):
            # this machine only: the node on loopback, no dashboard
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                namespace=NAMESPACE,
                _node_ip_address="127.0.0.1",
            )
        else:
            ray.init(address=address, namespace=NAMESPACE)
    return ray


def _gpus() -> float:
    return float(_ray().cluster_resources().get("GPU", 0.0))


# ---------------------------------------------------------------------------------- the server
class SessionWorker:
    """A worker holding sessions (a Ray actor): the plain server's SessionStore behind calls
    that return ``("ok", value)`` or ``("error", kind, status, message)``, so that a refusal
    reaches the client as the same 4xx the plain server gives."""

    def __init__(self, settings, prefix: str):
        from SlicerSAM.server import SessionStore

        self.store = SessionStore(settings, prefix=prefix)
        stop = threading.Event()

        def reaper():  # idle sessions go, even when no request comes
            while not stop.wait(min(60.0, settings.idle_seconds / 2)):
                self.store.reap()

        threading.Thread(target=reaper, name="slicersam-reaper", daemon=True).start()

    def run(self, method: str, *args):
        from SlicerSAM.server import ServerError

        try:
            if method == "open":
                from SlicerSAM.volume import Volume

                array, matrix, *rest = args
                return ("ok", self.store.open(Volume(array, matrix), *rest))
            if method == "count":
                return ("ok", self.store.count())
            return ("ok", getattr(self.store, method)(*args))
        except ServerError as exc:
            return ("error", "server", exc.status, str(exc))
        except (SlicerSAMError, ValueError) as exc:
            return ("error", "user", 400, str(exc))


class RayBackend:
    """What the app calls (``open``, ``call``, ``close``, ``propagate``, ``job_state``,
    ``cancel_job``, ``describe``), forwarded to the worker that holds the session. Picklable:
    the workers are found by name on first use in each ingress replica."""

    def __init__(self, settings, workers: int = 1, gpus_per_worker: float = 0.0):
        self.settings = settings
        self.workers = int(workers)
        self.gpus_per_worker = float(gpus_per_worker)
        self._handles = None

    def __getstate__(self):
        return {**self.__dict__, "_handles": None}

    def handles(self) -> List:
        if self._handles is None:
            ray = _ray()
            actor = ray.remote(SessionWorker)
            options = {"num_cpus": 1, "max_concurrency": 16, "namespace": NAMESPACE}
            if self.gpus_per_worker:
                options = dict(options, num_cpus=0, num_gpus=self.gpus_per_worker)
            self._handles = [
                actor.options(name=f"slicersam-worker-{i}", get_if_exists=True, **options).remote(
                    self.settings, f"w{i}-"
                )
                for i in range(self.workers)
            ]
        return self._handles

    def _worker(self, some_id: str):
        from SlicerSAM.server import ServerError

        head = str(some_id).split("-", 1)[0]
        if head.startswith("w") and head[1:].isdigit() and int(head[1:]) < self.workers:
            return self.handles()[int(head[1:])]
        raise ServerError(404, f"no session or job {some_id}")

    @staticmethod
    def _get(reference):
        from SlicerSAM.errors import PromptError
        from SlicerSAM.server import ServerError

        answer = _ray().get(reference)
        if answer[0] == "ok":
            return answer[1]
        _, kind, status, message = answer
        if kind == "server":
            raise ServerError(status, message)
        raise PromptError(message)

    def open(self, volume, orientation, window, point_prompts) -> dict:
        handles = self.handles()
        counts = [self._get(h.run.remote("count")) for h in handles]
        worker = handles[counts.index(min(counts))]
        args = (volume.array, volume.ijk_to_ras, orientation, window, point_prompts)
        return self._get(worker.run.remote("open", *args))

    def call(self, session_id: str, op: str, args: Optional[dict] = None) -> dict:
        return self._get(self._worker(session_id).run.remote("call", session_id, op, args))

    def close(self, session_id: str) -> None:
        self._get(self._worker(session_id).run.remote("close", session_id))

    def propagate(self, session_id: str, direction: str) -> dict:
        return self._get(self._worker(session_id).run.remote("propagate", session_id, direction))

    def job_state(self, job_id: str) -> dict:
        return self._get(self._worker(job_id).run.remote("job_state", job_id))

    def cancel_job(self, job_id: str) -> dict:
        return self._get(self._worker(job_id).run.remote("cancel_job", job_id))

    def describe(self) -> dict:
        described = [self._get(h.run.remote("describe")) for h in self.handles()]
        devices = sorted({d["device"] for d in described})
        runtimes = sorted({str(d.get("runtime")) for d in described if d.get("runtime")})
        return {
            "device": ", ".join(devices),
            "sessions": sum(d["sessions"] for d in described),
            "runtime": ", ".join(runtimes) or None,
        }


def deploy(
    settings,
    host: str = "127.0.0.1",
    port: int = 8765,
    address: Optional[str] = None,
    workers: int = 1,
    replicas: int = 1,
    blocking: bool = True,
):
    """Run the server on Ray Serve: ``replicas`` HTTP ingress replicas over ``workers`` session
    workers (one GPU each when the cluster has as many). A host other than loopback needs a
    token. ``blocking``: serve until interrupted (False: return once it answers, for tests)."""
    from SlicerSAM.server import LOOPBACK, create_app

    if host not in LOOPBACK and not settings.token:
        raise SlicerSAMError(
            f"serving on {host} reaches other computers: set a token (--token or "
            "SLICERSAM_TOKEN) that clients must send, or serve on 127.0.0.1"
        )
    if int(workers) < 1 or int(replicas) < 1:
        raise SlicerSAMError("--workers and --replicas need at least 1")
    ray = connect(address)
    from ray import serve

    gpus = 1.0 if _gpus() >= int(workers) else 0.0
    backend = RayBackend(settings, workers, gpus)
    # the workers start here, before the first request (the replicas find them by name)
    described = backend.describe()
    logger.info("%d session workers on %s", workers, described["device"])
    app = create_app(settings, backend=backend)

    @serve.deployment(num_replicas=int(replicas), ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class SlicerSAMServer:
        pass

    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(SlicerSAMServer.bind(), name="slicersam", route_prefix="/", blocking=False)
    logger.info("SlicerSAM on Ray Serve: http://%s:%d (%d workers)", host, port, workers)
    if blocking:  # pragma: no cover - runs until interrupted
        try:
            threading.Event().wait()
        finally:
            serve.shutdown()
    return ray


def shutdown() -> None:
    """Stop the Serve application and its session workers (tests; ``serve --ray`` on exit)."""
    ray = _ray()
    from ray import serve

    serve.shutdown()
    for i in range(64):
        try:
            ray.kill(ray.get_actor(f"slicersam-worker-{i}", namespace=NAMESPACE))
        except ValueError:
            break


# ---------------------------------------------------------------------------------- datasets
def run_cases(
    jobs: List[dict],
    compute: Callable[[dict], dict],
    write: Callable[[dict, dict], None],
    address: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> None:
    """Run ``compute(job) -> data`` for every job as a Ray task and ``write(job, data)`` each
    result here as it arrives (so a cancelled or failed run keeps the cases already done).
    ``progress(case)`` after each; ``cancel() -> bool`` checked between results."""
    ray = connect(address)
    resources = {"num_gpus": 1} if _gpus() >= 1 else {"num_cpus": 1}
    task = ray.remote(**resources)(compute)
    pending: Dict = {task.remote(job): job for job in jobs}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if cancel is not None and cancel():
                raise Cancelled("dataset benchmark cancelled")
            for reference in ready:
                job = pending.pop(reference)
                write(job, ray.get(reference))
                if progress is not None:
                    progress(job["case"])
    except BaseException:
        for reference in pending:
            ray.cancel(reference, force=True)
        raise
