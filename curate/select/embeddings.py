"""Embedding-derived columns: near-duplicate groups and self-supervised prototype scores.

The `embedding` (or `thumbnail`) column of a scores table is read part by part into ONE
preallocated float32 matrix (ImageNet: 1.28M x 384 x 4 B = 1.9 GiB); the only per-row Python
objects are the keys. Everything after that is faiss on that matrix, in place and in query
batches, so peak memory is one matrix plus one batch of search results; with thumbnail dedup
and prototypes both on, the two matrices are loaded one after the other, never together.

- Near-duplicates: by default on the `phash` column (perceptual hashes of 4 views, curate/score/
  phash.py): rows within a Hamming radius of a centre's plain view form a star around it, and
  members do not recruit further, so look-alikes do not chain into one group (on real photos the
  0.93 thumbnail groups chained birds and airplanes on a blue sky; docs/benchmarks.md,
  "Near-duplicates on real photographs"). `dedup_on="thumbnail"` (8x8 pixels) and "embedding"
  (the proxy's features) link rows by cosine similarity above a threshold and group them by
  connected components (SemDeDup-style, Abbas et al. 2023). One representative per group is kept.
- Prototype score (Sorscher et al. 2022, "Beyond neural scaling laws"): spherical k-means on
  the embeddings, score = cosine distance to the nearest centroid (large = atypical = hard).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.score.phash import HASH_BYTES, VIEWS
from curate.score.table import parts as table_parts

# The thumbnail cosine above which two images are near-duplicates where no one chose one: the
# demo's shards and `curate inspect --html` (measured on the demo data, see the docstring above).
DEDUP_THRESHOLD = 0.93
# What near-duplicates are found on: perceptual hashes (any proxy), the 8x8 thumbnails (any
# proxy) or the proxy's embedding.
DEDUP_ON = ("phash", "thumbnail", "embedding")
# Each descriptor's threshold where no one chose one (`curate inspect --html`, the help): phash's
# from bench/experiments/duplicates.py on real photographs (84% of planted copies, 0.72% merged).
DEFAULT_THRESHOLDS = {"phash": 0.75, "thumbnail": DEDUP_THRESHOLD}


def _embed_dim(part: Path, column: str = "embedding") -> int:
    """Width of the fixed-size list `column` in one part's schema."""
    kind = pq.read_schema(part).field(column).type
    if not pa.types.is_fixed_size_list(kind):
        raise ValueError(f"{part}: `{column}` is {kind}, expected a fixed-size list")
    return kind.list_size


def _count_ok(parts: list[Path]) -> int:
    # The footer has each part's row count but not how many rows are errors, and errors carry
    # no embedding; the status column alone is tiny (dictionary-encoded), so read just that.
    total = 0
    for part in parts:
        status = pq.read_table(part, columns=["status"]).column("status")
        total += pc.sum(pc.equal(status, "ok")).as_py() or 0
    return total


def _as_matrix(vectors: pa.Array, dim: int) -> np.ndarray:
    """A fixed-size-list array of ok rows as a (B, D) float32 array."""
    if vectors.null_count:
        raise ValueError(f"{vectors.null_count} ok rows have no embedding")
    flat = vectors.flatten()  # unlike `.values`, honours the slice offset of a filtered array
    return flat.to_numpy(zero_copy_only=False).reshape(-1, dim)  # (B, D)


