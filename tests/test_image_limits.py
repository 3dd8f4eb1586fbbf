"""Bounded resources when loading images: an oversized file is refused before it is read, and an opted-in remote
image has a byte cap and a total deadline (local loopback HTTP servers, bounded in time)."""

from __future__ import annotations

import http.server
import importlib.util
import io
import threading
import time

import pytest
from conftest import ROOT
from PIL import Image

_spec = importlib.util.spec_from_file_location("image_processing_andesvl", ROOT / "image_processing_andesvl.py")
ip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ip)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.bin"
    with open(path, "wb") as file:  # sparse: 1 GB on paper, nothing on disk
        file.truncate(2**30)
    with pytest.raises(ValueError, match=r"over 67108864 bytes .* refused before decoding"):
        ip.load_image(str(path))


def test_an_oversized_data_url_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data URL is over 1000 bytes"):
        ip.load_image("data:image/png;base64," + "A" * 4000, max_image_bytes=1000)


class Server:
    """A loopback HTTP server whose one handler is given; stopped by the fixture."""

    def __init__(self, handle):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                handle(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/image.png"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def serve():
    servers = []
    yield lambda handle: servers.append(Server(handle)) or servers[-1].url
    for server in servers:
        server.close()


def test_a_remote_image_loads_when_allowed(serve):
    data = png_bytes()

    def handle(request):
        request.send_response(200)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    assert ip.load_image(serve(handle), allow_remote=True).size == (8, 8)


def test_a_trickling_server_hits_the_total_deadline(serve):
    def handle(request):
        request.send_response(200)
        request.send_header("Content-Length", "100000")
        request.end_headers()
        for _ in range(40):  # one byte every 0.5 s: never a socket timeout, 20 s in all
            try:
                request.wfile.write(b"x")
                request.wfile.flush()
            except OSError:
                return
            time.sleep(0.5)

    start = time.monotonic()
    with pytest.raises(ValueError, match=r"Could not fetch .* TimeoutError: not complete after 2.0 s"):
        ip.load_image(serve(handle), allow_remote=True, timeout=2.0)
    assert time.monotonic() - start < 5.0


def test_an_oversized_download_is_cut_at_the_cap(serve):
    def handle(request):
        request.send_response(200)
        request.end_headers()  # no Content-Length: the cap must hold while reading
        try:
            for _ in range(64):
                request.wfile.write(b"x" * 65536)
        except OSError:
            pass

    with pytest.raises(ValueError, match=r"over 100000 bytes"):
        ip.load_image(serve(handle), allow_remote=True, max_image_bytes=100_000)


def test_a_truncated_download_is_a_value_error(serve):
    def handle(request):
        request.send_response(200)
        request.send_header("Content-Length", "5000")
        request.end_headers()
        request.wfile.write(b"x" * 10)  # then the connection closes: IncompleteRead

    with pytest.raises(ValueError, match="Could not fetch .*IncompleteRead"):
        ip.load_image(serve(handle), allow_remote=True, timeout=5.0)
