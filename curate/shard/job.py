"""`curate shard` as a library call: scores -> selection -> WebDataset shards + indexes.

OUT/selection.parquet holds every input key with kept yes/no and the reason; the shards hold the
kept samples with their original bytes, label, scores and importance map; `_info.json` lets timm
read them unchanged and `manifest.json` records what made them (see curate/shard/format.py).

Memory: per input, only columns of scalars and keys (selection, shard plan, item fields) and,
with --dedup/--prototypes, the one vector matrix faiss searches. Importance maps are copied from
the Parquet parts, a batch at a time, into a scratch file in plan order, and every shard reads
its own contiguous slice of it, so no map of the whole table is ever held in memory.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate.common.atomic import atomic_path, jsonable
from curate.common.runfolder import RunFolder, mode_of
from curate.common.runtime import versions
from curate.ingest.decode import content_hash, decode_image
from curate.ingest.limits import DEFAULT_MAX_CLASSES
from curate.ingest.sources import (Item, index_sha256, open_source, read_bytes, relative_source, sanitize_key,
                                   source_root)
from curate.score import table
from curate.select.advice import recipe_warnings, resolve_label_issues
from curate.select.embeddings import DEDUP_ON, DEFAULT_THRESHOLDS, embedding_columns
from curate.select.policies import SelectConfig, load_scores, select, selection_hash
from curate.select.report import ReportInfo, write_report
from curate.select.weighing import MIN_SKILL, ProxyWeight, describe, lead, maps_order, weigh
from curate.shard import format as fmt
from curate.shard.plan import ShardPlan, plan_shards
from curate.shard.writer import write_split

COMMAND = "shard"
RESUME_FREE = ("resume", "overwrite", "dry_run", "progress", "workers")
REPORT = "report.html"
# Item fields as columns: the shard writers get kept inputs as slices of these, not as objects.
# `path` as bytes: a POSIX file name need not be UTF-8, and polars strings must be.
ITEM_SCHEMA = {"key": pl.String, "source": pl.String, "label": pl.Int64, "class_name": pl.String,
               "path": pl.Binary, "offset": pl.Int64, "size": pl.Int64}


@dataclass(frozen=True)
class ShardConfig:
    source: str  # the input that was scored (same keys); its bytes go into the shards
    scores: tuple[Path, ...]  # one or more `curate score` outputs over the same inputs
    out: Path  # output folder for shards and indexes
    # which keys to keep and why (policy, budget, `by` columns, label issues, seed); `seed` also orders
    # the samples across shards and seeds k-means, and `dedup` is set from the threshold below
    select: SelectConfig = field(default_factory=SelectConfig)
    # similarity threshold for near-duplicates (phash 0.75, thumbnail 0.93; set it with dedup_on); None = off
    dedup: float | None = DEFAULT_THRESHOLDS["phash"]
    # phash: perceptual hashes (copies, also mirrored and cropped) | thumbnail: 8x8 pixel layout |
    # embedding: the proxy's features (semantic, strong proxies)
    dedup_on: str = "phash"
    prototypes: int | None = None  # k-means clusters for the proto_dist score; None = off
    maps_from: int | None = None  # index into `scores` of the table whose maps ship; None: the most accurate's
    val: str | None = None  # validation source, written unpruned as the `validation` split
    val_scores: Path | None = None  # a `curate score` output over `val`: its importance maps go in too
    max_side: int | None = None  # ship images re-encoded with the longer side at most this; None: original bytes
    quality: int = 90  # JPEG quality of images re-encoded for `max_side`
    samples_per_shard: int = 1000  # target samples per shard (sizes are balanced +-1)
    shard_multiple: int = 1  # make the shard count a multiple of this (ranks x workers)
    name: str = "curated"  # dataset name in _info.json (timm: --dataset wds/NAME)
    workers: int = 2  # processes writing shards in parallel (the bytes do not depend on it)
    resume: bool = False  # continue a killed run in `out`
    overwrite: bool = False  # replace a previous run's outputs in `out`
    dry_run: bool = False  # select and report; write nothing
    report: bool = False  # also write OUT/report.html (curate/select/report.py)
    progress: bool = True  # progress bars on stderr

    def __post_init__(self) -> None:
        if not self.scores:
            raise ValueError("give at least one --scores folder")
        mode_of(self.resume, self.overwrite)
        if self.samples_per_shard < 1 or self.shard_multiple < 1:
            raise ValueError("--samples-per-shard and --shard-multiple must be >= 1")
        if self.dedup is not None and not 0.0 < self.dedup < 1.0:
            raise ValueError(f"--dedup is a similarity in (0, 1) (phash: 0.75, thumbnail: 0.93), got {self.dedup}")
        if self.max_side is not None and self.max_side < 8:
            raise ValueError(f"--max-side is the longer side in pixels (e.g. 256), got {self.max_side}")
        if not 1 <= self.quality <= 95:  # above 95 libjpeg's own docs say the files grow for nothing
            raise ValueError(f"--quality is a JPEG quality in 1..95, got {self.quality}")
        if self.dedup_on not in DEDUP_ON:
            raise ValueError(f"--dedup-on must be one of {', '.join(DEDUP_ON)}, got {self.dedup_on!r}")
        if self.maps_from is not None and not 0 <= self.maps_from < len(self.scores):
            raise ValueError(f"--maps-from is an index into the {len(self.scores)} --scores tables "
                             f"(0 to {len(self.scores) - 1}), got {self.maps_from}")
        if self.select.dedup and self.dedup is None:
            raise ValueError("select.dedup needs a threshold to group near-duplicates by: give dedup (e.g. 0.93)")
        object.__setattr__(self, "select", replace(self.select, dedup=self.dedup is not None))

    def fingerprint(self) -> dict[str, Any]:
        return jsonable({k: v for k, v in asdict(self).items() if k not in RESUME_FREE})


@dataclass
class ShardResult:
    out: Path  # the output folder
    selection: pl.DataFrame  # every input key: key, source, label, class_name, kept, reason, score
    per_class: pl.DataFrame  # label, class_name, inputs, kept
    manifest: dict[str, Any] | None  # None on a dry run
    seconds: float
    report: ReportInfo | None = None  # with `report`: what OUT/report.html holds
    weighing: list[str] = field(default_factory=list)  # one line per proxy: its weight, and why
    warnings: list[str] = field(default_factory=list)  # findings of the benchmark against the recipe here


def run_shard(cfg: ShardConfig) -> ShardResult:
    t0 = time.perf_counter()
    manifests = [table.read_manifest(d) for d in cfg.scores]
    roles = _roles(cfg, manifests)
    chosen, notes = resolve_label_issues(cfg.select, manifests[roles.lead])
    cfg = replace(cfg, select=chosen)
    maps_dir = roles.maps_dir(cfg.scores)
    extra = _embedding_extra(cfg, roles.lead) if cfg.dedup is not None or cfg.prototypes else None
    sel = select(load_scores(cfg.scores, cfg.select.by, roles.weights(), roles.lead), cfg.select, extra)
    if extra is not None and cfg.dedup is not None:  # say which image each dropped one duplicates
        sel = sel.join(extra.select("key", "dup_group"), on="key", how="left")
    per_class = per_class_counts(sel)
    # Everything that can fail on the inputs fails before --out is touched, and on a dry run too.
    items = _check_source(cfg, manifests, sel.filter(pl.col("kept")))
    warnings = notes + recipe_warnings(cfg.select, manifests[roles.lead])
    if cfg.dry_run:
        return ShardResult(cfg.out, sel, per_class, None, time.perf_counter() - t0, weighing=roles.lines(),
                           warnings=warnings)
    plan = _train_plan(cfg, sel)
    val = _validation(cfg) if cfg.val is not None else None
    with _open_out(cfg, [plan] + ([val.plan] if val is not None else [])):
        _write_parquet(cfg.out / fmt.SELECTION, sel)
        splits = {"train": _write_train(cfg, plan, sel, items, manifests, maps_dir)}
        maps = {"train": maps_dir is not None}
        if val is not None:
            splits["validation"], maps["validation"] = _write_validation(cfg, val), bool(val.maps)
        names = class_names(sel, list(val.items.values()) if val is not None else [])
        manifest = fmt.write_index(cfg.out, cfg.name, splits, maps, num_classes=len(names),
                                   extra=_manifest(cfg, sel, manifests, roles, time.perf_counter() - t0), names=names)
        report = None
        if cfg.report:
            report = write_report(roles.report_order(cfg.scores), cfg.out / REPORT, sel, maps=maps_dir)
    return ShardResult(cfg.out, sel, per_class, manifest, time.perf_counter() - t0, report, roles.lines(), warnings)


@dataclass(frozen=True)
class Roles:
    """What each scores table decided: its vote, whether label issues and embeddings come from it
    (`lead`), and whether its maps ship (`maps`)."""

    votes: list[ProxyWeight]
    lead: int
    maps: int | None

    def weights(self) -> list[float]:
        return [v.weight for v in self.votes]

    def maps_dir(self, dirs: Sequence[Path]) -> Path | None:
        return Path(dirs[self.maps]) if self.maps is not None else None

    def lines(self) -> list[str]:
        return [describe(v, self.lead, self.maps) for v in self.votes]

    def report_order(self, dirs: Sequence[Path]) -> tuple[Path, ...]:
        """The lead table first: the report reads its labels and scores from the first."""
        return (dirs[self.lead], *[d for i, d in enumerate(dirs) if i != self.lead])

    def manifest(self) -> dict[str, Any]:
        return {"proxies": [v.as_dict() for v in self.votes], "label_issues_from": self.votes[self.lead].scores,
                "maps_from": self.votes[self.maps].scores if self.maps is not None else None,
                "min_skill": MIN_SKILL}


def _roles(cfg: ShardConfig, manifests: Sequence[dict[str, Any]]) -> Roles:
    votes = weigh(cfg.scores, manifests)
    return Roles(votes, lead(votes), _maps_index(cfg, votes))


def _open_out(cfg: ShardConfig, plans: Sequence[ShardPlan]) -> RunFolder:
    """The run folder, with every file this run writes claimed before the first is written."""
    sources = [Path(p) for p in (cfg.source, cfg.val, *cfg.scores) if p is not None and Path(p).is_dir()]
    folder = RunFolder.open(cfg.out, COMMAND, mode_of(cfg.resume, cfg.overwrite), config=cfg.fingerprint(),
                            free=RESUME_FREE, sources=sources)
    folder.claim(fmt.SELECTION, fmt.INFO, fmt.MANIFEST, *(name for p in plans for name in p.filenames),
                 *((REPORT,) if cfg.report else ()))
    return folder


def class_names(sel: pl.DataFrame, val_items: Sequence[Item]) -> list[str]:
    """Class names by index, over both splits ("" for an index no input names): what a trained
    model's predictions are read with. A relabelled row's class_name is its given label's."""
    given = sel.filter(pl.col("relabelled_from").is_null() & (pl.col("label") >= 0))
    pairs = list(given.select("label", "class_name").unique().iter_rows()) + [
        (it.label, it.class_name) for it in val_items if it.label >= 0]
    count = max([int(sel["label"].max())] + [label for label, _ in pairs]) + 1
    names = [""] * count
    for label, name in sorted(pairs):
        names[label] = names[label] or (name or "")
    return names


