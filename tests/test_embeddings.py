"""Near-duplicate groups and prototype scores on planted synthetic embeddings."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from curate.select.embeddings import (
    duplicate_groups,
    embedding_columns,
    load_embeddings,
    prototype_scores,
)
from curate.select.policies import SelectConfig, load_scores, select
from curate.score.table import BASE_FIELDS, part_path, schema, write_part


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def write_embeddings(directory: Path, keys: list[str], emb: np.ndarray, errors: set[str],
                     parts: int, thumbs: np.ndarray | None = None) -> Path:
    """A scores table whose ok rows carry `emb` (unnormalised), `thumbs` (uint8 (N, 192),
    default zeros) and error rows none."""
    thumbs = np.zeros((len(keys), 192), np.uint8) if thumbs is None else thumbs
    directory.mkdir(parents=True, exist_ok=True)
    table_schema = schema(emb.shape[1], 2)
    for i, rows in enumerate(np.array_split(np.arange(len(keys)), parts)):
        cols: dict[str, list[Any]] = {f.name: [None] * len(rows) for f in BASE_FIELDS}
        ok = [keys[j] not in errors for j in rows]
        cols.update(
            key=[keys[j] for j in rows], source=[f"/d/{keys[j]}.jpg" for j in rows],
            label=[0] * len(rows), class_name=["c"] * len(rows),
            status=["ok" if o else "error" for o in ok],
            error=[None if o else "truncated" for o in ok],
            el2n=[float(j) if o else None for j, o in zip(rows, ok)],
            embedding=[emb[j].tolist() if o else None for j, o in zip(rows, ok)],
            thumbnail=[thumbs[j].tolist() if o else None for j, o in zip(rows, ok)],
        )
        write_part(part_path(directory, i), cols, table_schema)
    return directory


def planted(n_random: int, group_sizes: list[int], dim: int, seed: int = 0):
    """Random unit vectors plus groups of noisy copies, shuffled; returns (emb, group of row)."""
    rng = np.random.default_rng(seed)
    vecs = [rng.standard_normal((n_random, dim))]
    owner = [np.full(n_random, -1)]
    for g, size in enumerate(group_sizes):
        base = unit(rng.standard_normal(dim))
        vecs.append(base + 1e-3 * rng.standard_normal((size, dim)))
        owner.append(np.full(size, g))
    perm = rng.permutation(n_random + sum(group_sizes))
    return unit(np.concatenate(vecs))[perm], np.concatenate(owner)[perm]


def test_load_embeddings_across_parts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    keys = [f"k{i:03d}" for i in range(50)]
    emb = rng.standard_normal((50, 8)).astype(np.float32) * 3
    errors = {"k003", "k017", "k040"}
    directory = write_embeddings(tmp_path / "s", keys, emb, errors, parts=3)
    got_keys, got = load_embeddings(directory, batch_rows=7)  # several batches per part
    ok = [i for i, k in enumerate(keys) if k not in errors]
    assert got_keys == [keys[i] for i in ok]
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (47, 8)
    np.testing.assert_allclose(got, unit(emb[ok]), rtol=1e-5, atol=1e-6)


def test_duplicate_groups_found_without_false_merges() -> None:
    sizes = [2, 3, 4, 2, 5, 2, 3]
    emb, owner = planted(1500, sizes, dim=64)  # random pairs: |cos| ~ 0.125, far below 0.95
    groups = duplicate_groups(emb, threshold=0.95, k=5, batch=256)
    assert groups.dtype == np.int64
    assert np.all(groups[owner == -1] == -1)
    for g in range(len(sizes)):
        members = np.flatnonzero(owner == g)
        assert np.all(groups[members] == members.min())  # id = smallest row of the group
    assert len(np.unique(groups[groups >= 0])) == len(sizes)


def test_duplicate_chain_joins_transitively() -> None:
    # points 0.25 rad apart on a circle: neighbours have cos 0.969, the ends are far apart
    angles = 0.25 * np.arange(11)
    chain = np.zeros((11, 16), np.float32)
    chain[:, 0], chain[:, 1] = np.cos(angles), np.sin(angles)
    far = np.zeros((1, 16), np.float32)
    far[0, 5] = 1.0
    emb = np.concatenate([chain[::-1], far])  # reversed: the smallest row is the far end
    groups = duplicate_groups(emb, threshold=0.95, k=2, batch=3)
    assert groups.tolist() == [0] * 11 + [-1]


def test_prototype_scores_recover_centres() -> None:
    rng = np.random.default_rng(1)
    centres = unit(np.eye(16)[:4] + 0.1 * rng.standard_normal((4, 16)))
    truth = np.repeat(np.arange(4), 100)
    emb = unit(centres[truth] + 0.03 * rng.standard_normal((400, 16)))
    dist, cluster = prototype_scores(emb, k=4, seed=0)
    assert dist.dtype == np.float32 and cluster.dtype == np.int64
    mapping = {t: set(cluster[truth == t].tolist()) for t in range(4)}
    assert all(len(ids) == 1 for ids in mapping.values())  # each centre is one cluster
    assert len(set.union(*mapping.values())) == 4  # and no two centres share one
    assert dist.max() < 0.05 and dist.min() >= -1e-5
    again = prototype_scores(emb, k=4, seed=0)
    np.testing.assert_array_equal(cluster, again[1])
    with pytest.raises(ValueError, match="prototypes"):
        prototype_scores(emb[:3], k=4)


def test_embedding_columns_feed_dedup(tmp_path: Path) -> None:
    emb, owner = planted(200, [3], dim=32, seed=2)
    keys = [f"k{i:03d}" for i in range(len(emb))]
    members = np.flatnonzero(owner == 0)
    # the group's representative is its smallest KEY, whatever part or row holds it
    keys = keys[::-1]
    errors = {keys[5]} - {keys[m] for m in members}
    directory = write_embeddings(tmp_path / "s", keys, emb, errors, parts=2)
    cols = embedding_columns(directory, dedup_threshold=0.95, prototypes=4, dedup_on="embedding")
    assert cols.columns == ["key", "dup_group", "dup_keep", "proto_dist", "proto_cluster"]
    assert cols.height == len(keys) - len(errors)
    dup_keys = sorted(keys[m] for m in members)
    dups = cols.filter(pl.col("dup_group") >= 0).sort("key")
    assert dups["key"].to_list() == dup_keys
    assert dups["dup_keep"].to_list() == [True, False, False]
    assert cols.filter(pl.col("dup_group") < 0)["dup_keep"].all()
    assert cols["proto_cluster"].n_unique() == 4 and cols["proto_dist"].null_count() == 0

    sel = select(load_scores([directory]), SelectConfig(keep=1.0, dedup=True), extra=cols)
    reasons = dict(zip(sel["key"], sel["reason"]))
    assert [reasons[k] for k in dup_keys] == ["kept", "duplicate", "duplicate"]
    assert sel["kept"].sum() == len(keys) - len(errors) - 2

    off = embedding_columns(directory, dedup_threshold=None, prototypes=None)
    assert off.select(pl.all().exclude("key").null_count()).row(0) == (off.height,) * 4


def test_thumbnail_dedup_finds_brightened_noisy_copies(tmp_path: Path) -> None:
    """Thumbnails are centred per row: a copy made brighter and noisier still links."""
    rng = np.random.default_rng(0)
    base = rng.integers(20, 200, size=(60, 192))
    copies = np.clip(base[:5] + 25 + rng.integers(-3, 4, size=(5, 192)), 0, 255)  # brighter + noise
    thumbs = np.concatenate([base, copies]).astype(np.uint8)
    keys = [f"k{i:03d}" for i in range(len(thumbs))]
    emb = np.ones((len(keys), 4), np.float32)  # a collapsed embedding: useless for dedup
    directory = write_embeddings(tmp_path / "s", keys, emb, set(), parts=2, thumbs=thumbs)
    cols = embedding_columns(directory, dedup_threshold=0.95, prototypes=None, dedup_on="thumbnail")
    groups = dict(zip(cols["key"], cols["dup_group"]))
    for i in range(5):
        assert groups[keys[i]] == groups[keys[60 + i]] >= 0
    assert sum(g >= 0 for g in groups.values()) == 10
    collapsed = embedding_columns(directory, dedup_threshold=0.95, prototypes=None, dedup_on="embedding")
    assert (collapsed["dup_group"] >= 0).all()  # what the thumbnail default protects against
