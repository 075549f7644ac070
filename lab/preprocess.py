"""The one preprocessing path: image bytes -> model input. NumPy and Pillow only (no torch).

Every model card carries a `Preprocessing` spec; training (to decode and cache datasets), evaluation,
both serving backends and the benchmarks all go through the functions below, so a model sees the same
pixels in the lab as in production.

    spec = Preprocessing.from_dict(card["preprocessing"])
    x = preprocess_bytes(data, spec)            # float32 (C, H, W)
    batch = normalize(np.stack(uint8_images), spec)   # uint8 NHWC -> float32 NCHW
"""
from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

RESIZE_RULES = ("shorter_side_center_crop", "stretch")
_INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "nearest": Image.Resampling.NEAREST}
MAX_SIDE = 2048                  # largest model input side and resize a card may declare
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: a 4000x3000 photo is 12 MP; a 40000x40000 "bomb" is 1600 MP
# Only these decoders see request bytes (Pillow knows many more, EPS via Ghostscript among them).
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # JPEG includes MPO (camera) files

# We enforce our own pixel limit (below) before decoding; Pillow's own check stays as a backstop,
# its warning made an error once here (warnings.catch_warnings per call is not thread-safe).
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, DEFAULT_MAX_PIXELS)
warnings.simplefilter("error", Image.DecompressionBombWarning)


