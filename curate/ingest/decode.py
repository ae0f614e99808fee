"""The one image decoder: bytes -> an upright RGB image, or a readable one-line error.

Scoring (`decode_image`: a fixed-size uint8 tensor) and training (`decode_rgb`: the full image
for random crops, through the shard format's reader) both go through `_upright_rgb`, so the
proxy and the trained model see the same pixels for every image mode.

`decode_image` never raises on bad input: a broken file becomes `Decoded(error=...)`, a row
in the scores table (docs/design.md#failures-are-data). The whole image is squash-resized to
`size x size`, never cropped, so every pixel of the original contributes to the score.

Order of work, and why:
  1. open (reads the header only) and check the pixel count before any pixel is decoded;
  2. `draft` so libjpeg decodes JPEGs at 1/2, 1/4 or 1/8 scale, which is most of the cost;
  3. apply the EXIF orientation, then convert any mode to RGB, then resize.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from curate.ingest.limits import DEFAULT_MAX_PIXELS


_ORIENTATION_TAG = 0x0112
# Orientations 5..8 rotate by 90 degrees, so the displayed width and height swap.
_SWAPS_AXES = frozenset({5, 6, 7, 8})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_MAX_ERROR_CHARS = 200


@dataclass(frozen=True)
class Decoded:
    """One decoded image, or the reason it could not be decoded."""

    image: torch.Tensor | None  # uint8 (3, size, size), contiguous; None on error
    width: int  # original width after EXIF orientation; 0 if unknown
    height: int  # original height after EXIF orientation; 0 if unknown
    error: str  # "" when ok, else "<category>: <reason>" on one line

    @property
    def ok(self) -> bool:
        return self.image is not None and not self.error


def content_hash(data: bytes) -> str:
    """blake2b-128 of the file bytes, as 32 hex chars (finds exact duplicates)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode `data` to a uint8 (3, size, size) tensor. Never raises on bad input."""
    return _decode(data, size, max_pixels, draft=True)


def decode_image_reference(
    data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Decoded:
    """`decode_image` without the JPEG draft: decodes at full resolution. Slower; the
    readable reference that tests and benchmarks compare the fast path against."""
    return _decode(data, size, max_pixels, draft=False)


class DecodeError(ValueError):
    """An image that cannot be decoded; the message is one line, "<category>: <reason>"."""


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The whole image, upright (EXIF applied) and in RGB, at full resolution: what training
    crops from. The same conversion as `decode_image`, so scoring and training see the same
    pixels for every mode (alpha over black, 16-bit rescaled, CMYK, palette). Raises
    DecodeError on bad input."""
    return decode_upright(data, max_pixels)[0]


def decode_upright(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
                   ) -> tuple[Image.Image, tuple[int, int]]:
    """`decode_rgb` and the full-resolution upright (width, height). With `draft_size`, a JPEG
    may decode at 1/2..1/8 scale, never below `draft_size` on either side (for callers that
    shrink the image anyway). Raises DecodeError on bad input."""
    image, width, height, error = _upright_rgb(data, max_pixels, draft_size)
    if image is None:
        raise DecodeError(error)
    return image, (width, height)


def plain_jpeg_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(width, height) from the header of a JPEG that any JPEG decoder turns into the pixels this
    one gives: RGB or greyscale, no EXIF/XMP orientation to apply, within `max_pixels`, ending in
    its end-of-image marker. None for every other input (CMYK, rotated, truncated, not a JPEG):
    `decode_rgb` must take those, and reports the broken ones. Reads the header only (what
    `curate train --decode gpu` hands to nvJPEG)."""
    if data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":  # libjpeg pads a cut file grey, PIL refuses it
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as im:
                plain = im.format == "JPEG" and im.mode in ("RGB", "L") and "xmp" not in im.info \
                    and _orientation(im) == 1  # a JPEG's EXIF sits before its pixels: no load needed
                width, height = im.size
        except Exception:
            return None
    return (width, height) if plain and not _header_problem(width, height, max_pixels) else None


def _decode(data: bytes, size: int, max_pixels: int, draft: bool) -> Decoded:
    """Shared body of the fast and reference paths."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")  # a caller bug, not bad data
    image, width, height, error = _upright_rgb(data, max_pixels, size if draft else None)
    if image is None:
        return Decoded(None, width, height, error)
    return Decoded(to_tensor(image.resize((size, size), Image.Resampling.BILINEAR)), width, height, "")


def _upright_rgb(data: bytes, max_pixels: int, draft_size: int | None
                 ) -> tuple[Image.Image | None, int, int, str]:
    """(RGB image or None, width, height after EXIF, error): the one decoder. Never raises on
    bad input."""
    if not data:
        return None, 0, 0, "empty file"
    # PIL warns per image (bomb, palette transparency, EXIF quirks); in DataLoader workers
    # that floods stderr, and every failure that matters is already reported as an error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            im = Image.open(io.BytesIO(data))
        except Exception as exc:
            return None, 0, 0, describe_error(exc, data)
        header_size = im.size  # draft shrinks im.size, and load failures come after it
        try:
            return _decode_opened(im, max_pixels, draft_size)
        except Exception as exc:
            width, height = _error_size(im, header_size)
            return None, width, height, describe_error(exc, data)


