"""Inputs: turn an ImageFolder, WebDataset shards or a list file into a deterministic item list.

Nothing is decoded here. An `Item` says where the bytes of one input live (a file, or a byte
range inside a tar), so it pickles cheaply into DataLoader workers and `read_bytes` can fetch the
bytes later without `tarfile`. Every input file becomes exactly one item, bad ones included:
deciding that a file is not an image is the decoder's job, and it records that as a row.

Keys follow the contract in docs/design.md#the-sample-key: `[A-Za-z0-9_-]{1,80}`, derived from the class
directory and file stem, unique per dataset, with collisions resolved by a hash of the source.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import stat
import tarfile
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, NamedTuple, Sequence

import braceexpand
import polars as pl

from curate.ingest.limits import DEFAULT_MAX_CLASSES, MAX_INPUT_BYTES

MAX_KEY_LEN = 80  # tar USTAR names are <= 100 chars; members are `KEY.importance.npy`
HASH_HEX = 8  # hex chars of blake2b used to keep truncated or colliding keys unique
# Preference order when a sample has several image members (timm reads `jpg;png;webp`).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")
LIST_SUFFIXES = (".csv", ".parquet")
MAX_SIDECAR_BYTES = 1 << 20  # `cls`/`json` members are tiny; a huge one is a mislabelled image

_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")
# webdataset's `base_plus_ext`: the key ends at the first dot of the basename.
_WDS_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset's `skip_meta`: top-level `__name__` members are not samples.
_WDS_META = re.compile(r"__[^/]*__($|/)")
_GLOB_CHARS = re.compile(r"[*?\[]")


class SourceError(ValueError):
    """The input cannot be turned into items; the message says what is wrong and where."""


@dataclass(frozen=True)
class Item:
    """One input sample: where its bytes are, and what it is called and labelled."""

    key: str  # sample key (docs/design.md#the-sample-key)
    source: str  # absolute original path, or "TARPATH#member_name" for tar members
    label: int  # class index, -1 when unknown
    class_name: str  # "" when unknown
    path: str  # file that holds the bytes
    offset: int = 0  # byte offset of the data inside `path` (tar members: TarInfo.offset_data)
    size: int = -1  # number of bytes to read; -1 = the whole file
    problem: str = ""  # why this input is an error row before anything is read ("" = none)


def read_bytes(item: Item) -> bytes:
    """The item's bytes; raises OSError if the file is missing, not a regular file (a device, a
    FIFO, a socket: never read, never waited on), too large, or shorter than promised."""
    if item.problem:
        raise OSError(item.problem)
    fd = os.open(item.path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{item.source}: not a regular file (a device, FIFO or socket): not read")
        want = item.size if item.size >= 0 else info.st_size - item.offset
        if want > MAX_INPUT_BYTES:
            raise OSError(f"{item.source}: {want} bytes is more than the {MAX_INPUT_BYTES} an input may have")
        f.seek(item.offset)
        data = f.read(want)  # the size fstat gave: read(n) sets aside n bytes before it reads
    # A short read means a truncated shard; say so rather than hand on a cut-off image.
    if len(data) != want:
        raise OSError(f"{item.source}: expected {want} bytes, read {len(data)}")
    return data


def display_path(path: str) -> str:
    """A file name as text that every writer accepts: bytes that are not UTF-8 (POSIX names may
    hold any) are shown as backslash escapes. The real name stays in `Item.path`."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def index_sha256(items: Sequence[Item]) -> str:
    """sha256 over (key, source, label) of every item in order: the identity of an input list,
    recorded by `curate score` and checked by every later stage that reads the same source."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\t{it.source}\t{it.label}\n".encode())
    return h.hexdigest()


# --- keys -------------------------------------------------------------------------------------


def _short_hash(text: str) -> str:
    # surrogateescape: undecodable bytes in POSIX file names must hash, not crash.
    data = text.encode("utf-8", "surrogateescape")
    return hashlib.blake2b(data, digest_size=HASH_HEX // 2).hexdigest()


def _append_hash(base: str, digest: str) -> str:
    """`base_digest`, cutting `base` so the result stays within MAX_KEY_LEN."""
    return f"{base[: MAX_KEY_LEN - len(digest) - 1]}_{digest}"


def sanitize_key(raw: str) -> str:
    """ASCII `[A-Za-z0-9_-]`, at most MAX_KEY_LEN chars; long keys end in a hash of `raw`."""
    ascii_text = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode("ascii")
    key = _UNSAFE_RUN.sub("_", ascii_text).strip("_") or "x"
    if len(key) > MAX_KEY_LEN:
        # Hash the raw name, not the cut key, so two names sharing a long prefix stay distinct.
        key = _append_hash(key, _short_hash(raw))
    return key


def assign_keys(raw: Sequence[str], sources: Sequence[str]) -> list[str]:
    """Sanitised keys, made unique by suffixing every member of a collision group.

    Every member gets the suffix (not just the later ones) so a key depends only on its own
    source and on which keys collide, never on input order.
    """
    if len(raw) != len(sources):
        raise ValueError(f"{len(raw)} raw keys but {len(sources)} sources")
    keys = [sanitize_key(r) for r in raw]
    counts = Counter(keys)
    keys = [
        _append_hash(k, _short_hash(s)) if counts[k] > 1 else k for k, s in zip(keys, sources)
    ]
    _check_unique(keys, sources)
    return keys


def _check_unique(keys: Sequence[str], sources: Sequence[str]) -> None:
    counts = Counter(keys)
    dupes = [(k, s) for k, s in zip(keys, sources) if counts[k] > 1]
    if dupes:
        shown = ", ".join(f"{k!r} <- {s!r}" for k, s in dupes[:6])
        raise SourceError(
            f"{len(dupes)} inputs still share a key after hashing their sources "
            f"(the same source listed twice?): {shown}"
        )


# --- labels -----------------------------------------------------------------------------------


def read_class_map(path: Path) -> list[str]:
    """Class names, one per line; the line position is the class index."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SourceError(f"cannot read class map {path}: {e}") from e
    names = [line.strip() for line in lines if line.strip()]
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise SourceError(f"class map {path} lists these names more than once: {dupes[:10]}")
    if not names:
        raise SourceError(f"class map {path} is empty")
    return names


