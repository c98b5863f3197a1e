"""The inference server (``python -m SlicerSAM serve``) in a subprocess on 127.0.0.1, driven over
real HTTP by :class:`SlicerSAM.remote.RemoteSession` and plain requests.

Skipped, saying so, without FastAPI and uvicorn (the ``server`` extra; the test extra has them).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import ROOT

pytest.importorskip("fastapi", reason="the server needs FastAPI (pip install 'slicersam[server]')")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'slicersam[server]')")

from SlicerSAM.errors import Cancelled  # noqa: E402
from SlicerSAM.prompts import Box, Point, Prompts  # noqa: E402
from SlicerSAM.remote import RemoteError, RemoteSession  # noqa: E402
from SlicerSAM.volume import Volume  # noqa: E402

TOKEN = "test-token-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m SlicerSAM serve`` on a free loopback port, with the given options."""

    def __init__(self, *options):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, SLICERSAM_LOG="warning")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "SlicerSAM", "serve", "--port", str(self.port), *options],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not start: " + self.output())

    def output(self) -> str:
        return self.process.stdout.read().decode(errors="replace") if self.process.stdout else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="module")
def server(litemedsam_checkpoint):
    s = Server(
        "--max-upload-mb", "4", "--max-sessions", "12", "--token", TOKEN,
        "--backend", "torch", "--precision", "fp32",
    )  # fmt: skip
    yield s
    s.stop()


def request(url, method="GET", body=None, headers=None, token=TOKEN):
    """(status, JSON) of one HTTP request."""
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def small_volume(nan=False) -> Volume:
    """A CT-like 12 x 48 x 56 volume: a bright disc (an 'organ') on slices 3..8."""
    array = np.full((12, 48, 56), -100, np.float32)
    yy, xx = np.mgrid[:48, :56]
    for k in range(3, 9):
        array[k][(yy - 24) ** 2 + (xx - 26) ** 2 <= 81] = 60
    if nan:
        array[0, 0, 0] = np.nan
        return Volume(array, np.diag([3.0, 3.0, 3.0, 1.0]))
    return Volume.from_array(array.astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0]))


def box_prompt(k=5):
    return Prompts(box=Box((k, 14.0, 16.0), (k, 34.0, 36.0)), frame="kji")


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_server_gives_the_same_voxels_as_the_session_in_process(server, shared_data):
    """The left kidney from an ROI and a click, remote and in-process: identical voxels."""
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAM.session import InteractiveSession
    from SlicerSAM.volume import load_volume

    ct = load_volume(shared_data / "ct-abdomen-3mm/ct.nii.gz")
    kidney = np.asarray(load_volume(shared_data / "ct-abdomen-3mm/labels.nii.gz").array) == 3
    kji = np.argwhere(kidney)
    lo, hi = np.maximum(kji.min(0) - 2, 0), kji.max(0) + 2
    prompts = Prompts(
        points=(Point((10.0, 41.0, 30.0)),),
        box=Box(tuple(lo.astype(float)), tuple(hi.astype(float))),
        frame="kji",
    )
    remote = RemoteSession(server.url, ct, token=TOKEN, window="40,400")
    remote.set_prompts(prompts)
    seen = []
    remote.propagate(progress=lambda done, total, message: seen.append((done, total)))
    local = InteractiveSession(ct, "litemedsam", intensity=parse_intensity("40,400"))
    local.set_prompts(prompts)
    local.propagate()
    assert np.array_equal(remote.result_volume(), local.result_volume())
    assert remote.result_volume().sum() > 0.5 * kidney.sum() and seen[-1][0] == seen[-1][1]
    assert request(f"{server.url}/models")[1]["runtime"] == "torch-fp32"  # serve --backend
    # accept and undo happen on the client's own segment, as in-process
    labels = np.zeros(ct.shape, np.uint8)
    edit = remote.accept(labels)
    assert edit.changed_voxels == int(labels.sum()) == int(local.result_volume().sum())
    assert remote.result() == {}
    remote.undo()
    remote.close()


@pytest.mark.slow
def test_concurrent_clients_clicking_get_their_own_answers(server):
    """8 clients, each with its own session on the same volume, 20 clicks each at once: no
    error, and every answer is a mask on the clicked slice (the load benchmark times this)."""
    volume = small_volume()
    errors, held = [], []

    def client(n):
        try:
            session = RemoteSession(server.url, volume, token=TOKEN, window="40,400")
            for i in range(20):
                x, y = 22.0 + (i % 8), 20.0 + (n % 8)
                session.add_click(3 + i % 6, (x, y), positive=True)
                held.append(bool(session.result().get(3 + i % 6, np.zeros(1)).any()))
            session.close()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(held) == 160 and all(held)


