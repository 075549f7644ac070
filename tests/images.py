"""Image files for service tests: awkward-but-valid ones, and broken ones, as bytes."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from bench.samples import encode, gradient, solid_png  # noqa: F401  (solid_png: thin PNGs and bombs, tiny on the wire)


def awkward_valid() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, content type): each must be classified with 200."""
    base = gradient(48, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    p_transparent = base.convert("P", palette=Image.Palette.ADAPTIVE)
    p_transparent.info["transparency"] = 0
    frames = [gradient(32, 32), Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    i16 = Image.fromarray((np.linspace(0, 65535, 40 * 48).reshape(40, 48)).astype(np.uint16))
    return {
        "grayscale_png": (encode(base.convert("L"), "PNG"), "image/png"),
        "la_png": (encode(base.convert("LA"), "PNG"), "image/png"),
        "16bit_png": (encode(i16, "PNG"), "image/png"),
        "cmyk_jpeg": (encode(base.convert("CMYK"), "JPEG"), "image/jpeg"),
        "palette_png": (encode(base.convert("P"), "PNG"), "image/png"),
        "palette_transparent_png": (encode(p_transparent, "PNG"), "image/png"),
        "rgba_png": (encode(rgba, "PNG"), "image/png"),
        "1x1_png": (encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), "image/png"),
        "4000x3000_jpeg": (encode(gradient(4000, 3000), "JPEG", quality=80), "image/jpeg"),
        "webp": (encode(base, "WEBP"), "image/webp"),
        "bmp": (encode(base, "BMP"), "image/bmp"),
        "tiff": (encode(base, "TIFF"), "image/tiff"),
        "animated_gif": (gif.getvalue(), "image/gif"),
        "exif_rotated_jpeg": (encode(base, "JPEG", exif=exif.tobytes()), "image/jpeg"),
        "octet_stream_png": (encode(base, "PNG"), "application/octet-stream"),
    }


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb(side: int = 40000) -> bytes:
    """A valid grayscale PNG of side x side black pixels: about 1.5 MB on disk, 1.6 GB decoded."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [comp.compress(row) for _ in range(side)]
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def broken() -> dict[str, tuple[bytes, str, int]]:
    """name -> (bytes, content type, expected status)."""
    jpeg = encode(gradient(64, 64), "JPEG")
    png = encode(gradient(64, 64), "PNG")
    corrupt_png = bytearray(png)
    corrupt_png[60:90] = b"\xff" * 30  # inside IDAT: a CRC / zlib error
    return {
        "empty": (b"", "image/jpeg", 400),
        "text": (b"hello, this is not an image", "image/jpeg", 415),
        "html": (b"<html><body>hi</body></html>", "image/png", 415),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "image/jpeg", 400),
        "truncated_png": (png[: len(png) // 2], "image/png", 400),
        "corrupt_png": (bytes(corrupt_png), "image/png", 400),
        "json_content_type": (b'{"image": "x"}', "application/json", 415),
    }