def _class_name(label: int, names: Sequence[str] | None, where: str) -> str:
    """Name for a label: from the class map if there is one, else the number itself."""
    if label < 0:
        return ""
    if names is None:
        return str(label)
    if label >= len(names):
        raise SourceError(f"{where}: unknown label {label}: the class map has {len(names)} classes")
    return names[label]


# --- shared -----------------------------------------------------------------------------------


class _Draft(NamedTuple):
    """An item before keys are assigned (keys need the whole dataset to detect collisions)."""

    raw_key: str
    source: str
    label: int
    class_name: str
    path: str
    offset: int = 0
    size: int = -1
    problem: str = ""


def _to_items(drafts: Sequence[_Draft], where: str) -> list[Item]:
    if not drafts:
        raise SourceError(f"no samples found in {where}")
    keys = assign_keys([d.raw_key for d in drafts], [d.source for d in drafts])
    return [
        Item(k, display_path(d.source), d.label, d.class_name, d.path, d.offset, d.size,
             d.problem or _label_problem(d.label))
        for k, d in zip(keys, drafts)
    ]


def _label_problem(label: int) -> str:
    return "no label: the class is missing, empty or negative" if label < 0 else ""


def _raw_key(parent: str, rel: str) -> str:
    """`parent-sub_dirs_stem` for a '/'-separated relative path: only the LAST suffix is
    dropped, so `a.b.JPEG` keeps `a.b`."""
    *dirs, name = rel.split("/")
    return f"{parent}-{'_'.join((*dirs, PurePosixPath(name).stem))}"


# --- ImageFolder ------------------------------------------------------------------------------


