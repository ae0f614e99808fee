"""`curate shard` as a library call: scores -> selection -> WebDataset shards + indexes.

OUT/selection.parquet holds every input key with kept yes/no and the reason; the shards hold the
kept samples with their original bytes, label, scores and importance map; `_info.json` lets timm
read them unchanged and `manifest.json` records what made them (see curate/shards.py).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import polars as pl

from curate import shards, table
from curate.decode import decode_image
from curate.embeddings import embedding_columns
from curate.jobs import index_sha256, versions
from curate.select import SelectConfig, load_scores, select, selection_hash
from curate.sources import Item, open_source, read_bytes

OUTPUTS = ("*.tar", ".*.tmp", "_info.json", "manifest.json", "selection.parquet", "config.json")
RESUME_FREE = ("resume", "overwrite", "dry_run", "progress", "workers")


@dataclass(frozen=True)
class ShardConfig:
    source: str  # the input that was scored (same keys); its bytes go into the shards
    scores: tuple[Path, ...]  # one or more `curate score` outputs over the same inputs
    out: Path  # output folder for shards and indexes
    keep: float | int = 0.7  # fraction (0, 1] of the candidates, or a count
    by: tuple[str, ...] = ("el2n",)  # score column(s) to rank by; several are rank-averaged
    policy: str = "ccs"  # hard | easy | ccs | random (see curate/select.py)
    beta: float = 0.1  # ccs: hardest fraction dropped first (mislabelled examples live there)
    strata: int = 50  # ccs: score bins sampled evenly
    class_balanced: bool = False  # apply the keep fraction per class
    min_per_class: int = 0  # keep at least this many per class
    dedup: float | None = None  # cosine threshold for near-duplicates (e.g. 0.95); None = off
    dedup_on: str = "thumbnail"  # thumbnail: pixel layout (any proxy) | embedding: semantic (strong proxies)
    prototypes: int | None = None  # k-means clusters for the proto_dist score; None = off
    val: str | None = None  # validation source, written unpruned as the `validation` split
    samples_per_shard: int = 1000  # target samples per shard (sizes are balanced +-1)
    shard_multiple: int = 1  # make the shard count a multiple of this (ranks x workers)
    name: str = "curated"  # dataset name in _info.json (timm: --dataset wds/NAME)
    seed: int = 0  # random policy and the sample order across shards
    workers: int = 2  # processes writing shards in parallel (the bytes do not depend on it)
    resume: bool = False  # continue a killed run in `out`
    overwrite: bool = False  # replace a previous run's outputs in `out`
    dry_run: bool = False  # select and report; write nothing
    progress: bool = True  # progress bars on stderr

    def __post_init__(self) -> None:
        if not self.scores:
            raise ValueError("give at least one --scores folder")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.samples_per_shard < 1 or self.shard_multiple < 1:
            raise ValueError("--samples-per-shard and --shard-multiple must be >= 1")
        if self.dedup is not None and not 0.0 < self.dedup < 1.0:
            raise ValueError(f"--dedup is a cosine similarity in (0, 1), got {self.dedup}")
        if self.dedup_on not in ("thumbnail", "embedding"):
            raise ValueError(f"--dedup-on must be thumbnail or embedding, got {self.dedup_on!r}")

    def select_config(self) -> SelectConfig:
        return SelectConfig(keep=self.keep, by=self.by, policy=self.policy, beta=self.beta,
                            strata=self.strata, class_balanced=self.class_balanced,
                            min_per_class=self.min_per_class, dedup=self.dedup is not None, seed=self.seed)

    def fingerprint(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in RESUME_FREE}
        return json.loads(json.dumps(d, default=str))


@dataclass
class ShardResult:
    out: Path  # the output folder
    selection: pl.DataFrame  # every input key: key, label, class_name, kept, reason, score
    per_class: pl.DataFrame  # label, class_name, inputs, kept
    manifest: dict[str, Any] | None  # None on a dry run
    seconds: float


def run_shard(cfg: ShardConfig) -> ShardResult:
    t0 = time.perf_counter()
    sel_cfg = cfg.select_config()
    manifests = [_scores_manifest(d) for d in cfg.scores]
    extra = _embedding_extra(cfg) if cfg.dedup is not None or cfg.prototypes else None
    sel = select(load_scores(cfg.scores, sel_cfg.by), sel_cfg, extra)
    if extra is not None and cfg.dedup is not None:  # say which image each dropped one duplicates
        sel = sel.join(extra.select("key", "dup_group"), on="key", how="left")
    per_class = per_class_counts(sel)
    if cfg.dry_run:
        return ShardResult(cfg.out, sel, per_class, None, time.perf_counter() - t0)
    items = _check_source(cfg, manifests)
    _prepare_out(cfg)
    _write_parquet(cfg.out / "selection.parquet", sel)
    maps = _importance_table(cfg.scores)
    splits = {"train": _write_train(cfg, sel, items, manifests, maps)}
    if cfg.val is not None:
        splits["validation"] = _write_validation(cfg)
    table.write_json(cfg.out / "_info.json", shards.info_json(cfg.name, splits))
    manifest = _manifest(cfg, sel, manifests, splits, maps is not None, time.perf_counter() - t0)
    table.write_json(cfg.out / "manifest.json", manifest)
    return ShardResult(cfg.out, sel, per_class, manifest, time.perf_counter() - t0)


def per_class_counts(sel: pl.DataFrame) -> pl.DataFrame:
    return (sel.group_by("label", "class_name")
            .agg(inputs=pl.len(), kept=pl.col("kept").sum(), errors=(pl.col("reason") == "error").sum(),
                 duplicates=(pl.col("reason") == "duplicate").sum())
            .sort("label"))


def _scores_manifest(scores_dir: Path) -> dict[str, Any]:
    path = scores_dir / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{scores_dir} has no manifest.json: is it a finished `curate score` output?")
    return json.loads(path.read_text())


def _embedding_extra(cfg: ShardConfig) -> pl.DataFrame:
    """Duplicate groups and prototype scores from the first table's embeddings."""
    return embedding_columns(cfg.scores[0], cfg.dedup, cfg.prototypes, seed=cfg.seed, dedup_on=cfg.dedup_on)