def per_class_counts(sel: pl.DataFrame) -> pl.DataFrame:
    return (sel.group_by("label", "class_name")
            .agg(inputs=pl.len(), kept=pl.col("kept").sum(), errors=(pl.col("reason") == "error").sum(),
                 duplicates=(pl.col("reason") == "duplicate").sum(),
                 label_issues=(pl.col("reason") == "label_issue").sum())
            .sort("label"))


def _embedding_extra(cfg: ShardConfig, lead_index: int) -> pl.DataFrame:
    """Duplicate groups and prototype scores from the lead (most accurate) table's embeddings."""
    return embedding_columns(cfg.scores[lead_index], cfg.dedup, cfg.prototypes, seed=cfg.select.seed,
                             dedup_on=cfg.dedup_on)


def _check_source(cfg: ShardConfig, manifests: list[dict[str, Any]], kept: pl.DataFrame) -> pl.DataFrame:
    """The source must be the one that was scored: same keys, sources and labels (read with the
    class map the scoring used). Returns the kept inputs as columns (ITEM_SCHEMA): an Item
    object costs ~320 B, and forked shard writers that touch one copy its memory page."""
    scored = manifests[0]["config"]
    class_map = scored.get("class_map")
    items = open_source(cfg.source, Path(class_map) if class_map else None, scored.get("allow_roots", ()),
                        scored.get("max_classes", DEFAULT_MAX_CLASSES))
    digest = index_sha256(items)
    for scores_dir, m in zip(cfg.scores, manifests):
        if m["index_sha256"] != digest:
            raise ValueError(f"{cfg.source} is not the input {scores_dir} was scored on "
                             f"({m['source']}): keys, sources or labels differ")
    columns = {name: [getattr(it, name) for it in items] for name in ITEM_SCHEMA}
    columns["path"] = [os.fsencode(p) for p in columns["path"]]
    return pl.DataFrame(columns, schema=ITEM_SCHEMA).join(kept.select("key"), on="key", how="semi")


