"""Shards: write a selection as WebDataset tars that timm reads unchanged, and verify them.

Layout of an output folder (DESIGN.md "Shards" contract)::

    OUT/train-000000.tar        one sample per key, members contiguous, in plan order:
        KEY.cls                 ASCII class index (timm's target)
        KEY.importance.npy      float16 [gh, gw] patch importance over the full original image
        KEY.jpg | .png | .webp  the ORIGINAL image bytes (other formats: lossless PNG)
        KEY.json                class_name, source, scores used, proxy id, importance_shape, ...
    OUT/train-000001.tar ...
    OUT/validation-000000.tar ...  (importance optional)
    OUT/_info.json              timm's split index: `info_json(...)`
    OUT/manifest.json           written by the caller; its "splits" part is `shard_manifest(...)`:
                                {"splits": {split: {"num_samples", "shards": [
                                    {"filename", "count", "sha256", "bytes"}, ...]}}}

Members are named `KEY.FIELD` and webdataset cuts the key at the first dot of the basename,
so keys are `[A-Za-z0-9_-]` only and the field `importance.npy` reads back as "importance.npy".

Determinism: the same plan and the same sample data give byte-identical tars, in one run or
killed and resumed. Every header field is fixed: mtime FIXED_MTIME, uid/gid 0, uname/gname
TAR_OWNER, mode TAR_MODE, all ints (TarWriter 1.0.2 ignores its `format` argument, so tarfile
writes its default PAX format; with ASCII names under 100 chars and int fields that is plain
ustar headers, while a float mtime or a long name would add a PAX record). TarWriter writes a
sample's fields in sorted order, JSON is dumped with sorted keys, `.npy` uses numpy's v1.0
header (the repr of a fixed dict), and images are stored as given (PNG transcodes depend on
the Pillow/zlib version). A shard is written as `.NAME.tmp`, fsynced, then renamed, so a file
under a final name is always complete. Resume trusts that and re-reads an existing shard for
its sha256 and keys rather than keeping a sidecar: the tar stays the only truth, and a kill
between rename and sidecar cannot leave the two disagreeing. It refuses a shard whose keys
differ from the plan.

Readers: timm's ReaderWds reads the image and `cls` only and ignores `importance.npy` (so
training on the maps needs sparsevit's own reader), and like webdataset it does not apply
EXIF orientation, while the importance maps were computed on the EXIF-oriented image.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_expander

from curate.decode import decode_image
from curate.sources import MAX_KEY_LEN
from curate.table import file_sha256

FIXED_MTIME = 0  # tar member mtime: TarWriter's default (time.time()) breaks reproducibility
TAR_OWNER = "curate"  # uname and gname of every member (uid/gid stay tarfile's default 0)
TAR_MODE = 0o444  # members are read-only data
IMAGE_FIELDS = ("jpg", "png", "webp")  # what timm's reader accepts (`jpg;png;webp`)
MAX_FAULTS_PER_SHARD = 10  # a systematically broken shard would otherwise flood the report
_KEY = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_KEY_LEN}}}")
_SPLIT = re.compile(r"[a-z][a-z0-9_]*")
# PIL modes a PNG stores without loss; others (CMYK, F, YCbCr...) go through RGB.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


# --- plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """Which key goes to which shard, in which order (pure data)."""

    name: str  # dataset name for _info.json, e.g. "demo"
    split: str  # "train" | "validation" (timm's default split names)
    shards: list[list[str]]  # keys per shard, in write order

    @property
    def num_samples(self) -> int:
        return sum(len(keys) for keys in self.shards)

    @property
    def filenames(self) -> list[str]:
        return [shard_filename(self.split, i) for i in range(len(self.shards))]


def shard_filename(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def plan_shards(
    keys: Sequence[str],
    split: str,
    name: str,
    samples_per_shard: int,
    shard_multiple: int = 1,
    seed: int = 0,
) -> ShardPlan:
    """Shuffle the keys deterministically and cut them into balanced shards.

    The order is the keys sorted by blake2b(seed, key), ties by key: a seeded permutation that
    depends neither on the input order nor on numpy's RNG version. The shard count is
    ceil(N / samples_per_shard) rounded UP to a multiple of `shard_multiple` (ranks x loader
    workers: every reader needs whole shards), capped at the largest multiple <= N so no shard
    is empty. Sizes differ by at most one (the first N % n shards get one more): strictly
    equal counts would need dropping or duplicating samples. With timm's `with_epoch` each
    worker then over- or under-runs by at most its number of shards per epoch, instead of by
    whole shard-size differences.
    """
    _check_plan_args(keys, split, samples_per_shard, shard_multiple)
    order = sorted(keys, key=lambda k: (_shuffle_rank(seed, k), k))
    sizes = _balanced_sizes(len(order), _num_shards(len(order), samples_per_shard, shard_multiple))
    starts = np.cumsum([0, *sizes]).tolist()
    return ShardPlan(name, split, [order[a:b] for a, b in zip(starts[:-1], starts[1:])])


def _check_plan_args(
    keys: Sequence[str], split: str, samples_per_shard: int, shard_multiple: int
) -> None:
    if samples_per_shard < 1 or shard_multiple < 1:
        raise ValueError(f"need samples_per_shard >= 1 and shard_multiple >= 1, "
                         f"got {samples_per_shard}, {shard_multiple}")
    # timm parses any split containing "tar" as a shard pattern (`_parse_split_info`).
    if not _SPLIT.fullmatch(split) or "tar" in split:
        raise ValueError(f"split name {split!r} must match {_SPLIT.pattern} without 'tar' "
                         "(e.g. train, validation)")
    bad = [k for k in keys if not _KEY.fullmatch(k)]
    if bad:
        raise ValueError(f"{len(bad)} keys are not [A-Za-z0-9_-]{{1,{MAX_KEY_LEN}}} "
                         f"(webdataset cuts keys at the first dot): {bad[:5]}")
    dupes = sorted(k for k, c in Counter(keys).items() if c > 1)
    if dupes:
        raise ValueError(f"{len(dupes)} keys are listed more than once: {dupes[:5]}")
    if len(keys) < shard_multiple:
        raise ValueError(f"{len(keys)} keys cannot fill {shard_multiple} shards "
                         f"(shard_multiple = ranks x workers): some reader would get none")


def _shuffle_rank(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()


def _num_shards(n_keys: int, samples_per_shard: int, multiple: int) -> int:
    n = math.ceil(math.ceil(n_keys / samples_per_shard) / multiple) * multiple
    return min(n, n_keys // multiple * multiple)  # still a multiple, and no shard empty


def _balanced_sizes(n_keys: int, n_shards: int) -> list[int]:
    base, extra = divmod(n_keys, n_shards)
    return [base + (i < extra) for i in range(n_shards)]


# --- samples ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleData:
    """Everything one sample needs."""

    key: str
    image: bytes  # ORIGINAL bytes, never re-encoded (when jpg/png/webp)
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
    """The member dict for TarWriter (encoded by `_ENCODERS`).

    {"__key__", "jpg"|"png"|"webp": bytes, "cls": int, "json": dict, "importance.npy": array}.
    Other image formats become lossless PNG (timm reads only jpg;png;webp) and the json says
    "transcoded_from". The json also gets "importance_shape" so readers can check the map.
    """
    if not _KEY.fullmatch(s.key):
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
        fields["importance.npy"] = grid
    return fields


def _importance_array(key: str, importance: np.ndarray) -> np.ndarray:
    """Little-endian, C-ordered float16 [gh, gw]: the .npy header then never varies."""
    grid = np.ascontiguousarray(importance, dtype="<f2")
    if grid.ndim != 2:
        raise ValueError(f"{key}: importance must be 2-D [gh, gw], got shape {grid.shape}")
    return grid


def _to_png(key: str, data: bytes) -> tuple[bytes, str]:
    """(PNG bytes, original PIL format): lossless for every mode PNG can hold."""
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
    if im.mode not in _PNG_MODES:  # CMYK, F, YCbCr...: timm converts to RGB anyway
        im = im.convert("RGB")
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
_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "cls": lambda x: str(int(x)).encode("ascii"),
    "json": _json_bytes,
    "npy": _npy_bytes,
}


# --- writing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    filename: str  # relative to OUT
    count: int  # samples
    sha256: str  # of the whole tar file, hex
    bytes: int  # file size


def tmp_path(path: Path) -> Path:
    """`.NAME.tmp` in the same folder: os.replace is atomic only within one filesystem."""
    return path.with_name(f".{path.name}.tmp")


def write_shard(path: Path, samples: Iterable[SampleData]) -> ShardInfo:
    """Write one tar atomically: `.NAME.tmp`, fsync, rename. A failure removes the tmp file."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        count = _write_tar(tmp, samples)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a SIGKILL still leaves it: the next run overwrites it
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return ShardInfo(path.name, count, file_sha256(path), path.stat().st_size)


