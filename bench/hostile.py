"""Hostile inputs against a real `bentoml serve`: status, time and the worker's peak RSS per case.

    python bench/hostile.py                         # every case, against cifar10-airbench:latest
    python bench/hostile.py --model cifar10-airbench-smoke --cases thin,http --flood 520
    python bench/hostile.py --list

It starts its own service on 127.0.0.1 (bench/server.py; LAB_WORKERS=1) against the model store of
$BENTOML_HOME, then runs each case: the thin PNGs that used to take gigabytes, the costliest images
allowed by the pixel limit, bombs, truncated and corrupt files, malformed HTTP, huge and many headers,
idle / slow-header / stalled-body connections by the hundred (while a good client, from another
loopback address, measures what it gets), disconnects mid-upload, an overload burst, multipart abuse,
and malformed requests of the Open Inference Protocol (POST /v2/models/{model}/infer, serving/v2.py).
Before each case the worker's peak-RSS counter is reset (/proc/<pid>/clear_refs), so `peak MiB` is
that case's own peak. After each case a good request must still get 200 ("serves").

The stated bound (docs/serving.md, "Worst-case memory of a worker") is printed with the table: the worker's warm
RSS (after --warmup seconds of load at concurrency 64 on every backend, so that inference arenas and
caches have grown to full batches; plus 5% for the allocator's drift) + LAB_MAX_DECODE_BYTES +
LAB_MAX_INFLIGHT_BYTES + connections x 100 KiB; a case whose peak passes it is flagged. Writes
reports/hostile-<time>/hostile.json.
Exit status 1 if any case got a 5xx other than 503, hung, broke the service or passed the bound.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import sys
import threading
import time
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from bench.samples import encode, gradient, solid_png
from bench.server import REPO, Server

MiB = 1 << 20


# ---------------------------------------------------------------- the worker process


def workers(server: Server) -> list:
    import psutil

    try:
        root = psutil.Process(server.proc.pid)
        return [p for p in root.children(recursive=True) if "_bentoml_impl.worker" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def _status(pid: int, key: str) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak(pids) -> None:
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            pass


def peak_rss(pids) -> int:
    return max((_status(p, "VmHWM") for p in pids), default=0)


def rss(pids) -> int:
    return max((_status(p, "VmRSS") for p in pids), default=0)


def open_files(procs) -> int:
    n = 0
    for p in procs:
        try:
            n += p.num_fds()
        except Exception:
            pass
    return n


# ---------------------------------------------------------------- clients


class Ctx:
    def __init__(self, server: Server, flood: int, good: bytes, model: str = "cifar10-airbench"):
        self.server, self.flood, self.good, self.model = server, flood, good, model
        self.host, self.port = "127.0.0.1", server.port

    def post(self, data: bytes, ctype: str = "image/png", path: str = "/classify", timeout: float = 120, **kw):
        t = time.perf_counter()
        try:
            r = requests.post(f"{self.server.url}{path}", data=data, headers={"Content-Type": ctype},
                              timeout=timeout, **kw)
            return r.status_code, time.perf_counter() - t, _error(r)
        except requests.RequestException as e:
            return f"conn:{type(e).__name__}", time.perf_counter() - t, ""

    def good_request(self, source: str = "127.0.0.2", timeout: float = 30) -> tuple:
        """One good request from another loopback address: (status, seconds)."""
        t = time.perf_counter()
        try:
            s = socket.create_connection((self.host, self.port), timeout=timeout, source_address=(source, 0))
            status, _ = _exchange(s, _request(self.good, "image/png"), timeout)
            return status, time.perf_counter() - t
        except OSError as e:
            return f"conn:{type(e).__name__}", time.perf_counter() - t


def _error(r) -> str:
    try:
        return str(r.json().get("error", ""))[:90]
    except ValueError:
        return r.text[:90]


def _request(body: bytes, ctype: str, path: str = "/classify", extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            .encode() + extra + b"\r\n" + body)


def http_exchange(s: socket.socket, payload: bytes, timeout: float) -> bytes:
    """Send payload (a refused send is not an error: the server may answer before it reads it all), then
    read until the server closes or one response is complete; close the socket; the bytes received."""
    s.settimeout(timeout)
    try:
        s.sendall(payload)
    except OSError:
        pass
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n")
                               if l.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    break
    except OSError:
        pass
    finally:
        s.close()
    return data


def _exchange(s: socket.socket, payload: bytes, timeout: float) -> tuple:
    """(status, the first 200 bytes of the body), or ('closed' | 'garbled', what came)."""
    data = http_exchange(s, payload, timeout)
    try:
        return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2][:200]
    except (IndexError, ValueError):
        return ("closed" if not data else "garbled"), data[:80]


def raw(ctx: Ctx, payload: bytes, timeout: float = 60, chunks: int = 0):
    t = time.perf_counter()
    try:
        s = socket.create_connection((ctx.host, ctx.port), timeout=timeout)
    except OSError as e:
        return f"conn:{type(e).__name__}", 0.0, ""
    status, body = _exchange(s, payload, timeout)
    return status, time.perf_counter() - t, body.decode("utf-8", "replace")[:90]


async def _hold(host, port, first: bytes, drip: bytes, every: float, until: float, results: list):
    """Open a connection, send `first`, then `drip` every `every` s; record when the server cut it."""
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        results.append(("refused", 0.0))
        return
    try:
        if first:
            writer.write(first)
            await writer.drain()
        while time.perf_counter() < until:
            try:
                data = await asyncio.wait_for(reader.read(4096), timeout=every if drip else until - time.perf_counter())
                status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else ("closed" if not data else "?")
                results.append((status, time.perf_counter() - t0))
                return
            except asyncio.TimeoutError:
                if drip:
                    writer.write(drip)
                    await writer.drain()
            except (OSError, ValueError, IndexError):
                results.append(("reset", time.perf_counter() - t0))
                return
        results.append(("held", time.perf_counter() - t0))
    except OSError:
        results.append(("reset", time.perf_counter() - t0))
    finally:
        writer.close()


def flood(ctx: Ctx, first: bytes, drip: bytes = b"", every: float = 1.0, seconds: float = 40):
    """ctx.flood connections holding on (idle, dripping headers, or a stalled body) while a good client
    from 127.0.0.2 (and one from 127.0.0.1) sends a request every second. Returns the case result."""
    results: list = []
    until = time.perf_counter() + seconds

    async def main():
        await asyncio.gather(*(_hold(ctx.host, ctx.port, first, drip, every, until, results)
                               for _ in range(ctx.flood)))

    start = time.perf_counter()
    t = threading.Thread(target=lambda: asyncio.run(main()))
    t.start()
    time.sleep(2)
    probes, probes_same, recovered = [], [], None
    while t.is_alive() or (recovered is None and time.perf_counter() - start < seconds + 15):
        probes.append(ctx.good_request("127.0.0.2", timeout=30))
        same = ctx.good_request("127.0.0.1", timeout=30)
        if same[0] == 200 and recovered is None:
            recovered = time.perf_counter() - start
        elif same[0] != 200:
            recovered = None
        if t.is_alive():
            probes_same.append(same)
        time.sleep(0.5)
    t.join()
    cut = [s for s, _ in results if s not in ("held",)]
    by_status: dict = {}
    for s, _ in results:
        by_status[str(s)] = by_status.get(str(s), 0) + 1
    good_ok = sum(1 for s, _ in probes if s == 200)
    same_ok = sum(1 for s, _ in probes_same if s == 200)
    worst = max((dt for _, dt in probes), default=0)
    held = sorted(dt for s, dt in results if s not in ("held", "refused", 503))  # accepted, then cut
    refused = sum(1 for s, _ in results if s in (503, "refused"))
    return {"status": by_status, "seconds": held[-1] if held else 0.0,
            "detail": f"{len(cut)}/{len(results)} cut: {refused} refused at once, the rest after "
                      f"{held[0] if held else 0:.1f}-{held[-1] if held else 0:.1f} s; other address "
                      f"{good_ok}/{len(probes)} ok (worst {worst:.2f} s); same address {same_ok}/{len(probes_same)} "
                      f"ok during, ok again {recovered if recovered is not None else float('nan'):.1f} s after the start",
            "good_statuses": [s for s, _ in probes]}


# ---------------------------------------------------------------- inputs


def progressive_jpeg(w, h, mode="RGB"):
    img = Image.new(mode, (w, h), (30, 120, 200, 10)[:len(mode)] if mode != "L" else 90)
    return encode(img, "JPEG", progressive=True, quality=90, subsampling=0)


def bmp_rle8(w, h) -> bytes:
    """An 8-bit RLE BMP of w x h: one run of 255 pixels after another (Pillow decodes RLE in Python)."""
    row = b"\xff\x01" * (w // 255) + (bytes([w % 255, 1]) if w % 255 else b"") + b"\x00\x00"
    pixels = row * h + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    header = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    off = 14 + len(header) + len(palette)
    return b"BM" + struct.pack("<IHHI", off + len(pixels), 0, 0, off) + header + palette + pixels


def plain_pgm(w, h) -> bytes:
    return f"P2\n{w} {h}\n255\n".encode() + b"128 " * (w * h)


def jpeg_header_bomb() -> bytes:
    data = bytearray(encode(gradient(16, 16), "JPEG"))
    i = data.index(b"\xff\xc0")  # SOF0: height, width at +5, +7
    data[i + 5:i + 9] = struct.pack(">HH", 65500, 65500)
    return bytes(data)


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "hostileboundary") -> tuple[bytes, str]:
    out = []
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _image_case(data_fn, ctype="image/png"):
    def case(ctx: Ctx):
        data = data_fn()
        status, dt, err = ctx.post(data, ctype)
        return {"status": status, "seconds": dt, "detail": f"{len(data):,} bytes; {err}"}
    return case


def _raw_case(payload_fn, timeout=60):
    def case(ctx: Ctx):
        status, dt, body = raw(ctx, payload_fn(), timeout=timeout)
        return {"status": status, "seconds": dt, "detail": body}
    return case


def huge_header_streamed(ctx: Ctx, total: int = 128 * MiB):
    """Send one header line of `total` bytes in 1 MiB pieces until the server answers or cuts."""
    t = time.perf_counter()
    s = socket.create_connection((ctx.host, ctx.port), timeout=30)
    sent = 0
    try:
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Huge: ")
        piece = b"a" * MiB
        while sent < total:
            s.sendall(piece)
            sent += len(piece)
    except OSError:
        pass
    status, body = _exchange(s, b"", 10)
    return {"status": status, "seconds": time.perf_counter() - t, "detail": f"cut after {sent / MiB:.0f} MiB sent"}


def disconnects(ctx: Ctx, n: int = 600):
    """n uploads that send their headers and half the body, then vanish."""
    body = encode(gradient(256, 256), "PNG")
    t = time.perf_counter()
    for i in range(n):
        try:
            s = socket.create_connection((ctx.host, ctx.port), timeout=5)
            s.sendall(_request(body, "image/png")[: 120 + len(body) // 2])
            if i % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            s.close()
        except OSError:
            pass
    time.sleep(1)
    return {"status": "sent", "seconds": time.perf_counter() - t, "detail": f"{n} half uploads dropped"}


def overload(ctx: Ctx, clients: int = 600, addresses: int = 8):
    """`clients` concurrent requests at once (more than the in-flight cap), from `addresses` loopback
    addresses (127.0.0.2, ...) so that the per-client caps do not bind first."""
    import aiohttp

    results = []

    async def one(session):
        t = time.perf_counter()
        try:
            async with session.post(f"{ctx.server.url}/classify", data=ctx.good,
                                    headers={"Content-Type": "image/png"},
                                    timeout=aiohttp.ClientTimeout(total=120)) as r:
                await r.read()
                results.append((r.status, time.perf_counter() - t))
        except Exception as e:
            results.append((f"conn:{type(e).__name__}", time.perf_counter() - t))

    async def main():
        sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            limit=0, force_close=True, local_addr=(f"127.0.0.{2 + k}", 0))) for k in range(addresses)]
        try:
            await asyncio.gather(*(one(sessions[i % addresses]) for i in range(clients)))
        finally:
            for s in sessions:
                await s.close()

    t = time.perf_counter()
    asyncio.run(main())
    by: dict = {}
    for s, _ in results:
        by[str(s)] = by.get(str(s), 0) + 1
    t503 = sorted(dt for s, dt in results if s == 503)
    return {"status": by, "seconds": time.perf_counter() - t,
            "detail": f"503s answered in p50 {1000 * t503[len(t503) // 2] if t503 else 0:.0f} ms, "
                      f"max {1000 * t503[-1] if t503 else 0:.0f} ms",
            "good_statuses": [s for s, _ in results]}


def _v2_case(head_fn, tail: bytes = b"", header_length=None, extra: bytes = b""):
    """POST /v2/models/{model}/infer, raw, with no Content-Type (as tritonclient sends it): a JSON header
    (bytes, or an object to dump), then `tail`; Inference-Header-Content-Length when there is a tail."""
    def case(ctx: Ctx):
        head = head_fn() if callable(head_fn) else head_fn
        head = head if isinstance(head, bytes) else json.dumps(head).encode()
        if tail or header_length is not None:
            extra_ = extra + f"Inference-Header-Content-Length: {len(head) if header_length is None else header_length}\r\n".encode()
        else:
            extra_ = extra
        body = head + tail
        payload = (f"POST /v2/models/{ctx.model}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                   .encode() + extra_ + b"\r\n" + body)
        status, dt, detail = raw(ctx, payload)
        return {"status": status, "seconds": dt, "detail": f"{len(body):,} bytes; {detail}"}
    return case


def _v2_image(size: int) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": size}}]}


def build_cases(quick: bool) -> dict:
    big = 2_000_000 if quick else 40_000_000  # pixels of the "largest allowed" images
    side = int(big ** 0.5)
    c: dict = {}
    # thin images: the resize used to build hundreds of megapixels from them
    c["thin png 5,000,000x8"] = ("thin", _image_case(lambda: solid_png(5_000_000, 8, "RGB")))
    c["thin png 6,666,666x6"] = ("thin", _image_case(lambda: solid_png(6_666_666, 6, "RGB")))
    c["thin png 10,000,000x4"] = ("thin", _image_case(lambda: solid_png(10_000_000, 4, "RGB")))
    c["thin png 65,536x1 (275 B)"] = ("thin", _image_case(lambda: solid_png(65536, 1, "RGB")))
    c["tall png 8x5,000,000"] = ("thin", _image_case(lambda: solid_png(8, 5_000_000, "RGB")))
    c["tall png 1x40,000,000"] = ("thin", _image_case(lambda: solid_png(1, 40_000_000, "L")))
    # the costliest images the pixel limit allows
    c[f"rgba png {side}x{side}"] = ("big", _image_case(lambda: solid_png(side, side, "RGBA")))
    c[f"16-bit png {side}x{side}"] = ("big", _image_case(lambda: solid_png(side, side, "I;16")))
    c[f"progressive cmyk jpeg {side}x{side}"] = ("big", _image_case(lambda: progressive_jpeg(side, side, "CMYK"),
                                                                     "image/jpeg"))
    c[f"webp rgba {min(16383, big // 2441)}x2441"] = ("big", _image_case(
        lambda: encode(Image.new("RGBA", (min(16383, big // 2441), 2441), (1, 2, 3, 4)), "WEBP", lossless=True),
        "image/webp"))
    c[f"rle8 bmp {side}x{side}"] = ("big", _image_case(lambda: bmp_rle8(side, side), "image/bmp"))
    c["plain pgm 1500x1500 (9 MB of text)"] = ("big", _image_case(lambda: plain_pgm(1500, 1500),
                                                                  "image/x-portable-graymap"))
    # bombs
    c["png bomb 40000x40000"] = ("bomb", _image_case(lambda: solid_png(40000, 40000, "L", 0)))
    c["jpeg header 65500x65500"] = ("bomb", _image_case(jpeg_header_bomb, "image/jpeg"))
    c["png 1x1 + 9 MB of zlib"] = ("bomb", _image_case(lambda: solid_png(1, 1) + zlib.compress(b"\0" * 200 * MiB)))
    # truncated and corrupt
    jpg = encode(gradient(64, 64), "JPEG")
    png = encode(gradient(64, 64), "PNG")
    for n in (4, 11, 30, len(jpg) // 2):
        c[f"jpeg truncated at {n} B"] = ("corrupt", _image_case(lambda n=n: jpg[:n], "image/jpeg"))
    c["png truncated at 20 B"] = ("corrupt", _image_case(lambda: png[:20]))
    c["gif truncated at 8 B"] = ("corrupt", _image_case(lambda: encode(gradient(8, 8).convert("P"), "GIF")[:8],
                                                        "image/gif"))
    c["webp truncated at 14 B"] = ("corrupt", _image_case(lambda: encode(gradient(8, 8), "WEBP")[:14], "image/webp"))
    c["jpeg with flipped bytes"] = ("corrupt", _image_case(
        lambda: bytes(b ^ 0x5A if 200 < i < 400 else b for i, b in enumerate(jpg)), "image/jpeg"))
    c["random bytes 1 MB"] = ("corrupt", _image_case(lambda: os.urandom(MiB), "image/jpeg"))
    c["empty body"] = ("corrupt", _image_case(lambda: b"", "image/jpeg"))
    # HTTP
    c["malformed request line"] = ("http", _raw_case(lambda: b"GARBAGE / NOTHTTP\r\n\r\n"))
    c["HTTP/0.9 style"] = ("http", _raw_case(lambda: b"GET /\r\n\r\n"))
    c["405 GET /classify"] = ("http", _raw_case(lambda: b"GET /classify HTTP/1.1\r\nHost: x\r\n\r\n"))
    c["404 unknown path"] = ("http", _raw_case(lambda: b"GET /no/such/path HTTP/1.1\r\nHost: x\r\n\r\n"))
    c["bad Content-Length"] = ("http", _raw_case(
        lambda: b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n"))
    c["Content-Length 10 GB"] = ("http", _raw_case(
        lambda: b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 10000000000\r\n\r\n"))
    c["chunked body over the limit"] = ("http", _raw_case(
        lambda: b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"100000\r\n" + b"\0" * 0x100000 + b"\r\n") * 12 + b"0\r\n\r\n"))
    c["Content-Length longer than the body"] = ("http", _raw_case(
        lambda: b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nabc"))
    c["one 1 MiB header"] = ("http", _raw_case(lambda: b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MiB
                                                + b"\r\n\r\n"))
    c["one 128 MiB header, streamed"] = ("http", huge_header_streamed)
    c["10,000 headers"] = ("http", _raw_case(lambda: b"GET /livez HTTP/1.1\r\n"
                                              + b"".join(b"X-%d: 1\r\n" % i for i in range(10000)) + b"\r\n"))
    # multipart
    c["multipart: 10,000 files"] = ("multipart", lambda ctx: _multi(ctx, [("images", f"{i}.png", b"x")
                                                                         for i in range(10000)], "/classify_batch"))
    c["multipart: 65 images"] = ("multipart", lambda ctx: _multi(ctx, [("images", f"{i}.png", ctx.good)
                                                                      for i in range(65)], "/classify_batch"))
    c["multipart: 100 text fields"] = ("multipart", lambda ctx: _multi(ctx, [(f"f{i}", None, b"v") for i in range(100)]
                                                                      + [("image", "a.png", ctx.good)]))
    c["multipart: 1 MB text field"] = ("multipart", lambda ctx: _multi(ctx, [("backend", None, b"a" * MiB),
                                                                            ("image", "a.png", ctx.good)]))
    c["multipart: 8 KB part header"] = ("multipart", lambda ctx: _multi_raw(
        ctx, b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"" + b"a" * 8192
        + b"\"\r\n\r\nxx\r\n--b--\r\n", "multipart/form-data; boundary=b"))
    c["multipart: truncated"] = ("multipart", lambda ctx: _multi_raw(
        ctx, multipart([("image", "a.png", ctx.good)])[0][:-30], multipart([])[1]))
    c["multipart: no boundary"] = ("multipart", lambda ctx: _multi_raw(ctx, b"xx", "multipart/form-data"))
    # the Open Inference Protocol
    c["v2: header not JSON"] = ("v2", _v2_case(b"{not json"))
    c["v2: JSON nested 1,000,000 deep"] = ("v2", _v2_case(lambda: b"[" * 1_000_000 + b"]" * 1_000_000))
    c["v2: 10 MB JSON of {} (parse cost past the budget)"] = ("v2", _v2_case(
        lambda: b'{"inputs": [' + b",".join([b"{}"] * 3_400_000) + b"]}"))
    c["v2: Inference-Header-Content-Length 10^30"] = ("v2", _v2_case(_v2_image(8), b"\0" * 8, 10 ** 30))
    c["v2: Inference-Header-Content-Length -1"] = ("v2", _v2_case(_v2_image(8), b"\0" * 8, -1))
    c["v2: binary_data_size 2^64"] = ("v2", _v2_case(_v2_image(2 ** 64), b"\0" * 8))
    c["v2: BYTES element of 4 GB declared"] = ("v2", _v2_case(_v2_image(8), struct.pack("<I", 2 ** 32 - 1) + b"abcd"))
    c["v2: shape of 10^12 images"] = ("v2", _v2_case({"inputs": [{"name": "pixels", "datatype": "UINT8",
                                                                    "shape": [10 ** 12, 32, 32, 3], "data": [0]}]}))
    c["v2: png bomb 40000x40000 as BYTES"] = ("v2", _v2_case(
        lambda: _v2_image(4 + len(solid_png(40000, 40000, "L", 0))),
        tail=(lambda b: struct.pack("<I", len(b)) + b)(solid_png(40000, 40000, "L", 0))))
    c["v2: gzip Content-Encoding"] = ("v2", _v2_case({"inputs": []}, extra=b"Content-Encoding: gzip\r\n"))
    # connections
    c["idle connections"] = ("conn", lambda ctx: flood(ctx, b"", seconds=25))
    c["slow headers (1 byte/s)"] = ("conn", lambda ctx: flood(ctx, b"POST /classify HTTP/1.1\r\n", b"X", 1.0, 25))
    c["stalled bodies"] = ("conn", lambda ctx: flood(
        ctx, b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\nabc",
        seconds=25))
    c["slow bodies (1 byte/s)"] = ("conn", lambda ctx: flood(
        ctx, b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\nabc",
        b"x", 1.0, 40))
    c["600 disconnects mid-upload"] = ("conn", disconnects)
    c["overload: 600 clients at once"] = ("conn", overload)
    return c


def _multi(ctx: Ctx, parts, path="/classify"):
    body, ctype = multipart(parts)
    status, dt, err = ctx.post(body, ctype, path)
    return {"status": status, "seconds": dt, "detail": f"{len(body):,} bytes; {err}"}


def _multi_raw(ctx: Ctx, body: bytes, ctype: str):
    status, dt, err = ctx.post(body, ctype)
    return {"status": status, "seconds": dt, "detail": err}


# ---------------------------------------------------------------- the run


def warm_up(server: Server, seconds: float, pids) -> int:
    """Load at c=64 on every backend the default model serves (full batches); the worker's RSS after."""
    from bench.loadgen import Sample, closed_loop, run

    if seconds <= 0:
        return rss(pids)
    info = requests.get(f"{server.url}/models/", timeout=10).json()
    backends = info["models"][info["default"]]["backends"] if info.get("default") else ["onnx"]
    rng = np.random.default_rng(0)
    samples = [Sample(encode(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "PNG"),
                      "image/png") for _ in range(64)]
    for b in backends:
        run(closed_loop(f"{server.url}/classify?backend={b}", samples, 64, duration=seconds / len(backends)))
    time.sleep(1)
    return rss(pids)



