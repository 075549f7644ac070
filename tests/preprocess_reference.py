"""A frozen copy of lab/preprocess.py as it was before the bounded-memory rewrite (commit b368ca8).

tests/test_hardening.py decodes normal images through it and through lab.preprocess and requires
byte-identical pixels: training caches and served accuracy must not move. Never edit it."""

import io
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_RULES = ("shorter_side_center_crop", "stretch")
_INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "nearest": Image.Resampling.NEAREST}
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
    """How an image becomes a tensor for one model; stored in its card."""

    size: tuple[int, int]                     # (height, width) the model expects
    channels: int                             # 3 = RGB, 1 = grayscale (L)
    mean: tuple[float, ...]                   # per channel, on the 0..1 scale
    std: tuple[float, ...]
    resize: str = "shorter_side_center_crop"  # or "stretch"
    interpolation: str = "bilinear"
    layout: str = field(default="NCHW", init=False)
    dtype: str = field(default="float32", init=False)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"unknown resize rule {self.resize!r}; valid: {', '.join(RESIZE_RULES)}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        d["channel_order"] = "RGB" if self.channels == 3 else "L"
        d["scale"] = "pixel / 255, then (x - mean) / std"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(size=tuple(d["size"]), channels=int(d["channels"]), mean=tuple(d["mean"]),
                   std=tuple(d["std"]), resize=d.get("resize", "shorter_side_center_crop"),
                   interpolation=d.get("interpolation", "bilinear"))


# ---------------------------------------------------------------- decoding


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> a fully decoded PIL image (first frame, EXIF orientation applied).

    Raises ImageError for empty, non-image, truncated or oversized input; never anything else.
    """
    if not data:
        raise ImageError("empty body: expected the bytes of an image file")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = img.size
        if w * h > max_pixels:  # checked on the header, before any pixel is decoded
            raise ImageError(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}", status=413)
        if getattr(img, "is_animated", False):
            img.seek(0)  # first frame of an animated GIF / WebP / APNG
        img.load()
        img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image in a supported format ({', '.join(FORMATS)})", status=415) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large: {e}", status=413) from None
    except MemoryError:
        raise ImageError("image too large to decode", status=413) from None
    except Exception as e:  # truncated / corrupt files: OSError, SyntaxError, struct.error, ...
        raise ImageError(f"corrupt or truncated image: {e}") from None
    if img.width < 1 or img.height < 1:
        raise ImageError("image has no pixels")
    return img


def pixel_count(data: bytes) -> int | None:
    """Width x height from the header alone (cheap), or None if Pillow cannot read a header."""
    try:
        w, h = Image.open(io.BytesIO(data), formats=FORMATS).size
        return w * h
    except Exception:
        return None


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit L, scaling the range instead of clipping it."""
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        a = a / 257.0
    elif a.size and a.max() > 255.0:  # mode I or F holding 16-bit data
        a = a / 257.0
    elif img.mode == "F" and a.size and a.max() <= 1.0:  # float image on a 0..1 scale
        a = a * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> RGB (channels=3) or L (channels=1). Transparency is composited on white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit_gray(img)
    elif img.mode == "La":  # premultiplied alpha: Pillow converts it only to LA
        img = img.convert("LA")
    elif img.mode == "RGBa":
        img = img.convert("RGBA")
    elif (img.mode == "P" and "transparency" in img.info) or img.mode == "PA":
        img = img.convert("RGBA")
    elif img.mode not in ("1", "L", "LA", "RGB", "RGBA", "P"):  # CMYK, YCbCr, LAB, HSV, ...
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    target = "RGB" if channels == 3 else "L"
    return img if img.mode == target else img.convert(target)


def resize(img: Image.Image, spec: Preprocessing) -> Image.Image:
    h, w = spec.size
    if img.size == (w, h):
        return img
    resample = _INTERPOLATION[spec.interpolation]
    if spec.resize == "stretch":
        return img.resize((w, h), resample, reducing_gap=3.0)
    # shorter side to the target, then the central crop
    scale = max(w / img.width, h / img.height)
    new = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    img = img.resize(new, resample, reducing_gap=3.0)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    return img.crop((left, top, left + w, top + h))


def to_uint8(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """A decoded image -> uint8 array (H, W, C) at the model's size, in the model's channels."""
    a = np.asarray(resize(to_mode(img, spec.channels), spec), dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def normalize(images: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 (N, H, W, C) or (H, W, C) -> float32 (N, C, H, W) or (C, H, W), normalised."""
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {images.dtype}")
    mean = np.asarray(spec.mean, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(spec.std, dtype=np.float32) * 255.0)
    x = (images.astype(np.float32) - mean) * inv_std
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def decode_uint8(data: bytes, spec: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image file bytes -> uint8 (H, W, C) at the model's size. Raises ImageError, nothing else."""
    img = open_image(data, max_pixels)
    try:
        return to_uint8(img, spec)
    except MemoryError:
        raise ImageError("image too large to convert", status=413) from None
    except Exception as e:  # a mode Pillow cannot convert
        raise ImageError(f"cannot convert a {img.mode} image to {'RGB' if spec.channels == 3 else 'L'}: {e}",
                         status=415) from None


def preprocess_bytes(data: bytes, spec: Preprocessing,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image file bytes -> float32 (C, H, W), ready for either backend."""
    return normalize(decode_uint8(data, spec, max_pixels), spec)
