"""The server on Ray Serve and dataset benchmarks as Ray tasks, on a Ray instance started here
(``ray.init`` on 127.0.0.1, 2 CPUs, no dashboard).

Skipped, saying so, without Ray (the ``ray`` extra; the test extra has it).
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
from conftest import ROOT

pytest.importorskip("fastapi", reason="the server needs FastAPI (pip install 'slicersam[server]')")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'slicersam[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")

from test_benchmark import _dataset, fake_factory  # noqa: E402
from test_server import TOKEN, box_prompt, request, small_volume  # noqa: E402

from SlicerSAM import benchmark  # noqa: E402
from SlicerSAM.remote import RemoteSession  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance on this machine whose workers import the tests' helpers too."""
    if ray.is_initialized():
        ray.shutdown()
    path = os.pathsep.join([str(ROOT), str(ROOT / "Testing" / "Python")])
    # Serve's HTTP proxy must report ready within 5 s by default; a busy 2-core CI machine
    # can take longer to start it (the processes Ray starts inherit these)
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        namespace="slicersam",
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_ray_serve_deployment_answers_as_the_plain_server(local_ray, litemedsam_checkpoint):
    """Two session workers behind Ray Serve: each session stays on its worker, and a box then a
    propagation give the same voxels as the session in this process."""
    from SlicerSAM.intensity import parse_intensity
    from SlicerSAM.ray_cluster import deploy, shutdown
    from SlicerSAM.server import ServerSettings
    from SlicerSAM.session import InteractiveSession

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    deploy(ServerSettings(token=TOKEN), port=port, workers=2, blocking=False)
    try:
        status, health = request(url + "/health", token=None)
        assert status == 200 and health["status"] == "ok"
        assert request(url + "/models", token=None)[0] == 401  # the token holds on Ray too

        volume = small_volume()
        # A worker's first prompt loads the model and encodes slices: on a busy 2-core CI
        # machine that can take longer than the client's default 60 s. This test checks
        # answers, not latency (bench_server.py times the server).
        sessions = [
            RemoteSession(url, volume, token=TOKEN, window="40,400", timeout=300) for _ in range(2)
        ]
        assert sorted(s.id[:3] for s in sessions) == ["w0-", "w1-"]
        local = InteractiveSession(volume, "litemedsam", intensity=parse_intensity("40,400"))
        local.set_prompts(box_prompt())
        local.propagate()
        for remote in sessions:
            remote.set_prompts(box_prompt())
            remote.propagate()
            assert np.array_equal(remote.result_volume(), local.result_volume())
        assert local.result_volume().sum() > 0

        status, body = request(url + "/sessions/w7-nothing", token=TOKEN)
        assert status == 404 and "no session" in body["error"]
        status, body = request(url + f"/sessions/{sessions[0].id}/clicks", "POST", {"index": 3})
        assert status == 400 and "a click is" in body["error"]
        for remote in sessions:
            remote.close()
        assert request(url + "/health", token=None)[1]["sessions"] == 0
    finally:
        shutdown()


def test_a_dataset_on_ray_gives_the_results_of_the_local_run(local_ray, tmp_path):
    root = _dataset(tmp_path / "Dataset001_Fake")
    local = benchmark.run_dataset(
        root, tmp_path / "local", "box-propagate", segmenter_factory=fake_factory
    )
    seen = []
    on_ray = benchmark.run_dataset(
        root,
        tmp_path / "ray",
        "box-propagate",
        segmenter_factory=fake_factory,
        ray_address="local",
        progress=lambda done, total, case: seen.append((done, total)),
    )
    assert on_ray["structures"] == local["structures"] and on_ray["cases"] == 2
    assert seen[-1] == (2, 2)
    for case in ("case_001", "case_002"):
        a = json.loads((tmp_path / "local" / "cases" / f"{case}.json").read_text())
        b = json.loads((tmp_path / "ray" / "cases" / f"{case}.json").read_text())
        assert a["structures"] == b["structures"]
    # resumable as the local run: finished cases are not run again
    again = benchmark.run_dataset(
        root, tmp_path / "ray", "box-propagate", segmenter_factory=fake_factory, ray_address="local"
    )
    assert again["skipped"] == ["case_001", "case_002"]