def _class_dirs(root: Path) -> list[str]:
    """Non-hidden subdirectories (symlinked ones included), sorted."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and _is_dir(e))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop (ELOOP) or a dead mount: not a class folder
        return False


def _folder_labels(classes: Sequence[str], class_map: Path | None) -> dict[str, int]:
    if class_map is None:
        return {c: i for i, c in enumerate(classes)}
    index = {name: i for i, name in enumerate(read_class_map(class_map))}
    missing = [c for c in classes if c not in index]
    if missing:
        raise SourceError(
            f"{len(missing)} class directories are not in the class map {class_map}: {missing[:10]}"
        )
    return {c: index[c] for c in classes}


def _class_files(class_dir: Path) -> list[str]:
    """Every non-hidden file under a class dir, as sorted '/'-joined paths relative to it.

    One os.scandir pass with plain strings: pathlib's cost per file (docs/benchmarks.md, "Shard
    writing") would be paid 1.28M times listing ImageNet.
    """
    found: list[str] = []
    stack = [("", str(class_dir))]
    while stack:
        prefix, folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):  # symlinked dirs are not entered: loops
                    stack.append((rel + "/", entry.path))
                elif not _is_dir(entry):  # a symlinked folder is neither entered (loops) nor an input
                    found.append(rel)  # files and whatever else sits here (FIFOs, devices): rows
    return sorted(found)


SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})


def split_root_warning(spec: str | Path) -> str:
    """A warning when an ImageFolder's "classes" look like dataset splits (train/, val/): SOURCE is
    then the dataset's root, every split would become a class, and the proxy would learn which
    split an image is in. "" otherwise."""
    root = Path(spec)
    if not root.is_dir():
        return ""
    splits = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLIT_NAMES)
    if not splits:
        return ""
    return (f"{root} has class folders named {', '.join(splits)}: that looks like a dataset root, not a split; "
            f"score {root / splits[0]} (ImageNet layout: train/<class>/*.JPEG)")


def from_image_folder(root: Path, class_map: Path | None = None) -> list[Item]:
    """`root/<class>/**/file`, sorted by (class index, path); files directly under root ignored."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist or is not a directory")
    # Resolve the root only: a symlinked file keeps its own name, so keys and sources stay unique.
    root = root.resolve()
    classes = _class_dirs(root)
    if not classes:
        raise SourceError(f"image folder {root} has no class subdirectories")
    labels = _folder_labels(classes, class_map)
    drafts: list[_Draft] = []
    for cls in sorted(classes, key=lambda c: (labels[c], c)):
        for rel in _class_files(root / cls):
            path = f"{root}/{cls}/{rel}"
            drafts.append(_Draft(_raw_key(cls, rel), path, labels[cls], cls, path))
    return _to_items(drafts, f"image folder {root}")


# --- WebDataset -------------------------------------------------------------------------------


def _expand_shards(spec: str) -> list[Path]:
    """Shard paths for a directory, a .tar, a glob or a brace pattern (in the order given)."""
    if Path(spec).is_dir():
        shards = sorted(p for p in Path(spec).glob("*.tar") if not p.name.startswith("."))
    else:
        shards = []
        for part in braceexpand.braceexpand(spec):
            matches = sorted(glob.glob(part)) if _GLOB_CHARS.search(part) else [part]
            shards.extend(Path(m) for m in matches)
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise SourceError(f"{len(missing)} shards of {spec!r} do not exist: {missing[:5]}")
    if not shards:
        raise SourceError(f"no .tar shards match {spec!r}")
    return [p.resolve() for p in shards]


@dataclass
class _Sample:
    """Members of one webdataset sample, gathered while scanning a tar."""

    key: str  # webdataset key: everything before the first dot of the basename
    first_member: str  # names the sample when it has no image
    image: tarfile.TarInfo | None = None
    image_rank: tuple[bool, int] = (True, len(IMAGE_EXTS))
    label: int = -1
    class_name: str | None = None  # from the `json` member, when it has one
    exts: set[str] = field(default_factory=set)
    problem: str = ""  # why this sample is an error row (a bad cls, the unreadable rest of a tar)


def _split_member(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, lowercased ext) by webdataset's rules; None for what webdataset skips."""
    if not info.isfile() or _WDS_META.match(info.name):
        return None
    match = _WDS_KEY_EXT.match(info.name)
    return (match.group(1), match.group(2).lower()) if match else None


def _read_small(tf: tarfile.TarFile, info: tarfile.TarInfo, where: str) -> bytes:
    if info.size > MAX_SIDECAR_BYTES:
        raise SourceError(f"{where}: {info.size} bytes is too large for a cls/json member")
    handle = tf.extractfile(info)
    assert handle is not None  # regular files always have a handle
    return handle.read()


def _parse_cls(data: bytes) -> tuple[int, str]:
    """(label, problem): a negative label means "unknown" (an error row, like a missing one)."""
    try:
        return max(int(data.decode("ascii").strip()), -1), ""
    except ValueError:  # UnicodeDecodeError is a ValueError too
        return -1, f"cls member is not an ASCII integer: {data[:32]!r}"