def _write_parquet(path: Path, df: pl.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)


def _train_plan(cfg: ShardConfig, sel: pl.DataFrame) -> ShardPlan:
    kept = sel.filter(pl.col("kept"))
    if kept.is_empty():
        raise ValueError("the selection keeps no sample: nothing to shard")
    return plan_shards(kept["key"].to_list(), "train", cfg.samples_per_shard, cfg.shard_multiple,
                       cfg.select.seed)


def _write_train(cfg: ShardConfig, plan: ShardPlan, sel: pl.DataFrame, items: pl.DataFrame,
                 manifests: list[dict[str, Any]], maps_dir: Path | None) -> list[fmt.ShardInfo]:
    kept = sel.filter(pl.col("kept"))
    order = pl.DataFrame({"key": [k for keys in plan.shards for k in keys]}).with_row_index("pos")
    # the label shipped as cls is the selection's (a relabelled row's suggested one)
    items = items.drop("label", "class_name").join(kept.select("key", "label", "class_name", "relabelled_from")
                                                   .with_columns(pl.col("label").cast(pl.Int64)), on="key")
    rows, score_cols = _train_rows(cfg, order, kept, items)
    proxies = [{"name": m["proxy"]["name"], "checkpoint_sha256": m["proxy"].get("checkpoint_sha256", "")[:16]}
               for m in manifests]
    # The maps go to an unnamed scratch file in OUT (O_TMPFILE where supported): a killed run
    # leaves nothing behind, and forked writers share the descriptor.
    with tempfile.TemporaryFile(dir=cfg.out) as scratch:
        maps = _map_store(maps_dir, order, scratch.fileno()) if maps_dir is not None else None
        loader = TrainSamples(plan, rows, score_cols, maps, cfg.select.by, proxies, source_root(cfg.source),
                              Shipping(cfg.max_side, cfg.quality))
        return write_split(cfg.out, plan, loader, cfg.resume, cfg.progress, cfg.workers)


