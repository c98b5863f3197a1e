"""sam_core.checkpoint: hashing, safe loading and verified, atomic downloads against a real
loopback HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
from pathlib import Path

import pytest
import torch

from sam_core.checkpoint import download, load_state_dict_safely, sha256_file
from sam_core.errors import CheckpointError


def tiny_checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.zeros(2)}, buffer
    )
    return buffer.getvalue()


class _Server:
    """http.server on 127.0.0.1, port 0, in a thread; counts requests per path.

    Routes: /ok.pth (the file), /truncated.pth (announces the full length, sends half, closes),
    /missing.pth (404).
    """

    def __init__(self, body: bytes):
        self.body = body
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                server.requests.append(self.path)
                if self.path == "/ok.pth":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(server.body)))
                    self.end_headers()
                    self.wfile.write(server.body)
                elif self.path == "/truncated.pth":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(server.body)))
                    self.end_headers()
                    self.wfile.write(server.body[: len(server.body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    self.send_error(404)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = _Server(tiny_checkpoint_bytes())
    yield srv
    srv.close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_sha256_file_matches_hashlib(tmp_path):
    data = b"x" * 3_000_001
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path, chunk=4096) == hashlib.sha256(data).hexdigest()


def test_download_verifies_reports_progress_and_places_atomically(server, tmp_path):
    body = server.body
    dest = tmp_path / "models" / "tiny.pth"
    calls = []
    out = download(
        server.url("/ok.pth"),
        dest,
        hashlib.sha256(body).hexdigest(),
        size_bytes=len(body),
        progress=lambda done, total, msg: calls.append((done, total, msg)),
        timeout=10,
    )
    assert out == dest and dest.read_bytes() == body
    assert _leftovers(dest.parent) == ["tiny.pth"]  # no temporary file left
    assert calls[0][0] == 0 and calls[-1][:2] == (len(body), len(body))
    assert all(total == len(body) for _, total, _ in calls)
    dones = [done for done, _, _ in calls]
    assert dones == sorted(dones)
    assert server.requests == ["/ok.pth"]
    assert load_state_dict_safely(dest, "tiny")["layer.weight"].shape == (2, 3)


def test_existing_verified_file_is_reused_without_a_request(server, tmp_path):
    body = server.body
    dest = tmp_path / "tiny.pth"
    dest.write_bytes(body)
    before = dest.stat().st_mtime_ns
    download(server.url("/ok.pth"), dest, hashlib.sha256(body).hexdigest(), timeout=10)
    assert server.requests == []
    assert dest.stat().st_mtime_ns == before


def test_existing_corrupted_file_is_replaced(server, tmp_path):
    body = server.body
    dest = tmp_path / "tiny.pth"
    dest.write_bytes(b"corrupted")
    download(server.url("/ok.pth"), dest, hashlib.sha256(body).hexdigest(), timeout=10)
    assert dest.read_bytes() == body and server.requests == ["/ok.pth"]


def test_checksum_mismatch_raises_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "tiny.pth"
    wrong = "0" * 64
    actual = hashlib.sha256(server.body).hexdigest()
    with pytest.raises(CheckpointError) as info:
        download(server.url("/ok.pth"), dest, wrong, timeout=10, name="tiny")
    message = str(info.value)
    for part in (server.url("/ok.pth"), str(dest), wrong, actual, "'tiny'"):
        assert part in message
    assert _leftovers(tmp_path) == []


def test_checksum_mismatch_keeps_an_existing_file_untouched(server, tmp_path):
    dest = tmp_path / "tiny.pth"
    dest.write_bytes(b"old content")
    with pytest.raises(CheckpointError):
        download(server.url("/ok.pth"), dest, "1" * 64, timeout=10)
    assert dest.read_bytes() == b"old content"
    assert _leftovers(tmp_path) == ["tiny.pth"]


def test_truncated_body_raises_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "tiny.pth"
    with pytest.raises(CheckpointError, match="ended early|interrupted"):
        download(
            server.url("/truncated.pth"),
            dest,
            hashlib.sha256(server.body).hexdigest(),
            timeout=10,
        )
    assert _leftovers(tmp_path) == []


def test_http_error_raises_and_leaves_nothing(server, tmp_path):
    with pytest.raises(CheckpointError, match="Cannot download .*missing.pth"):
        download(server.url("/missing.pth"), tmp_path / "m.pth", "2" * 64, timeout=10)
    assert _leftovers(tmp_path) == []


def test_interruption_by_the_progress_callback_leaves_nothing(server, tmp_path):
    def stop(done, total, message):
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(
            server.url("/ok.pth"),
            tmp_path / "tiny.pth",
            hashlib.sha256(server.body).hexdigest(),
            progress=stop,
            timeout=10,
            chunk=64,
        )
    assert _leftovers(tmp_path) == []


def test_download_without_a_valid_sha256_is_refused(server, tmp_path):
    with pytest.raises(CheckpointError, match="no valid sha256"):
        download(server.url("/ok.pth"), tmp_path / "t.pth", None)  # type: ignore[arg-type]
    assert server.requests == []


def test_load_state_dict_unwraps_model_and_state_dict(tmp_path):
    weights = {"a": torch.ones(2), "b": torch.zeros(1)}
    for wrapper in ({"model": weights, "epoch": 3}, {"state_dict": weights}, weights):
        path = tmp_path / "w.pth"
        torch.save(wrapper, path)
        state = load_state_dict_safely(path, "toy")
        assert set(state) == {"a", "b"}
    torch.save({"module.a": torch.ones(1), "module.b": torch.ones(1)}, tmp_path / "dp.pth")
    assert set(load_state_dict_safely(tmp_path / "dp.pth", "toy")) == {"a", "b"}


def test_truncated_or_foreign_files_raise_checkpoint_error_naming_file_and_model(tmp_path):
    body = tiny_checkpoint_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(body[: len(body) // 2])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    for path in (truncated, text, tmp_path / "absent.pth"):
        with pytest.raises(CheckpointError) as info:
            load_state_dict_safely(path, "sam_vit_b")
        assert str(path) in str(info.value) and "'sam_vit_b'" in str(info.value)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.ones(1), "obj": _Server}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_state_dict_safely(path, "toy")


def test_a_file_without_tensors_is_refused(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match="no tensors"):
        load_state_dict_safely(path, "toy")