class ImageError(ValueError):
    """An input that cannot become a model input. `status` is the HTTP status it deserves."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a tensor for one model; stored in its card.

    The pixels: decoded, converted to the model's channels, resized by the resize rule (for
    shorter_side_center_crop: the shorter side to `resize_size`, the model's own size when 0, then the
    central crop of `size`). The tensor: float32 x = (pixel - mean) / std, where pixel is 0..1
    (input_range "0-1", the default; pixel/255) or 0..255 ("0-255") and mean/std are in the same
    units, channels in `channel_order`, laid out as `layout` (a batch: N first)."""

    size: tuple[int, int]                     # (height, width) the model expects
    channels: int                             # 3 = RGB, 1 = grayscale (L)
    mean: tuple[float, ...]                   # per channel in channel_order, in the input range's units
    std: tuple[float, ...]
    resize: str = "shorter_side_center_crop"  # or "stretch"
    interpolation: str = "bilinear"
    layout: str = "NCHW"                      # or "NHWC"
    dtype: str = field(default="float32", init=False)
    resize_size: int = 0                      # shorter side before the central crop (0: the crop's own size)
    channel_order: str = ""                   # RGB (the default for 3 channels) or BGR; L for 1 channel
    input_range: str = "0-1"                  # or "0-255"

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.size) != 2 or not all(isinstance(v, int) and 1 <= v <= MAX_SIDE for v in self.size):
            raise ValueError(f"size must be (height, width), each 1..{MAX_SIDE}, got {self.size}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"unknown resize rule {self.resize!r}; valid: {', '.join(RESIZE_RULES)}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.input_range not in ("0-1", "0-255"):
            raise ValueError(f"input_range must be 0-1 or 0-255, got {self.input_range!r}")
        orders = ("RGB", "BGR") if self.channels == 3 else ("L",)
        if not self.channel_order:
            object.__setattr__(self, "channel_order", orders[0])
        if self.channel_order not in orders:
            raise ValueError(f"channel_order must be one of {', '.join(orders)} for {self.channels} channel(s), "
                             f"got {self.channel_order!r}")
        if self.resize_size and not (max(self.size) <= self.resize_size <= MAX_SIDE):
            raise ValueError(f"the crop {self.size[0]}x{self.size[1]} is larger than the resize to "
                             f"{self.resize_size} (resize_size must be at least the crop and at most {MAX_SIDE})")
        if self.resize_size and self.resize != "shorter_side_center_crop":
            raise ValueError("resize_size applies to the shorter_side_center_crop rule only")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image's tensor shape, without the batch axis: (C, H, W) or (H, W, C)."""
        h, w = self.size
        return (self.channels, h, w) if self.layout == "NCHW" else (h, w, self.channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        d["scale"] = f"pixel{' / 255' if self.input_range == '0-1' else ''}, then (x - mean) / std"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        channels = int(d["channels"])
        return cls(size=tuple(int(v) for v in d["size"]), channels=channels, mean=tuple(d["mean"]),
                   std=tuple(d["std"]), resize=d.get("resize", "shorter_side_center_crop"),
                   interpolation=d.get("interpolation", "bilinear"), layout=d.get("layout", "NCHW"),
                   resize_size=int(d.get("resize_size") or 0),
                   channel_order=d.get("channel_order", ""),
                   input_range=d.get("input_range", "0-1"))


# ---------------------------------------------------------------- decoding
#
# Memory: every step below is bounded before it runs. The decoded image is at most `max_pixels`; mode
# conversions run tile by tile (TILE_PIXELS at a time) into the 8-bit result; orientation is applied
# to that result; the resize never builds an intermediate larger than intermediate_limit(spec) (a thin
# image is cut to its central crop before it is enlarged). decode_estimate() gives the peak working
# memory of one decode from its header alone, so the service can budget it before any pixel is decoded.
# For every image whose resize intermediate stays within that limit (any aspect ratio up to 1024:1 at
# 32x32, 64:1 for large models) the pixels are exactly those of the straightforward pipeline
# (decode, orient, convert, resize, crop): tests/test_hardening.py checks it against a frozen copy.

TILE_PIXELS = 1 << 18          # mode conversions work on tiles of at most this many pixels
INTERMEDIATE_PIXELS = 1 << 20  # the resize builds nothing larger (at least 64 x the model's input)
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # else 4
_GRAY_HIGH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"))


def sniff(data: bytes) -> str | None:
    """The supported format these bytes claim to be, from their first bytes (None: none of ours). A file
    cut inside its signature claims it too, from its third byte on."""
    head = data[:16]
    for signature, fmt in _SIGNATURES:
        if head.startswith(signature) or (3 <= len(head) < len(signature) and signature.startswith(head)):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and len(head) >= 14:
        return "BMP"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6", b"7") \
            and head[2:3] in (b" ", b"\n", b"\r", b"\t"):
        return "PPM"
    return None


@dataclass(frozen=True)
class ImageInfo:
    """What the header of an image file says, before any pixel is decoded."""

    format: str
    mode: str
    width: int
    height: int
    progressive: bool = False

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open on the header (no pixels decoded), with our format allowlist and pixel limit."""
    if not data:
        raise ImageError("empty body: expected the bytes of an image file")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = img.size
    except UnidentifiedImageError:
        claimed = sniff(data)
        if claimed is not None:  # it starts like one of ours: a truncated or corrupt file, not a wrong type
            raise ImageError(f"corrupt or truncated {claimed} file: its header cannot be read") from None
        raise ImageError(f"not an image in a supported format ({', '.join(FORMATS)})", status=415) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large: {e}", status=413) from None
    except Exception as e:  # truncated / corrupt headers: OSError, SyntaxError, struct.error, ...
        raise ImageError(f"corrupt or truncated image: {e}") from None
    if w < 1 or h < 1:
        raise ImageError("image has no pixels")
    if w * h > max_pixels:  # checked on the header, before any pixel is decoded
        raise ImageError(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}", status=413)
    return img


def open_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, ImageInfo]:
    """The image opened on its header (no pixel decoded) and what the header says; decode_opened decodes
    it, so that a caller who checks the header first reads it once. Raises ImageError like decode_uint8."""
    img = _open(data, max_pixels)
    return img, ImageInfo(format=img.format or "", mode=img.mode, width=img.width, height=img.height,
                          progressive=bool(img.info.get("progressive") or img.info.get("progression")))


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """The header of an image file (cheap; no pixel decoded). Raises ImageError like decode_uint8."""
    return open_header(data, max_pixels)[1]


def intermediate_limit(spec: "Preprocessing") -> int:
    h, w = spec.size
    side = max(spec.resize_size, h, w)
    return max(INTERMEDIATE_PIXELS, 64 * side * side)


def decode_estimate(info: ImageInfo, spec: "Preprocessing") -> int:
    """Bytes of working memory that decoding and preprocessing this image takes at its peak, at most.

    Per pixel of the source, the largest of: the decoded image (1, 2 or 4 bytes: Pillow keeps RGB in
    4) plus what its decoder holds beside it (a progressive JPEG's coefficients, libwebp's canvases and
    a copy of them, libtiff's strip); that image plus the 8-bit result of the conversion; that result
    and its oriented copy. Per row, 8 bytes of line pointers for each of two images alive at once
    (a 1 x 40,000,000 image costs more in pointers than in pixels). Plus a fixed part: conversion tiles
    and resize intermediates, both bounded above. tests/test_hardening.py and bench/hostile.py measure
    the peak of the costliest inputs against it."""
    src = _BYTES_PER_PIXEL.get(info.mode, 4)
    bands = {"L": 1, "1": 1, "P": 1, "CMYK": 4}.get(info.mode, 3)
    extra = {"JPEG": 2 * bands if info.progressive else 0, "WEBP": 12, "TIFF": 4}.get(info.format, 0)
    out = 4 if spec.channels == 3 else 1
    per_pixel = max(src + extra, src + out, 2 * out)
    rows = 2 * 8 * max(info.width, info.height)
    fixed = 8 * TILE_PIXELS * 8 + 8 * intermediate_limit(spec) * 4 + (16 << 20)
    return info.pixels * per_pixel + rows + fixed


def _load_first_frame(img: Image.Image) -> tuple[Image.Image, int]:
    """Decode the first frame; returns it with its EXIF orientation (1..8). Raises ImageError."""
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)  # first frame of an animated GIF / WebP / APNG
        img.load()
        if img.format == "JPEG" and "exif" not in img.info and "xmp" not in img.info:
            orientation = 1  # where a JPEG's orientation would be: none (getexif() would say 1, slower)
        else:
            orientation = img.getexif().get(0x0112, 1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large: {e}", status=413) from None
    except MemoryError:
        raise ImageError("image too large to decode", status=413) from None
    except Exception as e:  # truncated / corrupt files: OSError, SyntaxError, struct.error, ...
        raise ImageError(f"corrupt or truncated image: {e}") from None
    return img, orientation if isinstance(orientation, int) else 1


def _orient(img: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> a fully decoded PIL image (first frame, EXIF orientation applied).

    Raises ImageError for empty, non-image, truncated or oversized input; never anything else.
    (decode_uint8 does not go through it: it orients the smaller 8-bit result instead.)"""
    return _orient(*_load_first_frame(_open(data, max_pixels)))


def _tiles(w: int, h: int):
    rows, cols = max(1, TILE_PIXELS // w), min(w, TILE_PIXELS)
    for y in range(0, h, rows):
        for x in range(0, w, cols):
            yield x, y, min(x + cols, w), min(y + rows, h)


def _tilewise(img: Image.Image, mode: str, fn) -> Image.Image:
    """fn (a pixel-wise conversion into `mode`) applied tile by tile: the same pixels as fn(img),
    without fn's temporaries for the whole image at once."""
    if img.width * img.height <= TILE_PIXELS:
        return fn(img)
    out = Image.new(mode, img.size)
    for box in _tiles(img.width, img.height):
        out.paste(fn(img.crop(box)), box[:2])
    return out


def _gray_rule(img: Image.Image):
    """How 16-bit / 32-bit / float grayscale maps onto 0..255: ('div', 257.0), ('mul', 255.0) or None.

    16-bit sources (I;16*, and PPM/PGM, which Pillow opens as I scaled to 0..65535) always divide by
    257, dark ones too; other I and F images decide by their largest value, as before."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PPM"):
        return ("div", 257.0)
    top = np.max(np.array([np.asarray(img.crop(b)).max() for b in _tiles(img.width, img.height)]))
    if top > 255.0:
        return ("div", 257.0)
    if img.mode == "F" and top <= 1.0:
        return ("mul", 255.0)
    return None


def _to_8bit_gray(img: Image.Image, rule) -> Image.Image:
    a = np.asarray(img, dtype=np.float64)
    if rule is not None:
        a = a / rule[1] if rule[0] == "div" else a * rule[1]
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def _convert(img: Image.Image, channels: int, rule=None) -> Image.Image:
    """One image (or tile) in any Pillow mode -> RGB or L, transparency composited on white."""
    if img.mode in _GRAY_HIGH:
        img = _to_8bit_gray(img, rule)
    elif img.mode == "La":  # premultiplied alpha: Pillow converts it only to LA
        img = img.convert("LA")
    elif img.mode == "RGBa":
        img = img.convert("RGBA")
    elif (img.mode == "P" and "transparency" in img.info) or img.mode == "PA":
        img = img.convert("RGBA")
    elif img.mode not in ("1", "L", "LA", "RGB", "RGBA", "P"):  # CMYK, YCbCr, LAB, HSV, ...
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    target = "RGB" if channels == 3 else "L"
    return img if img.mode == target else img.convert(target)


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> RGB (channels=3) or L (channels=1). Transparency is composited on white;
    16-bit and float grayscale is scaled onto 0..255 (see _gray_rule). Works tile by tile."""
    target = "RGB" if channels == 3 else "L"
    if img.mode == target:
        return img
    rule = _gray_rule(img) if img.mode in _GRAY_HIGH else None
    return _tilewise(img, target, lambda tile: _convert(tile, channels, rule))


def resize(img: Image.Image, spec: Preprocessing) -> Image.Image:
    """The card's resize rule. Shorter side to the target then the central crop: resized whole when
    that stays within intermediate_limit(spec); else (a thin image) only the source region that the
    crop keeps is resampled, straight to the target size (the same geometry and filter)."""
    h, w = spec.size
    if img.size == (w, h) and not spec.resize_size:
        return img
    resample = _INTERPOLATION[spec.interpolation]
    if spec.resize == "stretch":  # reducing_gap: reduced by an integer factor before any enlargement
        return img.resize((w, h), resample, reducing_gap=3.0)
    if spec.resize_size:
        scale = spec.resize_size / min(img.width, img.height)
    else:
        scale = max(w / img.width, h / img.height)
    new = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    if new[0] * new[1] <= intermediate_limit(spec):
        img = img.resize(new, resample, reducing_gap=3.0)
        return img.crop((left, top, left + w, top + h))
    sx, sy = img.width / new[0], img.height / new[1]
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    return img.resize((w, h), resample, box=box, reducing_gap=3.0)


def to_uint8(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """A decoded image -> uint8 array (H, W, C) at the model's size, in the model's channels."""
    a = np.asarray(resize(to_mode(img, spec.channels), spec), dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def normalize(images: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 (N, H, W, C) or (H, W, C), channels RGB (or L) -> float32 in the model's layout (NCHW: (N, C, H, W)
    or (C, H, W); NHWC: as given), normalised, in the model's channel order."""
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {images.dtype}")
    unit = 255.0 if spec.input_range == "0-1" else 1.0
    mean = np.asarray(spec.mean, dtype=np.float32) * unit
    inv_std = 1.0 / (np.asarray(spec.std, dtype=np.float32) * unit)
    if spec.channel_order == "BGR":  # mean and std are given in the model's channel order
        images = images[..., ::-1]
    x = (images.astype(np.float32) - mean) * inv_std
    return np.ascontiguousarray(x if spec.layout == "NHWC" else np.moveaxis(x, -1, -3))


def decode_uint8(data: bytes, spec: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image file bytes -> uint8 (H, W, C) at the model's size. Raises ImageError, nothing else."""
    return decode_opened(_open(data, max_pixels), spec)


def decode_opened(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """An image opened by open_header -> uint8 (H, W, C) at the model's size. Raises ImageError.

    First frame, converted to the model's channels (tile by tile), then EXIF-oriented, resized, cropped:
    conversions are pixel-wise, so orienting after them gives the same pixels as orienting first, on
    an image of 1 or 4 bytes per pixel instead of the source's."""
    img, orientation = _load_first_frame(img)
    mode = img.mode
    try:
        return to_uint8(_orient(to_mode(img, spec.channels), orientation), spec)
    except MemoryError:
        raise ImageError("image too large to convert", status=413) from None
    except Exception as e:  # a mode Pillow cannot convert
        raise ImageError(f"cannot convert a {mode} image to {'RGB' if spec.channels == 3 else 'L'}: {e}",
                         status=415) from None


def preprocess_bytes(data: bytes, spec: Preprocessing,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image file bytes -> float32 (C, H, W), ready for either backend."""
    return normalize(decode_uint8(data, spec, max_pixels), spec)
