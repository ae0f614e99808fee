"""The shard format: the one contract between `curate shard` (writer, verify) and every reader
(sparsevit's loader, timm, the tests). Member names, image fields, the maps flag, the format
version and both index files are defined here and nowhere else.

Layout of a shard folder (docs/design.md#the-shard-format)::

    OUT/train-000000.tar        one sample per key, members contiguous, in plan order:
        KEY.cls                 ASCII class index (timm's target)
        KEY.importance.npy      float16 [gh, gw] patch importance over the full original image
        KEY.jpg | .png | .webp  the original image bytes (other formats: PNG, see `sample_fields`;
                                with --max-side, larger images as a reduced JPEG: `reduce_image`)
        KEY.json                class_name, source, scores used, proxy id, importance_shape, ...
    OUT/train-000001.tar ...
    OUT/validation-000000.tar ...
    OUT/_info.json              timm's split index (`info_json`)
    OUT/manifest.json           `shard_manifest` plus what the writer adds (selection hash,
                                scores manifests, config, versions):
                                {"format_version": 1, "num_classes": C, "class_names": [C names],
                                 "splits": {split: {
                                    "num_samples", "importance": bool, "shards": [
                                    {"filename", "count", "sha256", "bytes"}, ...]}}}

Members are named `KEY.FIELD` and webdataset cuts the key at the first dot of the basename,
so keys are `[A-Za-z0-9_-]` only and the field `importance.npy` reads back as "importance.npy".
Whether a split carries maps is written per split ("importance") and read from there: no
reader guesses it from the split's name.

Readers trust the index once it has been checked: `read_manifest` refuses a manifest of an
unknown format version, and `read_split` refuses shard names that would leave the folder.
timm's ReaderWds reads only the image and `cls` and, like webdataset, applies no EXIF
orientation; `decode_sample` decodes with curate's one decoder (upright, the pixels scoring saw).
"""
from __future__ import annotations

import io
import json
import math
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from curate.common.atomic import read_json_object, write_json
from curate.common.runfolder import wrong_kind
from curate.ingest.decode import DEFAULT_MAX_PIXELS, decode_rgb, decode_upright, plain_jpeg_size, to_rgb
from curate.ingest.limits import DEFAULT_MAX_CLASSES, class_count_fault
from curate.ingest.sources import MAX_KEY_LEN

FORMAT_VERSION = 1
INFO = "_info.json"
MANIFEST = "manifest.json"
SELECTION = "selection.parquet"  # every input key, kept or not, with its reason and score (`curate shard`)
IMAGE_FIELDS = ("jpg", "png", "webp")  # what timm's reader accepts (`jpg;png;webp`)
MAP_FIELD = "importance.npy"
MAX_MAP_SIDE = 1024  # a map is a patch grid; a larger header is corrupt data, not a map
KEY = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_KEY_LEN}}}")
SPLIT = re.compile(r"[a-z][a-z0-9_]*")
# PIL modes whose PNG decodes back to exactly what the decoder gave the proxy; every other mode
# is stored as the decoder's RGB (alpha over black, high-bit data rescaled), so training never
# sees pixels that scoring did not.
_PNG_AS_IS = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})


class FormatError(ValueError):
    """A shard folder this version of curate cannot read as written; the message says why."""


# --- writing a sample ---------------------------------------------------------------------


@dataclass(frozen=True)
class SampleData:
    """Everything one sample needs."""

    key: str
    image: bytes  # the bytes to ship: the original, or `reduce_image`'s JPEG; jpg/png/webp stored as given
    label: int  # class index, >= 0
    meta: dict  # goes to KEY.json: class_name, source, scores used, proxy ids, ...
    importance: np.ndarray | None  # float16 [gh, gw] or None