def _train_rows(cfg: ShardConfig, order: pl.DataFrame, kept: pl.DataFrame,
                items: pl.DataFrame) -> tuple[pa.Table, list[str]]:
    """One row per kept key in plan order: its item columns, combined score and the `by`
    columns of every table (`{column}@{table}`); and the names of the score columns."""
    rows = order.join(kept.select("key", "score"), on="key", how="left")
    rows = rows.join(table.scan(cfg.scores[0]).select("key", "content_hash").collect(), on="key", how="left")
    score_cols = ["score"]
    for i, d in enumerate(cfg.scores):
        scan = table.scan(d)
        cols = [c for c in cfg.select.by if c in scan.collect_schema().names()]
        named = {c: f"{c}@{i}" for c in cols}
        rows = rows.join(scan.select("key", *cols).rename(named).collect(), on="key", how="left")
        score_cols += named.values()
    rows = rows.join(items, on="key", how="left").sort("pos")
    return rows.drop("pos").to_arrow(), score_cols


def _has_maps(d: Path) -> bool:
    # the grid size is written with every map: its small int column answers without reading the maps
    return bool(table.scan(d).select(pl.col("importance_h").is_not_null().any()).collect().item())


def _maps_index(cfg: ShardConfig, votes: Sequence[ProxyWeight]) -> int | None:
    """The table whose maps ship: --maps-from, else the most accurate proxy with maps (kept
    proxies first; in --scores order when no accuracy is recorded)."""
    if cfg.maps_from is not None:
        if not _has_maps(Path(cfg.scores[cfg.maps_from])):
            raise ValueError(f"--maps-from {cfg.maps_from}: {cfg.scores[cfg.maps_from]} has no importance maps "
                             "(its proxy wrote none; score with --importance cls or cam)")
        return cfg.maps_from
    return next((i for i in maps_order(votes) if _has_maps(Path(cfg.scores[i]))), None)