def _write_tar(tmp: Path, samples: Iterable[SampleData]) -> int:
    seen: set[str] = set()
    with open(tmp, "wb") as f:  # "wb" truncates a tmp left by a killed run
        with TarWriter(f, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE,
                       encoder=_ENCODERS, mtime=FIXED_MTIME) as writer:
            # TarWriter ignores its `format` argument; set it on the stream. For our ASCII names
            # under 100 chars the bytes equal PAX's, and tarfile skips its per-member PAX checks.
            writer.tarstream.format = tarfile.USTAR_FORMAT
            for sample in samples:
                if sample.key in seen:  # webdataset would merge them or raise on read
                    raise ValueError(f"{tmp}: key {sample.key!r} written twice")
                seen.add(sample.key)
                writer.write(sample_fields(sample))  # one call: members stay contiguous
        f.flush()
        os.fsync(f.fileno())
    return len(seen)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_split(
    out: Path,
    plan: ShardPlan,
    load: Callable[[Sequence[str]], Iterator[SampleData]],
    resume: bool,
    progress: bool = True,
    workers: int = 1,
) -> list[ShardInfo]:
    """Write `OUT/{split}-{i:06d}.tar` for every shard of the plan.

    `load(keys)` yields SampleData for exactly those keys in that order. With `resume`, a
    shard whose final file exists is complete (it was renamed only once whole): it is
    re-read for its sha256 and keys instead of rewritten. Without it, every shard is rewritten.
    Exceptions from `load` propagate; the shards already renamed stay valid for a resume.
    `workers` > 1 writes shards in forked processes (Python's tarfile costs ~70 us a member,
    so one core caps out near 3,500 members/s); each shard's bytes do not depend on it.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out / name, keys) for name, keys in zip(plan.filenames, plan.shards)]
    with tqdm(total=plan.num_samples, desc=f"shards {plan.split}", unit="img",
              disable=not progress, dynamic_ncols=True) as bar:
        if workers <= 1 or len(jobs) <= 1:
            return [_one_shard(path, keys, load, resume, bar) for path, keys in jobs]
        return _parallel(jobs, load, resume, workers, bar)


def _one_shard(path: Path, keys: Sequence[str], load: Callable[[Sequence[str]], Iterator[SampleData]],
               resume: bool, bar: tqdm | None) -> ShardInfo:
    if resume and path.exists():
        info = _existing_shard(path, keys)
        if bar is not None:
            bar.update(len(keys))
        return info
    return write_shard(path, _checked(load(keys), keys, bar))


_LOAD: Callable[[Sequence[str]], Iterator[SampleData]] | None = None  # set in forked workers


def _worker_init(load: Callable[[Sequence[str]], Iterator[SampleData]]) -> None:
    global _LOAD
    _LOAD = load


def _worker_shard(job: tuple[Path, Sequence[str], bool]) -> ShardInfo:
    assert _LOAD is not None
    return _one_shard(job[0], job[1], _LOAD, job[2], None)


def _parallel(jobs: list[tuple[Path, Sequence[str]]], load: Callable[[Sequence[str]], Iterator[SampleData]],
              resume: bool, workers: int, bar: tqdm) -> list[ShardInfo]:
    # fork: workers inherit `load` (the item index, the scores) instead of unpickling it per task
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(load,)) as pool:
        infos = []
        for info in pool.imap(_worker_shard, [(path, keys, resume) for path, keys in jobs]):
            bar.update(info.count)
            infos.append(info)
    return infos


def _checked(
    samples: Iterator[SampleData], keys: Sequence[str], bar: tqdm | None
) -> Iterator[SampleData]:
    """Pass samples on, failing if `load` strays from the requested keys and order."""
    n = 0
    for n, sample in enumerate(samples, 1):
        if n > len(keys) or sample.key != keys[n - 1]:
            expected = keys[n - 1] if n <= len(keys) else "nothing more"
            raise ValueError(f"load() yielded {sample.key!r} at position {n}, expected {expected}")
        if bar is not None:
            bar.update(1)
        yield sample
    if n != len(keys):
        raise ValueError(f"load() yielded {n} samples for {len(keys)} keys")


def _existing_shard(path: Path, keys: Sequence[str]) -> ShardInfo:
    found = [s["__key__"] for s in read_samples(path)]
    if found != list(keys):
        raise ValueError(f"{path} exists but holds other keys than the plan (the selection or "
                         "shard settings changed?): write to a new folder or do not resume")
    return ShardInfo(path.name, len(found), file_sha256(path), path.stat().st_size)


def read_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Raw samples (field -> bytes) grouped by webdataset's own rules; raises on a bad tar."""
    with open(path, "rb") as f:  # our handle, so it is closed even if iteration stops early
        yield from group_by_keys(tar_file_expander([{"url": str(path), "stream": f}]))