def bad_status(status) -> bool:
    """A 5xx other than 503, a hang, or anything that is not an HTTP answer where one was due."""
    if isinstance(status, dict):
        return any(bad_status(int(s)) if s.isdigit() else s not in ("closed", "reset", "refused", "held", "sent")
                   for s in status)
    if isinstance(status, int):
        return status >= 500 and status != 503
    return status not in ("closed", "reset", "sent")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10-airbench", help="model name served by default")
    ap.add_argument("--cases", default="all", help="comma-separated groups or names (thin, big, bomb, corrupt, "
                                                   "http, multipart, v2, conn) or 'all'")
    ap.add_argument("--flood", type=int, default=520, help="connections per connection-flood case")
    ap.add_argument("--quick", action="store_true", help="2 MP instead of 40 MP for the largest images")
    ap.add_argument("--warmup", type=float, default=60, help="seconds of load at c=64 before the baseline")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service (repeatable)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    cases = build_cases(args.quick)
    if args.list:
        for name, (group, _) in cases.items():
            print(f"{group:10s} {name}")
        return 0
    wanted = set(args.cases.split(","))
    chosen = {n: fn for n, (g, fn) in cases.items() if "all" in wanted or g in wanted or n in wanted}
    out = args.out or REPO / "reports" / f"hostile-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    extra = {"LAB_DEFAULT_MODEL": args.model, "LAB_WORKERS": "1", **dict(e.split("=", 1) for e in args.env)}
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="True", PYTHONPATH=str(REPO))
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # this client opens connections by the hundred
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the service too when we are stopped
    print(f"starting bentoml serve (model {args.model}) ...", flush=True)
    server = Server(env, out / "serve.log", extra)
    try:
        return _run(server, chosen, args, out, extra)
    finally:
        server.stop()