@dataclass(frozen=True)
class MapStore:
    """Importance maps of the kept keys in plan order, one fixed-size slot per key, in a
    scratch file: a shard reads one contiguous byte range, and memory holds only the grid
    sizes (4 bytes a key). Slots are as large as the largest map; a smaller map fills the start
    of its slot, and a key without a map has size 0x0."""

    fd: int  # scratch file, sized to slot * number of kept keys
    slot: int  # bytes per slot
    h: np.ndarray  # int16 (K,): grid height per plan position, 0 = no map
    w: np.ndarray  # int16 (K,): grid width per plan position

    def read(self, start: int, stop: int) -> list[np.ndarray | None]:
        """The maps of plan positions [start, stop), float16 [h, w] or None."""
        data = os.pread(self.fd, (stop - start) * self.slot, start * self.slot)
        if len(data) != (stop - start) * self.slot:
            # our own scratch file read back short: the disk or someone else truncated it, not the inputs
            raise OSError(f"importance scratch file is short: {len(data)} bytes for {stop - start} maps")
        out: list[np.ndarray | None] = []
        for i, (h, w) in enumerate(zip(self.h[start:stop].tolist(), self.w[start:stop].tolist())):
            at = i * self.slot
            out.append(table.importance_from_bytes(data[at:at + 2 * h * w], h, w) if h else None)
        return out


def _map_store(maps_dir: Path, order: pl.DataFrame, fd: int) -> MapStore:
    """Copy the kept keys' maps from the Parquet parts into `fd`, one part batch at a time.

    A key join on the small columns first gives every table row its plan position (-1: not
    kept); the maps themselves are then streamed without their keys, in the same row order.
    """
    parts = table.parts(maps_dir)
    index = (pl.scan_parquet(parts).select("key", "importance_h", "importance_w").with_row_index("row")
             .join(order.lazy(), on="key", how="inner").filter(pl.col("importance_h").is_not_null())
             .select("key", "row", "pos", "importance_h", "importance_w").collect())
    _check_grids(maps_dir, index)
    n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    pos_of_row = np.full(n_rows, -1, dtype=np.int64)
    pos_of_row[index["row"].to_numpy()] = index["pos"].to_numpy()
    h, w = np.zeros(len(order), np.int16), np.zeros(len(order), np.int16)
    h[index["pos"].to_numpy()] = index["importance_h"].to_numpy()
    w[index["pos"].to_numpy()] = index["importance_w"].to_numpy()
    slot = 2 * int((h.astype(np.int64) * w).max(initial=0))
    os.ftruncate(fd, slot * len(order))
    store = MapStore(fd, slot, h, w)
    _copy_maps(parts, pos_of_row, store, order["key"])
    return store