# --- indexes ----------------------------------------------------------------------------------


def info_json(name: str, splits: dict[str, list[ShardInfo]]) -> dict:
    """timm's `_info.json` (ReaderWds): filenames are relative to the folder holding it."""
    return {"name": name, "splits": {split: _split_info(split, infos)
                                     for split, infos in splits.items()}}


def _split_info(split: str, infos: list[ShardInfo]) -> dict:
    return {"name": split, "num_samples": sum(i.count for i in infos),
            "filenames": [i.filename for i in infos], "shard_lengths": [i.count for i in infos]}


def shard_manifest_entries(infos: list[ShardInfo]) -> list[dict]:
    return [{"filename": i.filename, "count": i.count, "sha256": i.sha256, "bytes": i.bytes}
            for i in infos]


def shard_manifest(splits: dict[str, list[ShardInfo]], maps: dict[str, bool] | None = None) -> dict:
    """The part of OUT/manifest.json that `verify` reads; the caller adds selection hash,
    scores manifest, config and versions beside it. `maps`: whether a split's samples carry
    importance.npy (default: train does, other splits do not)."""
    maps = maps or {}
    return {"splits": {split: {"num_samples": sum(i.count for i in infos),
                               "importance": maps.get(split, split == "train"),
                               "shards": shard_manifest_entries(infos)}
                       for split, infos in splits.items()}}