def load_embeddings(scores_dir: Path, batch_rows: int = 65536,
                    column: str = "embedding") -> tuple[list[str], np.ndarray]:
    """Keys of the ok rows and their L2-normalised float32 vectors, in part/row order.

    `column` is "embedding" (the proxy's features) or "thumbnail" (8x8 RGB pixels, each row
    centred on its own mean first, so the cosine is the thumbnails' Pearson correlation:
    insensitive to brightness and independent of the rest of the dataset).
    Parts are streamed `batch_rows` at a time into one matrix allocated up front (ok rows
    are counted first), so memory is the matrix plus one batch, never a list of rows.
    """
    import faiss  # here, not at import time: reading shards or training needs no faiss
    parts = table_parts(scores_dir)
    columns = ["key", "status", column]
    dim = _embed_dim(parts[0], column)
    emb = np.empty((_count_ok(parts), dim), dtype=np.float32)
    keys: list[str] = []
    for part in parts:
        if _embed_dim(part, column) != dim:
            raise ValueError(f"{part}: {column} width {_embed_dim(part, column)} != {dim} of {parts[0]}")
        for batch in pq.ParquetFile(part).iter_batches(batch_size=batch_rows, columns=columns):
            ok = pc.equal(batch.column("status"), "ok")
            block = _as_matrix(batch.column(column).filter(ok), dim)
            emb[len(keys) : len(keys) + len(block)] = block
            keys.extend(batch.column("key").filter(ok).to_pylist())
    if len(keys) != len(emb):
        raise ValueError(f"{scores_dir} changed while being read: {len(keys)} ok rows, "
                           f"{len(emb)} counted")
    if column == "thumbnail":
        emb -= emb.mean(axis=1, keepdims=True)  # a flat thumbnail becomes 0: it matches nothing
    faiss.normalize_L2(emb)  # in place: emb is our own contiguous float32 copy
    return keys, emb


def _as_f32(emb: np.ndarray) -> np.ndarray:
    """faiss needs C-contiguous float32; no copy when it already is."""
    return np.ascontiguousarray(emb, dtype=np.float32)


def _links(x: np.ndarray, threshold: float, k: int, batch: int) -> np.ndarray:
    """(2, E) row pairs with similarity > threshold among each row's k nearest neighbours.

    faiss.knn searches `x` in place: an IndexFlatIP would hold a second copy of the matrix.
    It runs the same exact inner-product search (`knn_inner_product`) the index does."""
    import faiss  # here, not at import time: reading shards or training needs no faiss
    pairs = [np.empty((2, 0), dtype=np.int64)]
    for start in range(0, len(x), batch):
        sim, nbr = faiss.knn(x[start : start + batch], x, k, metric=faiss.METRIC_INNER_PRODUCT)  # (B, k) each
        rows = np.broadcast_to(np.arange(start, start + len(nbr))[:, None], nbr.shape)
        # faiss pads with -1 when fewer than k exist; the row itself is always a hit
        hit = (sim > threshold) & (nbr >= 0) & (nbr != rows)
        pairs.append(np.stack([rows[hit], nbr[hit]]))
    return np.concatenate(pairs, axis=1)


def _compress(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping until every row points straight at its root."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root (= smallest row index) of each row's connected component over links a[i]-b[i].

    Vectorised union-find: hook the larger root of every unsatisfied link under the smaller,
    then compress. parent[i] <= i always holds, so there are no cycles, and at the fixed point
    each component has one root: its smallest member (its parent can be nothing smaller).
    """
    parent = np.arange(n, dtype=np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        if np.array_equal(ra, rb):
            return parent
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        parent = _compress(parent)


def duplicate_groups(
    emb: np.ndarray, threshold: float = 0.95, k: int = 10, batch: int = 16384
) -> np.ndarray:
    """int64 group id per row: the smallest row index of its near-duplicate group, -1 if none.

    Two rows are linked when their cosine similarity (inner product: `emb` must be
    L2-normalised) is > `threshold` and one is among the other's `k` nearest neighbours;
    groups are the connected components, so a group larger than k+1 is still found whole
    through chains of links. Search is exact (brute-force inner product, O(N^2 D) = 1.3e15 flops
    for 1.28M x 384; what that costs: docs/benchmarks.md, "Figures formerly quoted in code")
    and reads `emb` in place, without copying it into an index. For much larger N swap in `IndexIVFFlat`
    (train on a sample, nprobe ~ 16) or `IndexHNSWFlat`: a little recall for much less time.
    """
    x = _as_f32(emb)
    if len(x) == 0:
        return np.empty(0, dtype=np.int64)
    a, b = _links(x, threshold, min(k + 1, len(x)), batch)  # +1: the row finds itself
    root = _components(len(x), a, b)
    groups = np.full(len(x), -1, dtype=np.int64)
    linked = np.unique(np.concatenate([a, b]))
    groups[linked] = root[linked]
    return groups


def _training_sample(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A seeded subset of at most max(k*256, 100_000) rows for k-means.

    faiss subsamples to `max_points_per_centroid` (256) x k itself, so more rows would only
    cost a larger copy; sampling here keeps that copy bounded and the choice seeded by us.
    """
    size = min(len(x), max(k * 256, 100_000))
    if size == len(x):
        return x
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=size, replace=False))
    return x[rows]


