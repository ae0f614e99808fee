"""The scores table: the one contract between `curate score` and every reader of its output.

Parquet part files with an explicit schema and `schema_version` in each file's metadata, plus
`manifest.json`. One row per input key, errors included. Parts are written under a temporary
name and renamed when complete, so a part that exists is whole: resume skips it. Readers go
through `parts`/`scan`, which refuse a table of another schema version; users read everything
with `polars.scan_parquet("OUT/*.parquet")`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate.common.atomic import atomic_path, read_json_object
from curate.common.runfolder import wrong_kind

SCHEMA_VERSION = 3  # 2: probs, out-of-sample scores (folds) and label issues; 3: phash
READABLE_VERSIONS = (2, 3)  # a version-2 table reads the same, less its `phash` (no --dedup-on phash)
PART_GLOB = "part-*.parquet"

# Columns every scores table has, in order, in groups by what fills them (`BASE_FIELDS`). Proxy
# outputs are null on error rows; training dynamics are null when the proxy was not trained here.
IDENTITY_FIELDS: list[pa.Field] = [  # what the input is: from the index and the decoder, on every row
    pa.field("key", pa.string(), nullable=False),  # sample key (docs/design.md#the-sample-key)
    pa.field("source", pa.string(), nullable=False),  # original path, or "TAR#member"
    pa.field("label", pa.int32(), nullable=False),  # class index, -1 when unknown
    pa.field("class_name", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
    pa.field("error", pa.string()),  # readable reason when status == "error"
    pa.field("width", pa.int32()),  # original size after EXIF orientation
    pa.field("height", pa.int32()),
    pa.field("num_bytes", pa.int64()),
    pa.field("content_hash", pa.string()),  # blake2b-128 of the file bytes, hex
]
SCORE_FIELDS: list[pa.Field] = [  # the proxy's forward (named as curate.score.metrics.example_scores)
    pa.field("loss", pa.float32()),  # cross-entropy of the given label
    pa.field("margin", pa.float32()),  # p_y - max_{k != y} p_k
    pa.field("el2n", pa.float32()),  # ||softmax - onehot(y)||_2
    pa.field("entropy", pa.float32()),  # -sum p log p (nats)
    pa.field("pred", pa.int32()),  # argmax class
    pa.field("confidence", pa.float32()),  # max_k p_k
]
DYNAMICS_FIELDS: list[pa.Field] = [  # a proxy trained here (named as proxy_training.Dynamics.summary)
    pa.field("forgetting", pa.int32()),  # correct->incorrect transitions; never learned = epochs
    pa.field("el2n_mean", pa.float32()),  # EL2N averaged over training epochs
    pa.field("margin_mean", pa.float32()),  # margin averaged over training epochs (AUM)
]
# How the proxy fills the map (`curate score --importance`): auto = cls for a ViT, cam for a CNN.
IMPORTANCE_METHODS = ("auto", "cls", "rollout", "cam", "none")
MAP_FIELDS: list[pa.Field] = [
    pa.field("importance", pa.binary()),  # float16 little-endian [importance_h, importance_w]
    pa.field("importance_h", pa.int16()),
    pa.field("importance_w", pa.int16()),
]
OOS_PREFIX = "oos_"
OOS_SCORES = ("loss", "margin", "el2n")  # the scores given again out of sample, as oos_<score>
# With --folds K > 1: the fold this row was held out of, and the scores of the proxy trained
# without it (out of sample); null with K = 1.
FOLD_FIELDS: list[pa.Field] = [pa.field("fold", pa.int16()),
                               *(pa.field(OOS_PREFIX + name, pa.float32()) for name in OOS_SCORES)]
LABEL_ISSUE_FIELDS: list[pa.Field] = [  # from `probs` by cleanlab, over the whole table (label_issues.py)
    pa.field("label_issue", pa.bool_()),  # the given label is likely wrong
    pa.field("label_quality", pa.float32()),  # higher = more likely correct (self-confidence)
    pa.field("suggested_label", pa.int32()),  # the class the probabilities favour
]
BASE_FIELDS: list[pa.Field] = [*IDENTITY_FIELDS, *SCORE_FIELDS, *DYNAMICS_FIELDS, *MAP_FIELDS, *FOLD_FIELDS,
                               *LABEL_ISSUE_FIELDS]


def names(fields: Sequence[pa.Field]) -> tuple[str, ...]:
    return tuple(f.name for f in fields)


PHASH_BYTES = 256  # `phash`: 4 views x (pHash + dHash) x 256 bits, packed (curate/score/phash.py)
THUMB_SIDE = 8  # `thumbnail`: the decoded image area-averaged to 8x8 RGB, uint8, (3, 8, 8) flattened


def schema(embed_dim: int, num_classes: int, metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """The full schema; the embedding and probability widths are fixed per table (one proxy per
    table).

    `probs` are the class probabilities: out of sample with --folds K > 1, the proxy's own
    otherwise; label issues are found from them.

    `embedding` is the proxy's pre-logit features (semantic); `thumbnail` keeps the pixels'
    layout and `phash` the perceptual hashes of 4 views (curate/score/phash.py), which is what
    tells a copy from another image that looks alike (see curate/select/embeddings.py).
    """
    fields = [*BASE_FIELDS, pa.field("embedding", pa.list_(pa.float32(), embed_dim)),
              pa.field("thumbnail", pa.list_(pa.uint8(), 3 * THUMB_SIDE ** 2)),
              pa.field("phash", pa.list_(pa.uint8(), PHASH_BYTES)),
              pa.field("probs", pa.list_(pa.float32(), num_classes))]
    meta = {"schema_version": str(SCHEMA_VERSION), **(metadata or {})}
    return pa.schema(fields, metadata=meta)


def importance_to_bytes(grid: np.ndarray) -> bytes:
    """A [gh, gw] map as float16 little-endian bytes (the stored form)."""
    return np.ascontiguousarray(grid, dtype="<f2").tobytes()


MAX_MAP_SIDE = 1024  # a map is a patch grid: a larger importance_h/w is a damaged table


def importance_from_bytes(data: bytes, h: int, w: int) -> np.ndarray:
    """Inverse of `importance_to_bytes`: a float16 [h, w] array. Raises ValueError when the
    bytes and the grid size disagree or the map is not finite (a damaged or edited table)."""
    problem = map_problem(len(data), h, w)
    if problem:
        raise ValueError(problem)
    grid = np.frombuffer(data, dtype="<f2").reshape(h, w)
    if not np.isfinite(grid).all():
        raise ValueError("importance map holds NaN or infinite values")
    return grid


def map_problem(num_bytes: int, h: int, w: int) -> str:
    """Why `num_bytes` of map data cannot be a float16 [h, w] grid, or ""."""
    if not (0 < h <= MAX_MAP_SIDE and 0 < w <= MAX_MAP_SIDE):
        return f"importance_h x importance_w = {h} x {w} is not a patch grid (sides 1..{MAX_MAP_SIDE})"
    if num_bytes != 2 * h * w:
        return f"importance map has {num_bytes} bytes, but importance_h x importance_w = {h} x {w} needs {2 * h * w}"
    return ""


def part_path(out: Path, index: int) -> Path:
    return out / f"part-{index:06d}.parquet"


def write_part(path: Path, rows: Mapping[str, Any], table_schema: pa.Schema) -> None:
    """Write one part atomically: a reader never sees a half-written file under its name.
    Columns absent from `rows` are written as nulls (filled later, or not produced by this run)."""
    n = len(next(iter(rows.values())))
    table = pa.Table.from_pydict({f.name: rows[f.name] if f.name in rows else [None] * n for f in table_schema},
                                 schema=table_schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


class PartRows:
    """One part's rows as a list per column of the schema, filled batch by batch: a batch gives
    the columns it knows (all of one length), the others get nulls for its rows."""

    def __init__(self, table_schema: pa.Schema) -> None:
        self.columns: dict[str, list[Any]] = {name: [] for name in table_schema.names}

    def add(self, batch: Mapping[str, Sequence[Any]]) -> None:
        unknown = sorted(set(batch) - set(self.columns))
        lengths = {len(v) for v in batch.values()}
        if unknown or len(lengths) != 1:  # a bug in the writer, never the user's data: a traceback
            raise RuntimeError(f"a batch of rows with columns not in the schema {unknown} or of lengths {lengths}")
        nulls = [None] * lengths.pop()
        for name, column in self.columns.items():
            column.extend(batch.get(name, nulls))

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


def done_parts(out: Path) -> set[int]:
    """Indices of the parts that are complete (temporary files never match the glob)."""
    return {int(p.stem.split("-")[1]) for p in out.glob(PART_GLOB)}


def read_schema_version(path: Path) -> int:
    meta = pq.read_schema(path).metadata or {}
    return int(meta.get(b"schema_version", b"0"))


class SchemaError(ValueError):
    """A scores table this version of curate cannot read; the message says why."""


def parts(out: Path) -> list[Path]:
    """The part files of a scores table, sorted, each checked for the schema version (a footer
    read, no data)."""
    found = sorted(Path(out).glob(PART_GLOB))
    if not found:
        raise FileNotFoundError(f"no {PART_GLOB} in {out}: run `curate score` first")
    versions = set()
    for part in found:
        try:
            version = read_schema_version(part)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise SchemaError(f"{part} is not a readable Parquet part: {e}") from e
        if version not in READABLE_VERSIONS:
            raise SchemaError(f"{part} has scores schema_version {version}; this curate reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}: score again with this version, or use "
                              "the curate that wrote it")
        versions.add(version)
    if len(versions) > 1:
        raise SchemaError(f"{out}: parts of different schema versions (a run resumed by another curate?): "
                          "score again with --overwrite")
    return found


def scan(out: Path) -> pl.LazyFrame:
    """The whole table, lazily, after `parts` checked it."""
    return pl.scan_parquet(parts(out))


MANIFEST = "manifest.json"


def read_manifest(out: Path) -> dict[str, Any]:
    """manifest.json of a finished `curate score` run, checked for the schema version."""
    if kind := wrong_kind(Path(out), "score", "--scores takes the folder `curate score --out` wrote"):
        raise SchemaError(kind)
    manifest = read_json_object(Path(out) / MANIFEST, "is it a finished `curate score` output?")
    if manifest.get("schema_version") not in READABLE_VERSIONS:
        raise SchemaError(f"{out}/{MANIFEST} has schema_version {manifest.get('schema_version')!r}; this curate "
                          f"reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    return manifest


def rewrite_columns(path: Path, columns: Mapping[str, pa.Array]) -> None:
    """Replace whole columns of a part (the rest as it was), temp-then-rename: a part on disk is
    always complete, before or after."""
    part = pq.read_table(path)
    for name, values in columns.items():
        part = part.set_column(part.schema.get_field_index(name), part.schema.field(name), values)
    with atomic_path(path) as tmp:
        pq.write_table(part, tmp, compression="zstd")