# --- verification -----------------------------------------------------------------------------


def verify(out: Path) -> list[str]:
    """Re-read everything listed in OUT/manifest.json and OUT/_info.json; faults as text.

    An empty list means: indexes agree, every shard exists with the recorded sha256, size and
    count, every sample has one decodable jpg/png/webp, an int cls, a json dict and (train
    splits whose manifest entry has "importance": true, by default train) a float16 2-D
    importance map of the recorded shape, keys are unique within each split,
    and no `.tmp` leftovers or unlisted `.tar` files lie in OUT.
    """
    out = Path(out)
    faults: list[str] = []
    manifest = _load_json(out / "manifest.json", faults)
    info = _load_json(out / "_info.json", faults)
    if manifest is None or info is None:
        return faults
    shards = _manifest_shards(manifest, faults)
    faults += _check_info(info, shards)
    for split, entries in shards.items():
        owner: dict[str, str] = {}  # key -> shard that holds it; keys are unique per split
        # A split carries maps unless its manifest says otherwise (e.g. scored by a CNN only).
        maps = bool(manifest["splits"][split].get("importance", split == "train"))
        for entry in entries:
            faults += _check_shard(out, entry, owner, maps)
    faults += _stray_files(out, {e.get("filename") for es in shards.values() for e in es})
    return faults


def _load_json(path: Path, faults: list[str]) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        faults.append(f"{path.name}: cannot read: {exc}")
        return None
    if not isinstance(obj, dict):
        faults.append(f"{path.name}: not a JSON object")
        return None
    return obj