def _nearest(centroids: np.ndarray, x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine distance to, and index of, the nearest centroid for every row, in batches."""
    import faiss  # here, not at import time: reading shards or training needs no faiss
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    dist = np.empty(len(x), dtype=np.float32)
    cluster = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), batch):
        sim, idx = index.search(x[start : start + batch], 1)  # (B, 1) each
        dist[start : start + len(idx)] = 1.0 - sim[:, 0]
        cluster[start : start + len(idx)] = idx[:, 0]
    return dist, cluster


def prototype_scores(
    emb: np.ndarray, k: int, niter: int = 20, seed: int = 0, batch: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Sorscher et al. 2022 self-supervised prototype score of every row.

    Spherical k-means (faiss) on a seeded sample, then every row assigned in batches.
    Returns (cosine distance to the nearest centroid, float32; cluster id, int64).
    """
    import faiss  # here, not at import time: reading shards or training needs no faiss
    x = _as_f32(emb)
    if not 1 <= k <= len(x):
        raise ValueError(f"prototypes k={k} must be in [1, {len(x)}] (number of ok rows)")
    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False)
    kmeans.train(_training_sample(x, k, seed))
    centroids = _as_f32(kmeans.centroids).copy()
    faiss.normalize_L2(centroids)  # spherical k-means already does; cheap insurance for IP
    return _nearest(centroids, x, batch)


def default_descriptor(scores_dir: Path) -> str:
    """What near-duplicates are found on when no one said: phash, or thumbnail in a table scored
    before the phash column existed (schema version 2)."""
    return "phash" if "phash" in pq.read_schema(table_parts(scores_dir)[0]).names else "thumbnail"


def load_phashes(scores_dir: Path, batch_rows: int = 65536) -> tuple[list[str], np.ndarray]:
    """Keys of the ok rows and their (N, PHASH_BYTES) uint8 hashes, in part/row order."""
    parts = table_parts(scores_dir)
    if "phash" not in pq.read_schema(parts[0]).names:
        raise ValueError(f"{scores_dir} has no phash column (scored by an older curate): score it again, or use "
                         "--dedup-on thumbnail")
    dim = _embed_dim(parts[0], "phash")
    out = np.empty((_count_ok(parts), dim), dtype=np.uint8)
    keys: list[str] = []
    for part in parts:
        for batch in pq.ParquetFile(part).iter_batches(batch_size=batch_rows, columns=["key", "status", "phash"]):
            ok = pc.equal(batch.column("status"), "ok")
            block = _as_matrix(batch.column("phash").filter(ok), dim)
            out[len(keys): len(keys) + len(block)] = block
            keys.extend(batch.column("key").filter(ok).to_pylist())
    return keys, out


def phash_links(h: np.ndarray, threshold: float, k: int = 10, batch: int = 16384) -> np.ndarray:
    """(2, E) row pairs whose similarity (1 - normalised Hamming distance between one's plain view
    and any view of the other) is >= threshold, among each view's k nearest plain views."""
    import faiss  # here, not at import time: reading shards or training needs no faiss
    if len(h) == 0:
        return np.empty((2, 0), dtype=np.int64)
    bits = 8 * HASH_BYTES
    radius = int(np.floor((1.0 - threshold) * bits + 1e-9))
    index = faiss.IndexBinaryFlat(bits)
    index.add(np.ascontiguousarray(h[:, :HASH_BYTES]))
    k = min(k + 1, len(h))  # +1: a row finds its own plain view
    pairs = [np.empty((2, 0), dtype=np.int64)]
    for view in range(VIEWS):
        queries = np.ascontiguousarray(h[:, view * HASH_BYTES: (view + 1) * HASH_BYTES])
        for start in range(0, len(h), batch):
            dist, nbr = index.search(queries[start: start + batch], k)  # (B, k) Hamming distances
            rows = np.broadcast_to(np.arange(start, start + len(nbr))[:, None], nbr.shape)
            hit = (dist <= radius) & (nbr >= 0) & (nbr != rows)
            pairs.append(np.stack([rows[hit], nbr[hit]]))
    return np.concatenate(pairs, axis=1)


