"""Round trips to the inference server against the same work in-process, and a load test.

Starts ``python -m SlicerSAM serve`` on a free 127.0.0.1 port, uploads the sample CT once per
client, encodes the slices clicked (so the timings are of prompts on encoded slices), then:

1. **one client**: N box prompts and N clicks over HTTP (``RemoteSession``), and the same prompts
   in this process (``InteractiveSession`` on the same model, slices encoded first), interleaved;
2. **load**: C clients at once, each with its own session, K clicks each.

Prints median / 90th / 99th percentile latencies in ms, the ratio of round trip to in-process,
errors, and the CPU. From the repository root::

    python Testing/benchmarks/bench_server.py [--clients 8] [--clicks 20] [--prompts 30]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, cpu_text  # noqa: E402

from SlicerSAM.intensity import parse_intensity  # noqa: E402
from SlicerSAM.prompts import Box, Prompts, SlicePrompts  # noqa: E402
from SlicerSAM.remote import RemoteSession  # noqa: E402
from SlicerSAM.session import InteractiveSession  # noqa: E402
from SlicerSAM.volume import load_volume  # noqa: E402

SAMPLE = ROOT / "SlicerSAM" / "sample"


def percentiles(values) -> str:
    v = np.asarray(values, dtype=np.float64)
    return " / ".join(f"{np.percentile(v, q):.1f}" for q in (50, 90, 99))


def start_server(timeout_s: float = 300.0):
    """Start ``python -m SlicerSAM serve`` on a free loopback port; (process, url) once it
    answers /health. Its stderr goes to a temporary file, printed if it does not start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "SlicerSAM", "serve", "--port", str(port), "--max-sessions", "64"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    log.seek(0)
    raise RuntimeError(f"the server did not start:\n{log.read()[-2000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=30)
    args = parser.parse_args(argv)
    ct = load_volume(SAMPLE / "ct.nii.gz")
    labels = np.asarray(load_volume(SAMPLE / "labels.nii.gz").array)
    spleen = labels == 1
    slices = [k for k in range(ct.shape[0]) if spleen[k].any()][10:16]
    clicks = []
    for k in slices:
        rows, cols = np.nonzero(spleen[k])
        clicks.append((k, float(np.median(cols)), float(np.median(rows))))
    print(f"CPU: {cpu_text()}")
    process, url = start_server()
    try:
        local = InteractiveSession(ct, "litemedsam", intensity=parse_intensity("40,400"))
        remote = RemoteSession(url, ct, window="40,400")
        for k, x, y in clicks:  # encode the slices on both sides first
            local.segment(SlicePrompts(k, [[x, y]], [1]))
            remote.add_click(k, (x, y))
        times = {"box here": [], "box server": [], "click here": [], "click server": []}
        for n in range(args.prompts):
            k, x, y = clicks[n % len(clicks)]
            box = Prompts(
                box=Box((k, y - 8 - n % 3, x - 8), (k, y + 8, x + 8 + n % 3)), frame="kji"
            )
            for where, session in (("here", local), ("server", remote)):
                local.clear()
                t0 = time.perf_counter()
                session.set_prompts(box)
                times[f"box {where}"].append((time.perf_counter() - t0) * 1000.0)
                session.clear()
                t0 = time.perf_counter()
                session.add_click(k, (x + n % 3, y))
                times[f"click {where}"].append((time.perf_counter() - t0) * 1000.0)
                session.clear()
        print(f"one client, {args.prompts} prompts each (median / 90th / 99th percentile, ms):")
        for kind in ("box", "click"):
            here, there = times[f"{kind} here"], times[f"{kind} server"]
            ratio = np.median(there) / np.median(here)
            print(
                f"  {kind:<5} in-process {percentiles(here)}; round trip {percentiles(there)} "
                f"({ratio:.2f}x the median)"
            )
        remote.close()

        latencies, errors = [], []

        def client(n):
            try:
                session = RemoteSession(url, ct, window="40,400")
                for i in range(args.clicks):
                    k, x, y = clicks[(n + i) % len(clicks)]
                    t0 = time.perf_counter()
                    session.add_click(k, (x + i % 4, y))
                    latencies.append((time.perf_counter() - t0) * 1000.0)
                    session.clear()
                session.close()
            except Exception as exc:  # noqa: BLE001 - counted and printed
                errors.append(repr(exc))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        print(
            f"load: {args.clients} clients x {args.clicks} clicks: {len(latencies)} answered, "
            f"{len(errors)} errors, {wall:.1f} s; latency {percentiles(latencies)} ms "
            f"(median / 90th / 99th)"
        )
        for error in errors[:5]:
            print("  error:", error)
    finally:
        process.terminate()
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