def _json_class_name(data: bytes) -> str | None:
    # The json sidecar is optional metadata: a broken one must not stop the scan.
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    name = meta.get("class_name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else None


def _add_member(
    sample: _Sample, ext: str, info: tarfile.TarInfo, tf: tarfile.TarFile, where: str
) -> None:
    if ext in sample.exts:  # webdataset raises on this too
        raise SourceError(f"{where}: duplicate member {info.name!r} for key {sample.key!r}")
    sample.exts.add(ext)
    last = ext.rsplit(".", 1)[-1]
    if last in IMAGE_EXTS:
        # Prefer a plain `jpg` over `mask.png`-style extras, then by IMAGE_EXTS order.
        rank = ("." in ext, IMAGE_EXTS.index(last))
        if rank < sample.image_rank:
            sample.image, sample.image_rank = info, rank
    elif ext == "cls":
        sample.label, sample.problem = _parse_cls(_read_small(tf, info, where))
    elif ext == "json":
        sample.class_name = _json_class_name(_read_small(tf, info, where))


def _scan_tar(tar_path: Path) -> Iterator[_Sample]:
    """Samples of one shard, grouping CONSECUTIVE members by key as webdataset does. A tar that
    is cut or corrupt part-way ends with one more sample: an error row for the rest of the file
    (tarfile itself stops silently at a cut header)."""
    where = str(tar_path)
    try:
        # "r:" (uncompressed) so offset_data is a real file offset and big members are seeked past.
        tf = tarfile.open(tar_path, "r:")
    except tarfile.TarError as e:
        raise SourceError(f"{where}: not a readable uncompressed tar file: {e}") from e
    with tf:
        current: _Sample | None = None
        try:
            for info in tf:
                split = _split_member(info)
                if split is None:
                    continue
                if current is None or split[0] != current.key:
                    if current is not None:
                        yield current
                    current = _Sample(split[0], info.name)
                _add_member(current, split[1], info, tf, where)
            problem = _unread_rest(tar_path, tf.offset)
        except tarfile.TarError as e:
            problem = f"tar cut or corrupt after byte {tf.offset}: {e}; the rest of the file could not be read"
        if current is not None:
            yield current
        if problem:
            yield _Sample(f"{tar_path.stem}-unreadable-from-{tf.offset}", f"@{tf.offset}", problem=problem)


def _unread_rest(tar_path: Path, offset: int) -> str:
    """Why the bytes after the last member tarfile could read are not the end-of-archive zeros
    ("" when they are)."""
    size = tar_path.stat().st_size
    with open(tar_path, "rb") as f:
        f.seek(offset)
        rest = f.read(min(size - offset, 2 * tarfile.RECORDSIZE))
    if not rest.strip(b"\0"):
        return ""
    return (f"tar cut or corrupt at byte {offset} of {size}: a member header there does not read; "
            f"the samples in the last {size - offset} bytes are lost")


def _sample_draft(sample: _Sample, tar_path: str, names: Sequence[str] | None) -> _Draft:
    where = f"{tar_path}#{sample.first_member}"
    class_name = sample.class_name
    if class_name is None:
        class_name = _class_name(sample.label, names, where)
    raw_key = sample.key.replace("/", "_")
    if sample.image is None:
        # size=0 reads as an empty file, so the decoder records the sample instead of losing it.
        return _Draft(raw_key, where, sample.label, class_name, tar_path, 0, 0, sample.problem)
    img = sample.image
    source = f"{tar_path}#{img.name}"
    return _Draft(raw_key, source, sample.label, class_name, tar_path, img.offset_data, img.size, sample.problem)


def from_webdataset(spec: str, class_map: Path | None = None) -> list[Item]:
    """Samples of the shards named by `spec`, in shard order then member order."""
    names = read_class_map(class_map) if class_map is not None else None
    drafts: list[_Draft] = []
    for tar_path in _expand_shards(str(spec)):
        drafts.extend(_sample_draft(s, str(tar_path), names) for s in _scan_tar(tar_path))
    return _to_items(drafts, f"webdataset shards {spec!r}")


# --- list file --------------------------------------------------------------------------------


def _read_table(path: Path) -> pl.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in LIST_SUFFIXES:
        raise SourceError(f"{path}: a list file must end in .csv or .parquet")
    try:
        if suffix == ".csv":
            # Everything as text: labels are cast below, with an error that names the file.
            return pl.read_csv(path, infer_schema=False, glob=False)
        return pl.read_parquet(path, glob=False)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise SourceError(f"cannot read list file {path}: {e}") from e


def _text_column(df: pl.DataFrame, name: str) -> list[str | None] | None:
    return df[name].cast(pl.String).to_list() if name in df.columns else None


def _label_column(df: pl.DataFrame, path: Path) -> list[int]:
    dtype = df["label"].dtype
    if dtype.is_float() or dtype == pl.Boolean:  # 1.5 or True would pass a cast, wrongly
        raise SourceError(f"{path}: column 'label' holds {dtype} values; labels are integer class indices")
    try:
        values = df["label"].cast(pl.Int64, strict=True).to_list()
    except pl.exceptions.PolarsError as e:
        raise SourceError(f"{path}: column 'label' must hold integers: {e}") from e
    return [-1 if v is None or v < 0 else v for v in values]


def _labels_from_names(
    given: Sequence[str | None], names: Sequence[str] | None, path: Path
) -> list[int]:
    """Labels from class names: class-map position, else position in the sorted unique names."""
    vocab = names if names is not None else sorted({g for g in given if g is not None})
    index = {n: i for i, n in enumerate(vocab)}
    unknown = sorted({g for g in given if g is not None and g not in index})
    if unknown:
        raise SourceError(
            f"{path}: {len(unknown)} class names are not in the class map: {unknown[:10]}"
        )
    return [index[g] if g is not None else -1 for g in given]


def _labels_and_names(
    df: pl.DataFrame, path: Path, class_map: Path | None
) -> tuple[list[int], list[str]]:
    names = read_class_map(class_map) if class_map is not None else None
    given = _text_column(df, "class_name")
    if "label" in df.columns:
        labels = _label_column(df, path)
        # Computed for every row so labels outside the class map are reported.
        derived = [_class_name(label, names, str(path)) for label in labels]
    else:
        assert given is not None  # checked by the caller
        labels = _labels_from_names(given, names, path)
        derived = [""] * len(labels)
    if given is None:
        return labels, derived
    return labels, [g if g is not None else d for g, d in zip(given, derived)]


def from_list_file(path: Path, class_map: Path | None = None, allow_roots: Sequence[Path] = ()) -> list[Item]:
    """Rows of a CSV/Parquet with `path`, `label` and/or `class_name`, in file order.

    A list file may name only files inside its own folder or one of `allow_roots` (after
    following symlinks): any other path (`/etc/shadow`, `/proc/self/environ`) becomes an error
    row that is never read."""
    path = Path(path)
    df = _read_table(path)
    if "path" not in df.columns or not {"label", "class_name"} & set(df.columns):
        raise SourceError(
            f"{path}: a list file needs columns 'path' and 'label' (or 'class_name'); "
            f"found {df.columns}"
        )
    rel_paths = _text_column(df, "path") or []
    if any(p is None for p in rel_paths):
        raise SourceError(f"{path}: column 'path' has empty values")
    labels, class_names = _labels_and_names(df, path, class_map)
    base = path.parent.resolve()
    roots = [str(base), *(str(Path(r).resolve()) for r in allow_roots)]
    drafts: list[_Draft] = []
    for rel, label, class_name in zip(rel_paths, labels, class_names):
        # join() keeps absolute paths as they are; normpath folds `..` without following links.
        full = os.path.normpath(os.path.join(base, str(rel)))
        pure = PurePosixPath(full)
        raw = _raw_key(pure.parent.name, pure.name)
        drafts.append(_Draft(raw, full, label, class_name, full, problem=_outside(full, roots)))
    return _to_items(drafts, f"list file {path}")


def _outside(path: str, roots: Sequence[str], what: str = "the list file's folder") -> str:
    """Why `path` may not be read (its real location is in none of `roots`), or ""."""
    real = os.path.realpath(path)
    if any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        return ""
    return (f"outside {what} {roots[0]} and every --allow-root: not read "
            "(pass --allow-root DIR to read files there)")


# --- unlabelled files (`curate predict`) ------------------------------------------------------


def from_files(root: Path, allow_roots: Sequence[Path] = ()) -> list[Item]:
    """Every non-hidden file under `root` (or `root` itself), sorted, unlabelled (label -1).

    The rules of the labelled sources: every file is one item, bad ones included; a symlink whose
    target lies outside `root` and every `allow_roots` folder is an item that is never read (its
    `problem` says so), as a list file's outside paths are; devices and FIFOs are refused by
    `read_bytes` without being opened for reading. Folders behind symlinks are not entered."""
    root = Path(root)
    if not root.exists():
        raise SourceError(f"{root} does not exist")
    if root.is_dir():
        base = str(root.resolve())
        paths = [f"{base}/{rel}" for rel in _class_files(Path(base))]
        if not paths:
            raise SourceError(f"{root}: no files (hidden ones are skipped)")
    else:  # one file, named by the user: its own folder is the root
        base, paths = str(root.parent.resolve()), [str(root.parent.resolve() / root.name)]
    roots = [base, *(str(Path(r).resolve()) for r in allow_roots)]
    raw = [_raw_key(PurePosixPath(p).parent.name, PurePosixPath(p).name) for p in paths]
    keys = assign_keys(raw, paths)
    return [Item(k, display_path(p), -1, "", p, problem=_outside(p, roots, "the folder"))
            for k, p in zip(keys, paths)]


# --- sources relative to the input ----------------------------------------------------------


def source_root(spec: str | Path) -> str:
    """The folder an input's sources are told relative to: the folder itself, or the folder of
    a list file, a .tar or a shard pattern."""
    text = str(spec)
    if os.path.isdir(text):
        return os.path.realpath(text)
    return os.path.realpath(os.path.dirname(text) or ".")


_TAR_MEMBER = re.compile(r"[.]tar#", re.IGNORECASE)


def split_source(source: str) -> tuple[str, str | None]:
    """(file, member) of an `Item.source`: ("PATH.tar", "member") for a tar member, else
    (source, None). The first ".tar#" ends the tar's path: a "#" elsewhere (a file named
    "a#b.jpg", a member's own "#") is part of a name, not the separator."""
    match = _TAR_MEMBER.search(source)
    if match is None:
        return source, None
    return source[:match.end() - 1], source[match.end():]


def relative_source(source: str, root: str) -> str:
    """`source` ("PATH" or "TAR#member") with PATH relative to `root`: what a shard records, so
    it says where the image came from without the building machine's absolute paths."""
    path, member = split_source(source)
    if member is not None:
        return f"{os.path.relpath(path, root)}#{member}"
    return os.path.relpath(source, root)


# --- dispatch ---------------------------------------------------------------------------------


def _source_kind(text: str) -> str:
    """'folder' | 'webdataset' | 'list', or a SourceError saying what was expected."""
    path = Path(text)
    expected = (
        "expected a directory of class subdirectories (ImageFolder), a directory of *.tar "
        "shards, a .tar file, a glob or {a..b} pattern of shards, or a .csv/.parquet list file"
    )
    if path.is_dir():
        if _class_dirs(path):
            return "folder"
        if any(not p.name.startswith(".") for p in path.glob("*.tar")):
            return "webdataset"
        raise SourceError(f"cannot tell what kind of input {text!r} is: {expected}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".tar":
            return "webdataset"
        if suffix in LIST_SUFFIXES:
            return "list"
        raise SourceError(f"cannot tell what kind of input {text!r} is: {expected}")
    if "{" in text or _GLOB_CHARS.search(text):
        return "webdataset"
    raise SourceError(f"input {text!r} does not exist ({expected})")


def open_source(spec: str | Path, class_map: Path | None = None, allow_roots: Sequence[Path] = (),
                max_classes: int = DEFAULT_MAX_CLASSES) -> list[Item]:
    """Items of any supported input, picked by what `spec` looks like on disk. `allow_roots`:
    folders a list file may name files in besides its own; `max_classes`: labels must be below it."""
    text = str(spec)
    kind = _source_kind(text)
    if kind == "folder":
        items = from_image_folder(Path(text), class_map)
    elif kind == "webdataset":
        items = from_webdataset(text, class_map)
    else:
        items = from_list_file(Path(text), class_map, allow_roots)
    _check_labels(items, max_classes)
    return items


def _check_labels(items: Sequence[Item], max_classes: int) -> None:
    """Labels are class indices; one far above the rest is a data error, and a proxy head sized
    by it would not fit in memory."""
    too_big = [it for it in items if it.label >= max_classes]
    if too_big:
        first = too_big[0]
        raise SourceError(f"{len(too_big)} input(s) have a label >= --max-classes {max_classes}, e.g. "
                          f"{first.label} for {first.source}: labels are class indices 0..C-1; raise "
                          "--max-classes only if there really are that many classes")