def star_groups(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int64 group id per row (its centre's row), -1 if none, over links a[i]-b[i].

    Rows are taken in order; a row not yet in a group becomes a centre and takes every linked row
    not yet in one. Members do not recruit: A~B and B~C with A !~ C gives {A, B} and leaves C out,
    where connected components would chain look-alikes into one group."""
    groups = np.full(n, -1, dtype=np.int64)
    if a.size == 0:
        return groups
    src, dst = np.concatenate([a, b]), np.concatenate([b, a])  # links are symmetric
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    starts = np.searchsorted(src, np.arange(n + 1))
    for row in np.unique(src):
        if groups[row] != -1:
            continue
        members = dst[starts[row]: starts[row + 1]]
        members = members[groups[members] == -1]
        if members.size:
            groups[row] = row
            groups[members] = row
    return groups


def _dup_columns(frame: pl.DataFrame, groups: np.ndarray | None) -> pl.DataFrame:
    if groups is None:  # not computed: null, so `select --dedup` can refuse to guess
        return frame.with_columns(
            dup_group=pl.lit(None, pl.Int64), dup_keep=pl.lit(None, pl.Boolean)
        )
    group = pl.col("dup_group")
    # representative = smallest key, not smallest row, so it does not depend on part layout
    keep = (group == -1) | (pl.col("key") == pl.col("key").min().over(group))
    return frame.with_columns(dup_group=pl.Series(groups, dtype=pl.Int64)).with_columns(dup_keep=keep)


def _proto_columns(frame: pl.DataFrame, emb: np.ndarray | None, k: int | None, seed: int) -> pl.DataFrame:
    if k is None:
        return frame.with_columns(
            proto_dist=pl.lit(None, pl.Float32), proto_cluster=pl.lit(None, pl.Int64)
        )
    assert emb is not None  # embedding_columns loads it whenever prototypes are asked for
    dist, cluster = prototype_scores(emb, k, seed=seed)
    return frame.with_columns(proto_dist=pl.Series(dist), proto_cluster=pl.Series(cluster))


def embedding_columns(
    scores_dir: Path, dedup_threshold: float | None, prototypes: int | None, seed: int = 0,
    dedup_on: str = "phash",
) -> pl.DataFrame:
    """Per ok row: key, dup_group, dup_keep, proto_dist, proto_cluster.

    dup_group is -1 for rows with no near-duplicate; dup_keep is True for non-duplicates and
    for the representative (smallest key) of each group. Columns of a disabled step
    (threshold or prototypes None) are null. Join onto the scores by key (`select(extra=...)`).
    """
    frame: pl.DataFrame | None = None
    emb: np.ndarray | None = None
    if dedup_threshold is not None and dedup_on == "phash":
        keys, hashes = load_phashes(scores_dir)
        frame = _dup_columns(_key_frame(keys), star_groups(len(hashes), *phash_links(hashes, dedup_threshold)))
        del hashes
    elif dedup_threshold is not None and dedup_on == "thumbnail":
        keys, vectors = load_embeddings(scores_dir, column=dedup_on)
        frame = _dup_columns(_key_frame(keys), duplicate_groups(vectors, dedup_threshold))
        del vectors  # one N x D matrix at a time: free it before the embeddings are loaded
    if frame is None or prototypes is not None:  # the embeddings only when a step uses them
        keys, emb = load_embeddings(scores_dir)
        if frame is None:
            groups = duplicate_groups(emb, dedup_threshold) if dedup_threshold is not None else None
            frame = _dup_columns(_key_frame(keys), groups)
        elif keys != frame["key"].to_list():
            raise ValueError(f"{scores_dir}: {dedup_on} and embedding rows differ (table changed?)")
    return _proto_columns(frame, emb, prototypes, seed)


def _key_frame(keys: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"key": keys}, schema={"key": pl.String})