def _check_grids(maps_dir: Path, index: pl.DataFrame) -> None:
    """Grid sizes a map can have, before any space is set aside for them."""
    bad = index.filter(~pl.col("importance_h").is_between(1, table.MAX_MAP_SIDE)
                       | ~pl.col("importance_w").is_between(1, table.MAX_MAP_SIDE))
    if not bad.is_empty():
        key, h, w = bad.select("key", "importance_h", "importance_w").row(0)
        raise ValueError(f"{maps_dir}: {len(bad)} row(s) have a damaged map size, e.g. {key}: "
                         f"{table.map_problem(2 * h * w, h, w)}; score again")


def _copy_maps(parts: Sequence[Path], pos_of_row: np.ndarray, store: MapStore, keys: pl.Series) -> None:
    """Write each kept row's map bytes at its slot, reading the parts in `pos_of_row`'s order;
    a map whose bytes disagree with its grid size, or that is not finite, stops the job."""
    row = 0
    for part in parts:
        for batch in pq.ParquetFile(part).iter_batches(columns=["importance"]):
            pos = pos_of_row[row:row + len(batch)]
            take = np.flatnonzero(pos >= 0)
            for p, data in zip(pos[take].tolist(), batch.column(0).take(take).to_pylist()):
                try:
                    table.importance_from_bytes(data, int(store.h[p]), int(store.w[p]))
                except ValueError as e:
                    raise ValueError(f"{part}: {keys[p]}: {e}; score again") from e
                os.pwrite(store.fd, data, p * store.slot)
            row += len(batch)
    if row != len(pos_of_row):
        raise ValueError(f"{parts[0].parent} changed while being read: {row} rows, {len(pos_of_row)} counted")


@dataclass(frozen=True)
class Shipping:
    """Which image bytes a sample carries: the original, or (with `max_side`) a reduced JPEG."""

    max_side: int | None = None
    quality: int = 90

    def __call__(self, key: str, data: bytes) -> tuple[bytes, dict[str, Any]]:
        """(bytes to store, what the sample's json adds)."""
        if self.max_side is None:
            return data, {}
        return fmt.reduce_image(key, data, self.max_side, self.quality)


class TrainSamples:
    """`load(keys)` for the shard writer, for whole shards of `plan`: one slice of the
    plan-ordered columns and one read of the map store per shard. Columns and the store are
    read-only after fork, so writer processes share them instead of copying per-key objects."""

    def __init__(self, plan: ShardPlan, rows: pa.Table, score_cols: Sequence[str],
                 maps: MapStore | None, by: Sequence[str], proxies: list[dict[str, str]], source_root: str,
                 ship: Shipping = Shipping()):
        self.plan, self.rows, self.score_cols, self.maps = plan, rows, list(score_cols), maps
        self.by, self.proxies, self.source_root, self.ship = list(by), proxies, source_root, ship
        starts = np.cumsum([0, *(len(keys) for keys in plan.shards)]).tolist()
        self.shard_at = {keys[0]: (i, starts[i]) for i, keys in enumerate(plan.shards) if keys}

    def __call__(self, keys: Sequence[str]) -> Iterator[fmt.SampleData]:
        start = self._start(keys)
        stop = start + len(keys)
        maps = self.maps.read(start, stop) if self.maps is not None else [None] * len(keys)
        for row, grid in zip(self.rows.slice(start, len(keys)).to_pylist(), maps):
            item = Item(**{name: row[name] for name in ITEM_SCHEMA} | {"path": os.fsdecode(row["path"])})
            data = read_bytes(item)
            if content_hash(data) != row["content_hash"]:
                raise ValueError(f"{item.source} has changed since it was scored (its content hash differs): "
                                 "score the source again before sharding it")
            data, shipped = self.ship(item.key, data)
            meta = {"class_name": item.class_name, "source": relative_source(item.source, self.source_root),
                    "scores": {c: row[c] for c in self.score_cols}, "by": self.by, "proxies": self.proxies}
            if row["relabelled_from"] is not None:  # cls is cleanlab's suggestion; the given label stays on record
                meta["relabelled_from"] = row["relabelled_from"]
            yield fmt.SampleData(item.key, data, item.label, meta | shipped, grid)

    def _start(self, keys: Sequence[str]) -> int:
        """Plan position of the shard whose keys these are (the writer asks for whole shards)."""
        i, start = self.shard_at.get(keys[0], (-1, 0)) if keys else (-1, 0)
        if i < 0 or list(keys) != self.plan.shards[i]:
            raise ValueError("TrainSamples loads whole shards of its plan, in plan order")
        return start


