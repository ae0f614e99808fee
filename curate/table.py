"""The scores table: Parquet part files with an explicit schema, plus `manifest.json`.

One row per input key, errors included. Parts are written under a temporary name and renamed
when complete, so a part that exists is whole: resume skips it. Read everything with
`polars.scan_parquet("OUT/*.parquet")`.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
PART_GLOB = "part-*.parquet"

# Columns every scores table has, in order. Proxy outputs are null on error rows; training
# dynamics are null when the proxy was not trained here.
BASE_FIELDS: list[pa.Field] = [
    pa.field("key", pa.string(), nullable=False),  # sample key (DESIGN.md contract)
    pa.field("source", pa.string(), nullable=False),  # original path, or "TAR#member"
    pa.field("label", pa.int32(), nullable=False),  # class index, -1 when unknown
    pa.field("class_name", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
    pa.field("error", pa.string()),  # readable reason when status == "error"
    pa.field("width", pa.int32()),  # original size after EXIF orientation
    pa.field("height", pa.int32()),
    pa.field("num_bytes", pa.int64()),
    pa.field("content_hash", pa.string()),  # blake2b-128 of the file bytes, hex
    pa.field("loss", pa.float32()),  # cross-entropy of the given label
    pa.field("margin", pa.float32()),  # p_y - max_{k != y} p_k
    pa.field("el2n", pa.float32()),  # ||softmax - onehot(y)||_2
    pa.field("entropy", pa.float32()),  # -sum p log p (nats)
    pa.field("pred", pa.int32()),  # argmax class
    pa.field("confidence", pa.float32()),  # max_k p_k
    pa.field("forgetting", pa.int32()),  # correct->incorrect transitions; never learned = epochs
    pa.field("el2n_mean", pa.float32()),  # EL2N averaged over training epochs
    pa.field("margin_mean", pa.float32()),  # margin averaged over training epochs (AUM)
    pa.field("importance", pa.binary()),  # float16 little-endian [importance_h, importance_w]
    pa.field("importance_h", pa.int16()),
    pa.field("importance_w", pa.int16()),
]


THUMB_SIDE = 8  # `thumbnail`: the decoded image area-averaged to 8x8 RGB, uint8, (3, 8, 8) flattened


def schema(embed_dim: int, metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """The full schema; the embedding width is fixed per table (one proxy per table).

    `embedding` is the proxy's pre-logit features (semantic); `thumbnail` keeps the pixels'
    layout, which is what tells a near-copy from another image of the same class when the
    proxy is small (see curate/embeddings.py).
    """
    fields = [*BASE_FIELDS, pa.field("embedding", pa.list_(pa.float32(), embed_dim)),
              pa.field("thumbnail", pa.list_(pa.uint8(), 3 * THUMB_SIDE ** 2))]
    meta = {"schema_version": str(SCHEMA_VERSION), **(metadata or {})}
    return pa.schema(fields, metadata=meta)


def importance_to_bytes(grid: np.ndarray) -> bytes:
    """A [gh, gw] map as float16 little-endian bytes (the stored form)."""
    return np.ascontiguousarray(grid, dtype="<f2").tobytes()


def importance_from_bytes(data: bytes, h: int, w: int) -> np.ndarray:
    """Inverse of `importance_to_bytes`: a float16 [h, w] array."""
    return np.frombuffer(data, dtype="<f2").reshape(h, w)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield `.NAME.tmp` beside `path` to write to; rename it to `path` only if the body succeeds,
    so a reader (or a resume) never sees a half-written file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    yield tmp
    os.replace(tmp, path)


def part_path(out: Path, index: int) -> Path:
    return out / f"part-{index:06d}.parquet"


def write_part(path: Path, rows: Mapping[str, Any], table_schema: pa.Schema) -> None:
    """Write one part atomically: a reader never sees a half-written file under its name."""
    table = pa.Table.from_pydict(dict(rows), schema=table_schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def done_parts(out: Path) -> set[int]:
    """Indices of the parts that are complete (temporary files never match the glob)."""
    return {int(p.stem.split("-")[1]) for p in out.glob(PART_GLOB)}


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_schema_version(path: Path) -> int:
    meta = pq.read_schema(path).metadata or {}
    return int(meta.get(b"schema_version", b"0"))


def write_json(path: Path, obj: Any) -> None:
    """JSON written atomically, keys sorted so the same content gives the same bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def iter_rows_columns(parts: Iterable[Path], columns: list[str]) -> Iterable[pa.RecordBatch]:
    """Stream selected columns of the parts batch by batch (bounded memory)."""
    for part in parts:
        yield from pq.ParquetFile(part).iter_batches(columns=columns)