def test_a_propagation_is_cancelled_and_changes_nothing(server):
    session = RemoteSession(server.url, small_volume(), token=TOKEN, window="40,400")
    session.set_prompts(box_prompt())
    before = session.result()
    with pytest.raises(Cancelled):
        session.propagate(cancel=lambda: True)
    assert sorted(session.result()) == sorted(before) == [5]
    session.close()


def test_a_client_that_goes_away_mid_propagation_leaves_the_server_serving(server):
    session = RemoteSession(server.url, small_volume(), token=TOKEN, window="40,400")
    session.set_prompts(box_prompt())
    status, job = request(f"{server.url}/sessions/{session.id}/propagate", "POST", {})
    assert status == 200 and job["state"] == "running"
    # the client does not wait for the job: another client goes on being served
    other = RemoteSession(server.url, small_volume(), token=TOKEN, window="40,400")
    other.set_prompts(box_prompt(6))
    assert 6 in other.result()
    deadline = time.time() + 120
    while request(f"{server.url}/jobs/{job['job']}")[1]["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.2)
    assert request(f"{server.url}/jobs/{job['job']}")[1]["state"] == "done"
    for s in (session, other):
        s.close()


def _array_upload(url, shape, body: bytes):
    """POST a raw int16 array of ``shape`` (its header) with ``body`` as its bytes."""
    header = {"dtype": "<i2", "shape": shape, "ijk_to_ras": np.eye(4).ravel().tolist()}
    headers = {"X-SlicerSAM-Format": "array", "X-SlicerSAM-Array": json.dumps(header)}
    return request(f"{url}/sessions", "POST", body, headers)


@pytest.mark.parametrize(
    "case, call, status, message",
    [
        ("no token", lambda url: request(f"{url}/models", token=None), 401, "needs a token"),
        ("wrong token", lambda url: request(f"{url}/models", token="nope"), 403, "wrong token"),
        (
            "unknown session",
            lambda url: request(f"{url}/sessions/0123abc/result"),
            404,
            "no session 0123abc",
        ),
        (
            "oversized upload",
            lambda url: request(
                f"{url}/sessions",
                "POST",
                b"\0" * (5 * 1024 * 1024),
                {"X-SlicerSAM-Format": "nifti", "Content-Type": "application/octet-stream"},
            ),
            413,
            "over 4194304 bytes",
        ),
        (
            "a header that does not fit the body",
            lambda url: _array_upload(url, [2, 2, 2], b"\0" * 10),
            400,
            "the array header says 16 bytes, the body has 10",
        ),
        (
            "a volume too large",
            lambda url: _array_upload(url, [4000, 4000, 4000], b""),
            400,
            "is more than this server takes",
        ),
        (
            "a path when the operator allows none",
            lambda url: request(f"{url}/sessions/from-path", "POST", {"path": "/etc/passwd"}),
            403,
            "takes no paths",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_requests_get_a_4xx_naming_the_problem(server, case, call, status, message):
    code, body = call(server.url)
    assert code == status and message in body["error"], (case, code, body)
    assert request(f"{server.url}/health", token=None)[0] == 200  # still serving


def test_malformed_prompts_and_a_nan_volume_are_refused(server):
    with pytest.raises(RemoteError, match="non-finite voxel values"):
        RemoteSession(server.url, small_volume(nan=True), token=TOKEN)
    session = RemoteSession(server.url, small_volume(), token=TOKEN, window="40,400")
    code, body = request(
        f"{server.url}/sessions/{session.id}/prompts",
        "POST",
        {"prompts": {"points": [{"position": [1, 2]}]}},
    )
    assert code == 400 and "expected 3 numbers" in body["error"]
    code, body = request(
        f"{server.url}/sessions/{session.id}/clicks", "POST", {"index": 99, "x": 1, "y": 1}
    )
    assert code == 400 and "slice index 99 is outside the volume" in body["error"]
    session.close()


def test_a_server_that_goes_away_is_a_clear_error_and_accepted_segments_stay(
    litemedsam_checkpoint,
):
    server = Server()
    try:
        session = RemoteSession(server.url, small_volume(), window="40,400")
        session.set_prompts(box_prompt())
        labels = np.zeros(small_volume().shape, np.uint8)
        session.accept(labels)
        accepted = labels.copy()
    finally:
        server.stop()
    with pytest.raises(RemoteError, match="cannot reach the SlicerSAM server"):
        session.set_prompts(box_prompt(6))
    assert accepted.any() and np.array_equal(labels, accepted)
    # a new server knows nothing of the old sessions: a clear error, not a crash
    restarted = Server()
    try:
        session.url = restarted.url
        with pytest.raises(RemoteError, match="no session"):
            session.set_prompts(box_prompt(6))
    finally:
        restarted.stop()


def test_serving_beyond_loopback_needs_a_token():
    result = subprocess.run(
        [sys.executable, "-m", "SlicerSAM", "serve", "--host", "0.0.0.0", "--port", "0"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "SLICERSAM_TOKEN"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "set a token" in result.stderr