def _check_source(cfg: ShardConfig, manifests: list[dict[str, Any]]) -> dict[str, Item]:
    """The source must be the one that was scored: same keys, sources and labels (read with the
    class map the scoring used)."""
    class_map = manifests[0]["config"].get("class_map")
    items = open_source(cfg.source, Path(class_map) if class_map else None)
    digest = index_sha256(items)
    for scores_dir, m in zip(cfg.scores, manifests):
        if m["index_sha256"] != digest:
            raise ValueError(f"{cfg.source} is not the input {scores_dir} was scored on "
                             f"({m['source']}): keys, sources or labels differ")
    return {it.key: it for it in items}


def _prepare_out(cfg: ShardConfig) -> None:
    out, fingerprint = cfg.out, cfg.fingerprint()
    if out.exists() and any(out.iterdir()):
        if cfg.overwrite:
            for pattern in OUTPUTS:
                for path in out.glob(pattern):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif not cfg.resume:
            raise FileExistsError(f"{out} is not empty: pass --resume to continue that run or --overwrite")
        elif not (out / "config.json").exists() or \
                json.loads((out / "config.json").read_text()) != fingerprint:
            raise ValueError(f"cannot resume in {out}: it holds a run with other settings; use --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    table.write_json(out / "config.json", fingerprint)


def _write_parquet(path: Path, df: pl.DataFrame) -> None:
    with table.atomic_path(path) as tmp:
        df.write_parquet(tmp)


def _write_train(cfg: ShardConfig, sel: pl.DataFrame, items: dict[str, Item],
                 manifests: list[dict[str, Any]], maps: pl.DataFrame | None) -> list[shards.ShardInfo]:
    kept = sel.filter(pl.col("kept"))
    if kept.is_empty():
        raise ValueError("the selection keeps no sample: nothing to shard")
    plan = shards.plan_shards(kept["key"].to_list(), "train", cfg.name, cfg.samples_per_shard,
                              cfg.shard_multiple, cfg.seed)
    sidecar = _sidecar_frame(cfg, kept, maps)
    proxies = [{"name": m["proxy"]["name"], "checkpoint_sha256": m["proxy"].get("checkpoint_sha256", "")[:16]}
               for m in manifests]
    loader = TrainSamples(items, sidecar, cfg.by, proxies)
    return shards.write_split(cfg.out, plan, loader, cfg.resume, cfg.progress, cfg.workers)


def _sidecar_frame(cfg: ShardConfig, kept: pl.DataFrame, maps: pl.DataFrame | None) -> pl.DataFrame:
    """Per kept key: combined score, the `by` columns and the importance map."""
    keys = kept.select("key", "score")
    for i, d in enumerate(cfg.scores):
        cols = [c for c in cfg.by if c in pl.scan_parquet(d / table.PART_GLOB).collect_schema().names()]
        part = pl.scan_parquet(d / table.PART_GLOB).select("key", *cols).rename({c: f"{c}@{i}" for c in cols})
        keys = keys.join(part.collect(), on="key", how="left")
    return keys.join(maps, on="key", how="left") if maps is not None else keys


def _importance_table(dirs: Sequence[Path]) -> pl.DataFrame | None:
    """The importance columns of the first table that has maps (e.g. the ViT proxy's)."""
    for d in dirs:
        lf = pl.scan_parquet(d / table.PART_GLOB).select("key", "importance", "importance_h", "importance_w")
        maps = lf.filter(pl.col("importance").is_not_null()).collect()
        if not maps.is_empty():
            return maps
    return None


class TrainSamples:
    """`load(keys)` for the shard writer: bytes from the source, the rest from the tables."""

    def __init__(self, items: dict[str, Item], sidecar: pl.DataFrame, by: Sequence[str],
                 proxies: list[dict[str, str]]):
        self.items, self.by, self.proxies = items, list(by), proxies
        self.rows = {r["key"]: r for r in sidecar.iter_rows(named=True)}

    def __call__(self, keys: Sequence[str]) -> Iterator[shards.SampleData]:
        for key in keys:
            item, row = self.items[key], self.rows[key]
            scores = {k: v for k, v in row.items() if "@" in k or k == "score"}
            meta = {"class_name": item.class_name, "source": item.source, "scores": scores,
                    "by": self.by, "proxies": self.proxies}
            yield shards.SampleData(key, read_bytes(item), item.label, meta, _importance(row))


def _importance(row: dict[str, Any]) -> np.ndarray | None:
    if row.get("importance") is None:
        return None
    return table.importance_from_bytes(row["importance"], row["importance_h"], row["importance_w"])


def _write_validation(cfg: ShardConfig) -> list[shards.ShardInfo]:
    """The validation source, unpruned; files that do not decode are left out and counted."""
    assert cfg.val is not None
    items = {it.key: it for it in open_source(cfg.val)}
    good = [k for k, it in items.items() if decode_image(read_bytes(it), 16).ok]
    plan = shards.plan_shards(good, "validation", cfg.name, cfg.samples_per_shard, 1, cfg.seed)

    def load(keys: Sequence[str]) -> Iterator[shards.SampleData]:
        for key in keys:
            it = items[key]
            yield shards.SampleData(key, read_bytes(it), it.label,
                                    {"class_name": it.class_name, "source": it.source}, None)

    return shards.write_split(cfg.out, plan, load, cfg.resume, cfg.progress, cfg.workers)


def _manifest(cfg: ShardConfig, sel: pl.DataFrame, manifests: list[dict[str, Any]],
              splits: dict[str, list[shards.ShardInfo]], has_maps: bool, seconds: float) -> dict[str, Any]:
    reasons = dict(sel.group_by("reason").len().iter_rows())
    return {
        **shards.shard_manifest(splits, {"train": has_maps, "validation": False}),
        "selection_sha256": selection_hash(sel),
        "counts": {"inputs": len(sel), "kept": int(sel["kept"].sum()), **{str(k): int(v) for k, v in reasons.items()}},
        "scores": [{"dir": str(d), "proxy": m["proxy"]["name"], "index_sha256": m["index_sha256"],
                    "checkpoint_sha256": m["proxy"].get("checkpoint_sha256", "")}
                   for d, m in zip(cfg.scores, manifests)],
        "config": cfg.fingerprint(),
        "seconds": seconds,
        "versions": versions(),
    }