def _manifest_shards(manifest: dict, faults: list[str]) -> dict[str, list[dict]]:
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        faults.append("manifest.json: no 'splits' with shard entries")
        return {}
    shards: dict[str, list[dict]] = {}
    for split, part in splits.items():
        entries = part.get("shards") if isinstance(part, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            faults.append(f"manifest.json: split {split!r} has no list of shard entries")
            continue
        shards[split] = entries
    return shards


def _check_info(info: dict, shards: dict[str, list[dict]]) -> list[str]:
    """_info.json against itself and the manifest: what timm trusts must match the tars."""
    splits = info.get("splits")
    if not isinstance(splits, dict):
        return ["_info.json: no 'splits' object"]
    only_one = sorted(set(splits) ^ set(shards))
    faults = [f"_info.json: split {s!r} is in only one of _info.json, manifest.json"
              for s in only_one]
    for split in sorted(set(splits) & set(shards)):
        faults += _check_info_split(split, splits[split], shards[split])
    return faults


def _check_info_split(split: str, part: Any, entries: list[dict]) -> list[str]:
    where = f"_info.json split {split!r}"
    try:
        names, lengths = list(part["filenames"]), list(part["shard_lengths"])
        total = part["num_samples"]
    except (KeyError, TypeError) as exc:
        return [f"{where}: missing field {exc} "
                "(timm needs name, num_samples, filenames, shard_lengths)"]
    faults = [] if part.get("name") == split else [f"{where}: name is {part.get('name')!r}"]
    if total != sum(lengths):
        faults.append(f"{where}: num_samples {total} != sum(shard_lengths) {sum(lengths)}")
    if names != [e.get("filename") for e in entries]:
        faults.append(f"{where}: filenames differ from manifest.json")
    if lengths != [e.get("count") for e in entries]:
        faults.append(f"{where}: shard_lengths {lengths} != manifest counts "
                      f"{[e.get('count') for e in entries]}")
    return faults


def _check_shard(out: Path, entry: dict, owner: dict[str, str], maps: bool) -> list[str]:
    name = str(entry.get("filename"))
    path = out / name
    if not path.is_file():
        return [f"{name}: listed in manifest.json but missing"]
    faults = []
    if path.stat().st_size != entry.get("bytes"):
        faults.append(f"{name}: size {path.stat().st_size} != manifest bytes {entry.get('bytes')}")
    if file_sha256(path) != entry.get("sha256"):
        faults.append(f"{name}: sha256 differs from manifest.json (corrupt or rewritten)")
    count, sample_faults = _check_samples(path, owner, maps)
    if count != entry.get("count"):
        faults.append(f"{name}: {count} samples read, manifest count is {entry.get('count')}")
    return faults + _capped(name, sample_faults)


def _check_samples(path: Path, owner: dict[str, str], maps: bool) -> tuple[int, list[str]]:
    count, faults = 0, []
    try:
        for sample in read_samples(path):
            count += 1
            key = sample["__key__"]
            if key in owner:
                faults.append(f"key {key!r} also in {owner[key]}")
            owner[key] = path.name
            problems = sample_faults(sample, require_importance=maps)
            faults += [f"{key}: {f}" for f in problems]
    except Exception as exc:  # truncated or corrupt tar: report, keep checking other shards
        # webdataset appends the stream and url to args: keep only the message
        message = exc.args[0] if exc.args else exc
        faults.append(f"unreadable after {count} samples: {type(exc).__name__}: {message}")
    return count, faults


def _capped(name: str, faults: list[str]) -> list[str]:
    shown = [f"{name}: {f}" for f in faults[:MAX_FAULTS_PER_SHARD]]
    if len(faults) > MAX_FAULTS_PER_SHARD:
        shown.append(f"{name}: ... and {len(faults) - MAX_FAULTS_PER_SHARD} more faults")
    return shown


def sample_faults(sample: dict[str, Any], require_importance: bool) -> list[str]:
    """What is wrong with one raw sample (field -> bytes) as timm and sparsevit read it."""
    images = [f for f in IMAGE_FIELDS if f in sample]
    if len(images) != 1:
        return [f"has {len(images)} jpg/png/webp members, needs exactly one"]
    faults = []
    error = decode_image(sample[images[0]], 8).error  # tiny target: JPEG draft keeps it fast
    if error:
        faults.append(f"{images[0]} does not decode: {error}")
    faults += _cls_faults(sample.get("cls"))
    meta = _json_field(sample.get("json"), faults)
    if "importance.npy" in sample or require_importance:
        faults += _importance_faults(sample.get("importance.npy"), meta)
    return faults


def _cls_faults(data: bytes | None) -> list[str]:
    try:
        int((data or b"").decode("ascii"))
    except ValueError:
        return [f"cls is not an ASCII integer: {data!r:.40}"]
    return []


def _json_field(data: bytes | None, faults: list[str]) -> dict:
    try:
        meta = json.loads(data) if data is not None else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        faults.append("json is missing or not an object")
        return {}
    return meta


def _importance_faults(data: bytes | None, meta: dict) -> list[str]:
    if data is None:
        return ["importance.npy is missing (required in the train split)"]
    try:
        grid = npy_format.read_array(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        return [f"importance.npy does not load: {exc}"]
    if grid.dtype != np.float16 or grid.ndim != 2:
        return [f"importance.npy is {grid.dtype} {grid.shape}, needs float16 2-D"]
    expected = meta.get("importance_shape")
    if expected is not None and list(grid.shape) != list(expected):
        return [f"importance.npy shape {list(grid.shape)} != json importance_shape {expected}"]
    return []


def _stray_files(out: Path, listed: set[Any]) -> list[str]:
    """Leftovers a directory-glob reader would pick up, or that mean an interrupted write."""
    faults = [f"{p.name}: leftover temporary file (interrupted write?)"
              for p in sorted(out.glob(".*.tmp"))]
    faults += [f"{p.name}: .tar not listed in manifest.json"
               for p in sorted(out.glob("*.tar")) if p.name not in listed]
    return faults
