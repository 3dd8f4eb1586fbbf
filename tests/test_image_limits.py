"""Bounded resources when loading images: an oversized file is refused before it is read, an image that declares
too many pixels before it is decoded, a 16-bit image at the limit stays under a stated peak RSS, and an opted-in
remote image has a byte cap and a total deadline (local loopback HTTP servers, bounded in time)."""

from __future__ import annotations

import http.server
import importlib.util
import io
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
from PIL import Image

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("image_processing_andesvl", ROOT / "image_processing_andesvl.py")
ip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ip)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_gray16_png(path, width: int, height: int) -> None:
    """A real 16-bit grayscale PNG, streamed row by row (a 13000 x 13000 one is ~0.3 MB on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row, parts = zlib.compressobj(9), b"\x00" + b"\x40\x00" * width, []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16-bit, grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )


PEAK_RSS_SCRIPT = """
import resource, sys
from transformers import AutoImageProcessor
processor = AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    out = processor(sys.argv[2], resize_mode="eval")
    result = "grid %s" % out["image_grid_hw"].tolist()
except ValueError as err:
    result = "ValueError: %s" % err
print(result)
print("peak_mib", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def peak_rss_of_processing(path) -> tuple[str, float]:
    """Run the shipped image processor on `path` in a fresh process: (its result line, peak RSS growth in MiB)."""
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(ROOT / "AndesVL-Tiny"), str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = run.stdout.strip().splitlines()
    return lines[-2], float(lines[-1].split()[1])


def test_a_16_bit_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge16.png"
    write_gray16_png(path, 13000, 13000)  # 169 Mpx: under PIL's bomb limit, 3.4 GB to decode before the limit
    assert path.stat().st_size < 2**20
    result, peak = peak_rss_of_processing(path)
    assert (
        result.startswith("ValueError") and "13000x13000 = 169000000 pixels" in result and "max_image_pixels" in result
    )
    assert peak < 64, f"refusing a header-declared 169 Mpx image grew the peak RSS by {peak:.0f} MiB"


def test_a_16_bit_image_at_the_pixel_limit_stays_under_600_mib(tmp_path):
    """The largest image the default limit admits (2**25 pixels), in the costliest common mode (16-bit)."""
    path = tmp_path / "limit16.png"
    write_gray16_png(path, 8192, 4096)
    result, peak = peak_rss_of_processing(path)
    assert result.startswith("grid"), result
    assert peak < 600, f"a 16-bit 8192x4096 image grew the peak RSS by {peak:.0f} MiB"


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
            def do_GET(self):
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