def _decode_opened(im: Image.Image, max_pixels: int, draft_size: int | None
                   ) -> tuple[Image.Image | None, int, int, str]:
    """Header checks, reduced-scale decode, orientation, RGB."""
    header_w, header_h = im.size  # before draft: draft shrinks im.size to the decoded scale
    problem = _header_problem(header_w, header_h, max_pixels)
    if problem:
        width, height = _error_size(im, (header_w, header_h))
        return None, width, height, problem
    # libjpeg's DCT scaling: decode at the smallest 1/1..1/8 scale still >= size on both axes.
    # Huffman decoding of the whole file remains, so the gain is below 8x, and the pixels differ
    # slightly from a full decode (measured: docs/benchmarks.md, "Figures formerly quoted in
    # code"). A no-op for formats other than JPEG.
    if draft_size is not None:
        im.draft("RGB", (draft_size, draft_size))
    im.load()
    orientation = _orientation(im)
    if orientation in range(2, 9):
        im = ImageOps.exif_transpose(im)  # skipped for 1: it would return a needless copy
    width, height = _oriented(header_w, header_h, orientation)
    return to_rgb(im), width, height, ""


def _header_problem(width: int, height: int, max_pixels: int) -> str:
    """An error for sizes we refuse before decoding, else ""."""
    if width <= 0 or height <= 0:
        return f"decode failed: zero-size image {width}x{height}"
    if width * height > max_pixels:
        return f"image too large: {width}x{height} pixels exceeds max_pixels={max_pixels}"
    return ""


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8), read the way exif_transpose reads it (EXIF, then XMP).

    Call after load(): a PNG may keep eXIf after the pixel data, and PIL decodes to reach it.
    """
    try:
        return int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a corrupt EXIF block should not lose an otherwise fine image
        return 1


def _oriented(width: int, height: int, orientation: int) -> tuple[int, int]:
    """Header size as displayed: orientations 5..8 swap the axes."""
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


def _error_size(im: Image.Image, header_size: tuple[int, int]) -> tuple[int, int]:
    """The displayed size for an error row, found without decoding pixels."""
    width, height = header_size
    if width <= 0 or height <= 0:
        return 0, 0
    # PngImageFile.getexif decodes the image when eXIf was not in the header: skip it there.
    if im.format == "PNG" and "exif" not in im.info:
        return width, height
    return _oriented(width, height, _orientation(im))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels go to black; high-bit data is rescaled."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode.startswith("I"):  # I, I;16, I;16L, I;16B, I;16N
        return _gray_to_rgb(_int_to_unit(im))
    if im.mode == "F":
        return _gray_to_rgb(_float_to_unit(np.asarray(im, dtype=np.float32)))
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return _composite_on_black(im)
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _composite_on_black(im: Image.Image) -> Image.Image:
    """Alpha-composite over black. convert("RGBA") also applies P/L/RGB `transparency`."""
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size)  # black
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _int_to_unit(im: Image.Image) -> np.ndarray:
    """Integer grayscale -> floats in [0, 1], scaled by bit depth (clipping would saturate).

    I;16* is 16-bit by definition. Mode "I" is int32 but often holds 16-bit data (other
    readers, some TIFFs), so it counts as 16-bit when its values fit, else as int32's
    non-negative range; negative values become 0.
    """
    x = np.asarray(im).astype(np.float32)
    fits_16_bit = im.mode.startswith("I;16") or (x.min() >= 0 and x.max() <= 65535)
    full_scale = 65535.0 if fits_16_bit else float(2**31 - 1)
    return np.clip(x / full_scale, 0.0, 1.0)


def _float_to_unit(x: np.ndarray) -> np.ndarray:
    """Float grayscale -> [0, 1]. Floats carry no bit depth, so infer the range:
    [0, 1] as is, [0, 255] as 8-bit, anything else stretched min..max."""
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0.0 and hi <= 1.0:
        return x
    if (lo >= 0.0 and hi <= 255.0) or lo == hi:  # a constant has no range to stretch
        return np.clip(x / 255.0, 0.0, 1.0)
    return (x - lo) / (hi - lo)


def _gray_to_rgb(unit: np.ndarray) -> Image.Image:
    """[0, 1] floats (H, W) -> an RGB image, rounding to the nearest 8-bit level."""
    gray = np.rint(unit * 255.0).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB image -> uint8 (3, H, W), contiguous."""
    # np.array copies: np.asarray views PIL's read-only buffer, which torch would warn about
    # and which `.contiguous()` would not copy away when H == W == 1.
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()  # (3, H, W)


def describe_error(exc: BaseException, data: bytes) -> str:
    """A one-line "<category>: <reason>" for an exception raised while decoding `data`."""
    if isinstance(exc, Image.DecompressionBombError):  # PIL's own header check, at open
        return f"image too large: {_one_line(str(exc))}"
    if isinstance(exc, UnidentifiedImageError):  # its message names a BytesIO address: drop it
        return f"not an image: cannot identify image file ({_looks_like(data)})"
    message = _one_line(str(exc))
    if isinstance(exc, (OSError, EOFError)) and _looks_truncated(message):
        return f"truncated image: {message}"
    return f"decode failed: {type(exc).__name__}: {message}"


def _looks_like(data: bytes) -> str:
    """What an unidentified file holds, without quoting it: a file named .jpg may be anything
    (a key, a password file behind a symlink), and error rows end up in tables and reports.
    Binary data shows its first 4 bytes, the magic number that tells one format from another."""
    if not data:
        return "empty file"
    head = data[:64]
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return f"{len(data)} bytes of text"
    return f"{len(data)} bytes starting 0x{data[:4].hex()}"


def _looks_truncated(message: str) -> bool:
    """PIL's wordings for data that stops early: "image file is truncated" (JPEG, PNG, GIF)
    and "Truncated File Read". Its "broken data stream" means corrupt, not short, data."""
    return "truncated" in message.lower()


def _one_line(text: str) -> str:
    """Collapse whitespace and cap the length, so an error fits one table cell."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_ERROR_CHARS else flat[: _MAX_ERROR_CHARS - 3] + "..."