def image_ext(data: bytes) -> str | None:
    """'jpg' | 'png' | 'webp' from magic bytes; None for other formats."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def sample_fields(s: SampleData) -> dict[str, Any]:
    """The member dict for TarWriter (encoded by `ENCODERS`).

    {"__key__", "jpg"|"png"|"webp": bytes, "cls": int, "json": dict, "importance.npy": array}.
    Other image formats become PNG (timm reads only jpg;png;webp) and the json says
    "transcoded_from". The json also gets "importance_shape" so readers can check the map.
    """
    if not KEY.fullmatch(s.key):
        raise ValueError(f"key {s.key!r} is not [A-Za-z0-9_-]{{1,{MAX_KEY_LEN}}}")
    if isinstance(s.label, bool) or int(s.label) < 0:  # timm trains on int(cls) as is
        raise ValueError(f"{s.key}: label must be a class index >= 0, got {s.label!r}")
    meta, image, ext = dict(s.meta), s.image, image_ext(s.image)
    if ext is None:
        image, meta["transcoded_from"] = _to_png(s.key, s.image)
        ext = "png"
    fields: dict[str, Any] = {"__key__": s.key, ext: image, "cls": int(s.label), "json": meta}
    if s.importance is not None:
        grid = _importance_array(s.key, s.importance)
        meta["importance_shape"] = list(grid.shape)
        fields[MAP_FIELD] = grid
    return fields


def reduce_image(key: str, data: bytes, max_side: int, quality: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, dict[str, Any]]:
    """The image bytes a sample ships under `curate shard --max-side`, and what its json records.

    An image whose longer side (upright) exceeds `max_side` is re-encoded as an RGB JPEG of
    `quality` with that side at `max_side`, the aspect ratio kept: decoding it then costs the
    loader a fraction of the original. The original bytes stay when the image is already small
    enough, or when the JPEG would not be smaller. The pixels are the decoder's (EXIF applied,
    any mode as RGB), so the JPEG needs no orientation tag and training sees what scoring saw.
    Maps need nothing: they cover the whole image whatever its size.
    json: `original_size` [w, h] (upright) and `stored` ("original" | "reduced")."""
    image, (w, h) = decode_upright(data, max_pixels, draft_size=max_side)
    meta: dict[str, Any] = {"original_size": [w, h], "stored": "original"}
    if max(w, h) <= max_side:
        return data, meta
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    buf = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0).save(buf, "JPEG", quality=quality)
    if buf.tell() >= len(data):  # a small, well-compressed original: shipping it costs less
        return data, meta
    return buf.getvalue(), meta | {"stored": "reduced"}


def _importance_array(key: str, importance: np.ndarray) -> np.ndarray:
    """Little-endian, C-ordered float16 [gh, gw]: the .npy header then never varies."""
    grid = np.ascontiguousarray(importance, dtype="<f2")
    if grid.ndim != 2:
        raise ValueError(f"{key}: importance must be 2-D [gh, gw], got shape {grid.shape}")
    return grid


def _to_png(key: str, data: bytes) -> tuple[bytes, str]:
    """(PNG bytes, original PIL format) for an image that is not jpg/png/webp."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # first frame only, as timm reads it
            return _png_bytes(im), im.format or "unknown"
    except Exception as exc:  # callers select decodable rows; this one was not
        raise ValueError(f"{key}: image is not jpg/png/webp and PIL cannot read it: {exc}") from exc


def _png_bytes(im: Image.Image) -> bytes:
    # Keep EXIF and ICC: a reader applying EXIF orientation must see what the original gave.
    keep: dict[str, Any] = {k: im.info[k] for k in ("icc_profile",) if k in im.info}
    exif = im.getexif()
    if len(exif):
        keep["exif"] = exif
    if im.mode not in _PNG_AS_IS:  # CMYK, F, I, YCbCr, PA...: the decoder's own RGB
        im = to_rgb(im)
    elif "transparency" in im.info:
        keep["transparency"] = im.info["transparency"]
    buf = io.BytesIO()
    im.save(buf, "PNG", **keep)
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    # sort_keys: the same meta gives the same bytes whatever order the caller built it in.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default).encode()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)):  # scores read from Parquet/numpy
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    npy_format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


# Only these fields are encoded; bytes pass through. No image encoder on purpose: a PIL image
# under "jpg" then fails loudly instead of being re-encoded at quality 100.
ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "cls": lambda x: str(int(x)).encode("ascii"),
    "json": _json_bytes,
    "npy": _npy_bytes,
}


# --- indexes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    filename: str  # relative to OUT
    count: int  # samples
    sha256: str  # of the whole tar file, hex
    bytes: int  # file size