@dataclass(frozen=True)
class Validation:
    """The validation split, planned (and checked) before anything is written."""

    items: dict[str, Item]  # every input of --val, by key
    plan: ShardPlan  # the decodable ones, unpruned
    maps: dict[str, np.ndarray]  # key -> importance map, with --val-scores; else empty


def _validation(cfg: ShardConfig) -> Validation:
    """The validation source, unpruned; files that do not decode are left out and counted.
    With `val_scores`, every sample carries its importance map (evaluation with dropped tokens)."""
    assert cfg.val is not None
    items = {it.key: it for it in open_source(cfg.val)}
    good = [k for k, it in items.items() if not it.problem and decode_image(read_bytes(it), 16).ok]
    plan = plan_shards([validation_key(k) for k in good], "validation", cfg.samples_per_shard, 1,
                       cfg.select.seed)
    maps = _validation_maps(cfg.val_scores, good) if cfg.val_scores is not None else {}
    return Validation(items, plan, maps)


def _write_validation(cfg: ShardConfig, val: Validation) -> list[fmt.ShardInfo]:
    root = source_root(cfg.val or "")
    by_shard_key = {validation_key(k): k for k in val.items}
    ship = Shipping(cfg.max_side, cfg.quality)

    def load(keys: Sequence[str]) -> Iterator[fmt.SampleData]:
        for shard_key in keys:
            key = by_shard_key[shard_key]
            it = val.items[key]
            data, shipped = ship(shard_key, read_bytes(it))
            meta = {"class_name": it.class_name, "source": relative_source(it.source, root), "source_key": key}
            yield fmt.SampleData(shard_key, data, it.label, meta | shipped, val.maps.get(key))

    return write_split(cfg.out, val.plan, load, cfg.resume, cfg.progress, cfg.workers)


def validation_key(key: str) -> str:
    """The validation split's sample key: `val-` + the source's key, so that no key is in both
    splits (train/ring/ring_00085.JPEG and val/ring/ring_00085.JPEG share a source key)."""
    return sanitize_key(f"val-{key}")


def _validation_maps(scores: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """key -> importance grid from a score table over the validation source (held in memory:
    validation sets are small). Every decodable key must have one."""
    rows = (table.scan(scores)
            .filter(pl.col("importance").is_not_null())
            .select("key", "importance", "importance_h", "importance_w").collect())
    maps = {k: table.importance_from_bytes(b, h, w) for k, b, h, w in rows.iter_rows()}
    missing = [k for k in keys if k not in maps]
    if missing:
        raise ValueError(f"{scores}: no importance map for {len(missing)} validation key(s), e.g. {missing[:3]}; "
                         f"score the validation source with a proxy that makes maps")
    return maps


def _manifest(cfg: ShardConfig, sel: pl.DataFrame, manifests: list[dict[str, Any]], roles: Roles, seconds: float
              ) -> dict[str, Any]:
    """What made the shards, beside the format's own fields (`fmt.write_index` adds those)."""
    reasons = dict(sel.group_by("reason").len().iter_rows())
    return {
        "selection_sha256": selection_hash(sel),
        "counts": {"inputs": len(sel), "kept": int(sel["kept"].sum()), **{str(k): int(v) for k, v in reasons.items()},
                   "dup_label_conflict": int(sel["dup_label_conflict"].sum())},
        "scores": [{"dir": str(d), "proxy": m["proxy"]["name"], "index_sha256": m["index_sha256"],
                    "checkpoint_sha256": m["proxy"].get("checkpoint_sha256", "")}
                   for d, m in zip(cfg.scores, manifests)],
        "weighing": roles.manifest(),
        "images": {"max_side": cfg.max_side, "quality": cfg.quality if cfg.max_side else None},
        "config": cfg.fingerprint(),
        "seconds": seconds,
        "versions": versions(),
    }