def _run(server, chosen, args, out, extra) -> int:
    from serving.config import Settings

    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    settings = Settings.from_env()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    good = encode(gradient(32, 32), "PNG")
    ctx = Ctx(server, args.flood, good, args.model)
    procs = workers(server)
    pids = [p.pid for p in procs]
    rest = rss(pids)
    base = warm_up(server, args.warmup, pids)
    bound = int(base * 1.05) + settings.max_decode_bytes + settings.max_inflight_bytes \
        + settings.max_connections * 100 * 1024
    print(f"worker pid(s) {pids}: RSS at rest {rest / MiB:.0f} MiB, warm {base / MiB:.0f} MiB (after "
          f"{args.warmup:g} s at c=64 on every backend); stated bound {bound / MiB:.0f} MiB (warm + 5% + decode "
          f"{settings.max_decode_bytes / MiB:.0f} + in-flight bytes {settings.max_inflight_bytes / MiB:.0f} + "
          f"{settings.max_connections} connections x 100 KiB)", flush=True)
    fds0 = open_files(procs)
    rows = []
    print(f"{'case':42s} {'status':>22s} {'seconds':>8s} {'peak MiB':>9s} {'serves':>6s}  detail")
    for name, fn in chosen.items():
        reset_peak(pids)
        t = time.perf_counter()
        try:
            res = fn(ctx)
        except Exception as e:
            res = {"status": f"client error {type(e).__name__}", "seconds": time.perf_counter() - t, "detail": str(e)[:90]}
        peak = peak_rss(pids)
        after = ctx.post(good, timeout=60)[0]
        row = {"case": name, **res, "peak_rss_mib": round(peak / MiB, 1), "rss_after_mib": round(rss(pids) / MiB, 1),
               "serves_after": after == 200, "within_bound": peak <= bound}
        row["bad"] = bad_status(res["status"]) or after != 200 or peak > bound or any(
            bad_status(s) for s in res.get("good_statuses", []) if isinstance(s, int))
        rows.append(row)
        status = json.dumps(res["status"]) if isinstance(res["status"], dict) else str(res["status"])
        print(f"{name[:42]:42s} {status[:22]:>22s} {res['seconds']:8.2f} {peak / MiB:9.0f} "
              f"{'yes' if after == 200 else 'NO':>6s}  {'!! ' if row['bad'] else ''}{str(res.get('detail', ''))[:70]}",
              flush=True)
    time.sleep(2)
    fds1 = open_files(procs)
    log = server.log()
    summary = {"model": args.model, "settings": {k: getattr(settings, k) for k in (
        "max_pixels", "max_body_bytes", "max_inflight", "max_inflight_bytes", "max_decode_bytes", "header_timeout",
        "read_timeout", "body_timeout", "max_header_bytes", "max_headers", "max_connections",
        "max_connections_per_client", "max_inflight_per_client")},
        "rss_at_rest_mib": round(rest / MiB, 1), "rss_warm_mib": round(base / MiB, 1), "bound_mib": round(bound / MiB, 1),
        "max_peak_mib": max((r["peak_rss_mib"] for r in rows), default=0),
        "open_files_before": fds0, "open_files_after": fds1, "tracebacks_in_log": log.count("Traceback"),
        "bad_cases": [r["case"] for r in rows if r["bad"]], "cases": rows}
    (out / "hostile.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nworker RSS warm {base / MiB:.0f} MiB, highest peak {summary['max_peak_mib']:.0f} MiB, stated bound "
          f"{bound / MiB:.0f} MiB; open files {fds0} -> {fds1}; tracebacks in the log: {summary['tracebacks_in_log']}")
    print(f"cases with a 5xx other than 503, a hang, a broken service or a peak over the bound: "
          f"{', '.join(summary['bad_cases']) or 'none'}")
    print(f"wrote {out / 'hostile.json'}")
    return 1 if summary["bad_cases"] else 0


if __name__ == "__main__":
    sys.exit(main())