def shard_filename(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def info_json(name: str, splits: Mapping[str, list[ShardInfo]]) -> dict:
    """timm's `_info.json` (ReaderWds): filenames are relative to the folder holding it."""
    return {"name": name, "splits": {split: {"name": split, "num_samples": sum(i.count for i in infos),
                                             "filenames": [i.filename for i in infos],
                                             "shard_lengths": [i.count for i in infos]}
                                     for split, infos in splits.items()}}


def shard_manifest(splits: Mapping[str, list[ShardInfo]], maps: Mapping[str, bool], num_classes: int,
                   names: Sequence[str] | None = None) -> dict:
    """The part of manifest.json every reader relies on. `maps` says, for every split, whether
    its samples carry importance.npy; there is no default. `names`: the class names by index
    ("" where unknown), which a trained model carries to its predictions."""
    missing = sorted(set(splits) - set(maps))
    if missing:
        raise ValueError(f"say whether split(s) {missing} carry importance maps")
    if names is not None and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return {"format_version": FORMAT_VERSION, "num_classes": int(num_classes),
            **({"class_names": list(names)} if names is not None else {}),
            "splits": {split: {"num_samples": sum(i.count for i in infos), "importance": bool(maps[split]),
                               "shards": [{"filename": i.filename, "count": i.count, "sha256": i.sha256,
                                           "bytes": i.bytes} for i in infos]}
                       for split, infos in splits.items()}}


def write_index(out: Path, name: str, splits: Mapping[str, list[ShardInfo]], maps: Mapping[str, bool],
                num_classes: int, extra: Mapping[str, Any] | None = None, names: Sequence[str] | None = None
                ) -> dict:
    """Write `_info.json` and `manifest.json` (with `extra` beside the contract's fields), the
    manifest last: a folder with a manifest is complete. Returns the manifest."""
    manifest = {**(extra or {}), **shard_manifest(splits, maps, num_classes, names)}
    write_json(out / INFO, info_json(name, splits))
    write_json(out / MANIFEST, manifest)
    return manifest


def version_fault(manifest: Mapping[str, Any]) -> str:
    """Why this curate cannot read a manifest of this format version, or ""."""
    version = manifest.get("format_version")
    if version == FORMAT_VERSION:
        return ""
    if version is None:
        return (f"{MANIFEST} has no format_version: written by an older curate; "
                "write the shards again with this version's `curate shard`")
    return (f"{MANIFEST} has format_version {version!r}; this curate reads version {FORMAT_VERSION}: "
            "use the curate that wrote it, or write the shards again")


def max_side_of(manifest: Mapping[str, Any]) -> int | None:
    """The `--max-side` the images were shipped at (None: original bytes). FormatError when the
    manifest holds something that is not a size."""
    images = manifest.get("images")
    value = images.get("max_side") if isinstance(images, dict) else None
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise FormatError(f"{MANIFEST}: images.max_side {value!r:.40} is not a size in pixels")
    return value


def filename_fault(name: Any) -> str:
    """Why a shard file name from an index cannot be read safely, or "": it must be a plain
    `.tar` file name inside the folder (no separators, no `..`, not absolute)."""
    if not isinstance(name, str) or not name.endswith(".tar") or name != Path(name).name \
            or name in (".", "..") or "\\" in name:
        return f"shard name {name!r} is not a plain .tar file name inside the folder"
    return ""


def read_manifest(root: Path) -> dict[str, Any]:
    """manifest.json of a shard folder, checked for its format version."""
    if kind := wrong_kind(Path(root), "shard", "give the folder `curate shard --out` wrote"):
        raise FormatError(kind)
    manifest = read_json_object(Path(root) / MANIFEST, "expected the output of `curate shard`")
    fault = version_fault(manifest)
    if fault:
        raise FormatError(f"{root}: {fault}")
    return manifest


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One split of a shard folder, with absolute shard paths."""

    name: str
    urls: list[str]
    lengths: list[int]
    has_maps: bool  # samples carry importance.npy

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


def read_split(root: Path, split: str) -> Split:
    """A split as the writer indexed it (manifest.json), after checking the version and that
    every shard name stays inside the folder."""
    root = Path(root)
    splits = read_manifest(root).get("splits", {})
    if split not in splits:
        raise KeyError(f"{root / MANIFEST}: no split {split!r} (has {sorted(splits)})")
    part = splits[split]
    entries = part.get("shards") if isinstance(part, dict) else None
    if not isinstance(entries, list) or not isinstance(part.get("importance"), bool):
        raise FormatError(f"{root / MANIFEST}: split {split!r} needs a list of shards and an importance flag")
    for entry in entries:
        fault = _entry_fault(entry)
        if fault:
            raise FormatError(f"{root / MANIFEST}: split {split!r}: {fault}")
    return Split(split, [str(root / e["filename"]) for e in entries], [e["count"] for e in entries],
                 part["importance"])


def _entry_fault(entry: Any) -> str:
    """Why a manifest shard entry cannot be read as one, or ""."""
    if not isinstance(entry, dict):
        return f"shard entry {entry!r:.60} is not an object"
    count = entry.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return f"shard {entry.get('filename')!r} has count {count!r}, not a sample count"
    return filename_fault(entry.get("filename"))


def num_classes_fault(manifest: Mapping[str, Any]) -> str:
    """Why the manifest's `num_classes` cannot size a classifier head, or "": an integer from 2 to
    DEFAULT_MAX_CLASSES (the ceiling `curate score` holds labels to)."""
    fault = class_count_fault(manifest.get("num_classes"), f"{MANIFEST}: num_classes")
    return f"{fault} (write the shards again with `curate shard`)" if fault else ""


def num_classes(root: Path) -> int:
    """The class count the writer recorded, checked (`num_classes_fault`)."""
    manifest = read_manifest(root)
    if fault := num_classes_fault(manifest):
        raise FormatError(f"{root}: {fault}")
    return manifest["num_classes"]


def class_names(manifest: Mapping[str, Any]) -> list[str] | None:
    """Class names by index ("" where the writer knew none), or None when the manifest has
    none (shards written before curate recorded them) or they do not fit `num_classes`."""
    names = manifest.get("class_names")
    if not isinstance(names, list) or len(names) != manifest.get("num_classes") \
            or not all(isinstance(n, str) for n in names):
        return None
    return names


def scan_split(split: Split, classes: int, max_faults: int = 20) -> list[str]:
    """What would break training in a split, from the tar headers and `cls` members alone (no
    image is read, no sha256 computed: cheap enough to run before every training run). Faults:
    a shard missing or unreadable, its sample count against the index, a key held by two
    shards, a `cls` that is not a class index below `classes`. At most `max_faults`, then a
    count of the rest."""
    faults: list[str] = []
    owner: dict[str, str] = {}
    for url, expected in zip(split.urls, split.lengths):
        faults += _scan_shard(Path(url), expected, classes, owner)
    if len(faults) > max_faults:
        faults = faults[:max_faults] + [f"... and {len(faults) - max_faults} more"]
    return faults


def _scan_shard(path: Path, expected: int, classes: int, owner: dict[str, str]) -> list[str]:
    faults: list[str] = []
    count, last = 0, None
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                key, _, field = info.name.partition(".")
                if not info.isfile() or not field:
                    continue
                if key != last:  # webdataset groups consecutive members by key
                    count, last = count + 1, key
                    if key in owner:
                        faults.append(f"{path.name}: key {key!r} also in {owner[key]}")
                    owner.setdefault(key, path.name)
                if field == "cls":
                    faults += [f"{path.name}: {key}: {f}" for f in cls_faults(_member(tf, info), classes)]
    except (OSError, tarfile.TarError) as exc:
        return faults + [f"{path.name}: unreadable after {count} samples: {exc}"]
    if count != expected:
        faults.append(f"{path.name}: {count} samples in the tar, the index says {expected}")
    return faults


def _member(tf: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    if info.size > 64:  # a class index is a few digits: anything larger is not one
        return b"?" * 8
    handle = tf.extractfile(info)
    return handle.read() if handle is not None else b""


def cls_faults(data: bytes | None, classes: int | None = None) -> list[str]:
    """Why a `cls` member is not a class index (below `classes`, when given), or []."""
    try:
        label = int((data or b"").decode("ascii"))
    except ValueError:
        return [f"cls is not an ASCII integer: {data!r:.40}"]
    if label < 0:
        return [f"cls {label} is negative: not a class index"]
    if classes is not None and label >= classes:
        return [f"cls {label} is not a class index below num_classes {classes} ({MANIFEST})"]
    return []


def read_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Raw samples (field -> bytes) grouped by webdataset's own rules; raises on a bad tar."""
    with open(path, "rb") as f:  # our handle, so it is closed even if iteration stops early
        yield from group_by_keys(tar_file_expander([{"url": str(path), "stream": f}]))


def decode_sample(sample: Mapping[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Raw members -> {key, image (upright RGB PIL, the pixels scoring saw), label, importance
    (float32 [gh, gw] or None)}. Raises ValueError (DecodeError for the image) on a bad sample."""
    image = decode_rgb(sample[image_field(sample)], max_pixels)
    return {"key": sample.get("__key__"), "image": image, "label": sample_label(sample),
            "importance": sample_importance(sample)}


def image_field(sample: Mapping[str, Any]) -> str:
    """The sample's one image member: "jpg", "png" or "webp"."""
    images = [f for f in IMAGE_FIELDS if f in sample]
    if len(images) != 1:
        raise ValueError(f"{sample.get('__key__')}: needs exactly one of {IMAGE_FIELDS}, has "
                         f"{sorted(k for k in sample if k[:2] != '__')}")
    return images[0]


def plain_jpeg(sample: Mapping[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(width, height) when the sample's image is a JPEG that any JPEG decoder turns into the
    pixels `decode_sample` gives (`curate.ingest.decode.plain_jpeg_size`); None otherwise."""
    field = image_field(sample)
    return plain_jpeg_size(sample[field], max_pixels) if field == "jpg" else None


def sample_label(sample: Mapping[str, Any]) -> int:
    try:
        return int(sample["cls"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{sample.get('__key__')}: cls is missing or not an integer") from e


def sample_importance(sample: Mapping[str, Any]) -> np.ndarray | None:
    """The importance map as float32 [gh, gw], or None when the sample has none."""
    raw = sample.get(MAP_FIELD)
    importance = None if raw is None else load_npy(raw).astype(np.float32)
    if importance is not None and not np.isfinite(importance).all():
        raise ValueError(f"{sample.get('__key__')}: importance.npy holds NaN or infinite values")
    return importance


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def load_npy(raw: bytes) -> np.ndarray:
    """An importance map from its .npy bytes, read-only: float16 2-D, at most MAX_MAP_SIDE a side,
    with as many bytes as its header promises. Parsing the header (a Python literal) is most of
    np.load's cost on a small map, and every map of a shard set has the same header: cached."""
    if raw[:6] != _NPY_MAGIC or len(raw) < 10:
        raise ValueError("importance.npy is not a .npy file")
    size = 2 if raw[6] == 1 else 4  # header length field: 2 bytes in format 1.0, 4 after
    start = 8 + size + int.from_bytes(raw[8:8 + size], "little")
    header = raw[:start]
    if header not in _npy_headers:
        if len(_npy_headers) >= 64:  # odd data: stay bounded
            _npy_headers.clear()
        _npy_headers[header] = _npy_header(raw)
    dtype, shape, fortran = _npy_headers[header]
    if len(raw) - start != dtype.itemsize * math.prod(shape):
        raise ValueError(f"importance.npy holds {len(raw) - start} bytes for shape {shape}")
    flat = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=start)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def _npy_header(raw: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """dtype, shape and order from the header alone (refuses object arrays and absurd shapes
    before any allocation)."""
    stream = io.BytesIO(raw)
    version = npy_format.read_magic(stream)
    readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"importance.npy has .npy format version {version}; maps are written as 1.0")
    shape, fortran, dtype = readers[version](stream)
    if dtype.hasobject:
        raise ValueError("importance.npy holds Python objects; refused")
    if dtype != np.float16 or len(shape) != 2 or not all(0 < s <= MAX_MAP_SIDE for s in shape):
        raise ValueError(f"importance.npy is {dtype} {shape}; a map is float16 2-D [gh, gw] with sides "
                         f"1..{MAX_MAP_SIDE}")
    return dtype, tuple(shape), bool(fortran)
