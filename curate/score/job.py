"""`curate score` as a library call: index -> proxy -> scores parts -> manifest.

Work is cut into parts of `chunk_size` inputs in index order. A part file that exists is complete
(written under a temporary name, then renamed), so a killed job resumes by skipping those parts.

Under torchrun every rank runs `run_score` (see `curate.common.dist`); parts are the unit of work there
too. Rank 0 prepares `out`, trains the proxy if asked, lists the missing parts and deals them out
round-robin; each rank scores and writes its own parts under the same global names a single
process would use, so the table, resume and `scan_parquet` do not depend on the number of ranks.
"""
from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import polars as pl
import torch

from curate.common.atomic import file_sha256, jsonable, write_json
from curate.common.dist import Dist, session
from curate.common.runfolder import RunFolder, mode_of
from curate.common.runtime import rank_device, save_weights, versions
from curate.ingest.decode import DEFAULT_MAX_PIXELS
from curate.ingest.limits import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, class_count_fault
from curate.ingest.sources import DEFAULT_MAX_CLASSES, Item, index_sha256, open_source, read_bytes
from curate.score import label_issues, probe, table
from curate.score.folds import FoldTraining, HeldOut, check_folds, fold_files, train_fold_proxies
from curate.score.proxies import ProxyModel, Recipe, check_input_size, create_model, load_checkpoint, resolve_recipe
from curate.score.proxy_training import Dynamics, TrainSetup, dynamics_skip, train_proxy
from curate.score.rows import PartsSpec, Scorer, score_parts

COMMAND = "score"
# Config fields that may change between a run and its resume without changing any result.
# label_filter too: the label pass runs again at the end of every run, so a resume may change it.
RESUME_FREE = ("resume", "overwrite", "workers", "progress", "distributed", "label_filter")
MODEL = "proxy/model.pt"
PROBE_FOLDS = 5  # cleanlab's recipe: 5-fold cross-validation
TRAIN_STATE = "proxy/train-state.pt"


@dataclass(frozen=True)
class ScoreConfig:
    source: str  # ImageFolder root, WebDataset shards (dir, .tar, glob, brace) or a CSV/Parquet list
    out: Path  # output folder: part-*.parquet, manifest.json, config.json, proxy/
    # recipe name (see `curate proxies`) or any timm model name; None: trained here, the recipe that fits
    # the images' size; given weights, demo-vit (the architecture of a checkpoint cannot be guessed)
    proxy: str | None = None
    checkpoint: Path | None = None  # weights to load (torch.load, weights_only=True)
    pretrained: bool = False  # timm hub weights (needs network access)
    train_epochs: int | None = None  # train the proxy here for N epochs (early-dynamics scores)
    folds: int = 1  # K > 1: K more proxies, each trained without one fold, score it out of sample
    probe: bool = False  # label issues from K-fold linear probes on the given model's embeddings (K = 5 if 1)
    label_filter: str = label_issues.DEFAULT_FILTER  # cleanlab's filter_by for `label_issue`
    image_size: int | None = None  # proxy input side; default: the recipe's
    batch_size: int = 256  # inference batch
    workers: int = 2  # DataLoader decode workers
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # model init, training order and augmentation
    chunk_size: int = 4096  # inputs per Parquet part (the unit of resume)
    importance: str = "auto"  # cls: a ViT's CLS->patch attention | rollout | cam: a CNN's class activation map
    importance_blocks: tuple[int, ...] | None = None  # blocks averaged for `cls`; default: the recipe's
    class_map: Path | None = None  # text file, one class name per line, line = class index
    allow_roots: tuple[Path, ...] = ()  # folders a list file may name files in, besides its own
    max_classes: int = DEFAULT_MAX_CLASSES  # labels must be below this (a bigger one is a data error)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard
    resume: bool = False  # continue a killed run in `out`
    overwrite: bool = False  # replace a previous run's outputs in `out` (only files it wrote)
    progress: bool = True  # progress bars on stderr
    distributed: bool = False  # require a torchrun launch (one with WORLD_SIZE > 1 is distributed anyway)

    def __post_init__(self) -> None:
        modes = [self.checkpoint is not None, self.pretrained, self.train_epochs is not None]
        if sum(modes) != 1:
            raise ValueError("give exactly one of --checkpoint, --pretrained, --train-epochs")
        if self.train_epochs is not None and self.train_epochs < 1:
            raise ValueError(f"--train-epochs must be >= 1, got {self.train_epochs}")
        if self.probe and self.train_epochs is not None:
            raise ValueError("--probe fits linear classifiers on a frozen model's embeddings: give --checkpoint or "
                             "--pretrained (a proxy trained here has seen these labels; use --folds K for it)")
        if self.probe and self.folds == 1:
            object.__setattr__(self, "folds", PROBE_FOLDS)
        if self.folds < 1 or (self.folds > 1 and self.train_epochs is None and not self.probe):
            raise ValueError(f"--folds must be >= 1, and K > 1 trains K proxies here: it needs --train-epochs "
                             f"or --probe (got --folds {self.folds})")
        mode_of(self.resume, self.overwrite)
        if self.label_filter not in label_issues.FILTERS:
            raise ValueError(f"--label-filter must be one of {', '.join(label_issues.FILTERS)}, "
                             f"got {self.label_filter!r}")
        if self.importance not in table.IMPORTANCE_METHODS:
            raise ValueError(f"--importance must be one of {', '.join(table.IMPORTANCE_METHODS)}, "
                             f"got {self.importance!r}")
        if min(self.batch_size, self.chunk_size) < 1 or self.workers < 0:
            raise ValueError("batch size and chunk size must be >= 1, workers >= 0")
        if self.max_classes < 2 or self.max_pixels < 1:
            raise ValueError("--max-classes must be >= 2 and --max-pixels >= 1")
        if self.image_size is not None and not MIN_IMAGE_SIDE <= self.image_size <= MAX_IMAGE_SIDE:
            raise ValueError(f"--image-size must be from {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels, "
                             f"got {self.image_size}")
        object.__setattr__(self, "allow_roots", tuple(Path(r) for r in self.allow_roots))

    def fingerprint(self) -> dict[str, Any]:
        """What must be equal for a resume to continue the same run."""
        return jsonable({k: v for k, v in asdict(self).items() if k not in RESUME_FREE})


@dataclass
class ScoreResult:
    manifest: dict[str, Any]
    parts_written: int  # in this invocation, by all ranks (0 when everything was already done)
    timing: dict[str, float] = field(default_factory=dict)
    is_main: bool = True  # rank 0 (or a single process): the one that reports


@dataclass(frozen=True)
class _Run:
    """What the steps of one run share, on one rank."""

    cfg: ScoreConfig
    items: Sequence[Item]
    recipe: Recipe
    device: torch.device
    group: Dist


def run_score(cfg: ScoreConfig) -> ScoreResult:
    """Score `cfg.source` into `cfg.out`, as one process or as every rank of a torchrun launch."""
    with session(required=cfg.distributed) as group:
        return _run_score(cfg, group)


def _run_score(cfg: ScoreConfig, group: Dist) -> ScoreResult:
    t0 = time.perf_counter()
    cfg = cfg if group.is_main else replace(cfg, progress=False)  # one set of bars per job
    # Everything that can fail on the user's input fails here, before --out is touched.
    items = open_source(cfg.source, cfg.class_map, cfg.allow_roots, cfg.max_classes)
    check_folds([it.label for it in items if not it.problem], [it.class_name for it in items if not it.problem],
                cfg.folds)
    _check_same_index(group, items)
    chosen = {}
    if cfg.proxy is None:  # a pure function of the index: every rank and every resume picks the same
        name, why = default_proxy(items, cfg.max_pixels) if cfg.train_epochs else (
            GIVEN_WEIGHTS_PROXY, "default for given weights (name their architecture with --proxy)")
        cfg, chosen = replace(cfg, proxy=name), {"chosen_by": why}
    device = rank_device(cfg.device, group)
    run = _Run(cfg, items, resolve_recipe(cfg.proxy, cfg.image_size), device, group)
    model, given = _make_model(run)
    folder = group.main_only(lambda: open_out(cfg, items))
    try:
        held_out, folds = _fold_proxies(run)  # first: rank 0 has the full one to train
        dyn, trained = _train_here(run, model)
        proxy = ProxyModel(model, cfg.importance, cfg.importance_blocks or run.recipe.importance_blocks,
                           run.recipe.img_size, run.recipe.flip_tta).to(device)
        # The proxy's manifest record, in the order a reader meets it: what it is, its weights, how it scores.
        record = chosen | given | folds | trained | {"importance": proxy.record()}
        t_train = time.perf_counter()
        parts = group.from_main(lambda: missing_parts(cfg.out, len(items), cfg.chunk_size))
        summary = dyn.summary(dynamics_skip(run.recipe)) if dyn is not None else None
        work = score_parts(_parts_spec(run, record["weights"]), items, Scorer(proxy, summary, held_out),
                           parts[group.rank::group.world_size])
        t_scored = time.perf_counter()
        ranks = group.all_gather({"rank": group.rank, **work})  # also: every part is written
        if cfg.probe:
            record |= {"probe": group.from_main(lambda: probe.fit_parts(table.parts(cfg.out), cfg.folds, cfg.seed))}
        labels = group.from_main(lambda: label_issues.annotate(table.parts(cfg.out), cfg.label_filter))
        t_end = time.perf_counter()
        timing = {"index_and_train_s": t_train - t0, "score_s": t_scored - t_train,
                  "label_issues_s": t_end - t_scored, "total_s": t_end - t0}
        per_rank = group.all_gather(timing)
        ranks = [r | {"timing": t} for r, t in zip(ranks, per_rank)]
        timing = merge_timing(per_rank)
        record |= {"label_issues": labels}
        manifest = group.from_main(lambda: _write_manifest(cfg, items, record, timing, ranks))
    finally:
        if folder is not None:
            folder.close()
    return ScoreResult(manifest, sum(r["parts_written"] for r in ranks), timing, group.is_main)


GIVEN_WEIGHTS_PROXY = "demo-vit"  # --checkpoint / --pretrained without --proxy, as before recipes were chosen
# Images whose median side is at most this get the small-image recipe at 32 px.
SMALL_IMAGE_SIDE = 64
SIZE_SAMPLE = 64  # images whose headers are read to tell the size


def default_proxy(items: Sequence[Item], max_pixels: int) -> tuple[str, str]:
    """The recipe for these images when none is named, and why: airbench for small images (it
    learns CIFAR-10 at 32 px where demo-vit learns 30% of it), imagenet-vit for larger ones."""
    step = max(1, len(items) // SIZE_SAMPLE)
    sides = [side for it in items[::step][:SIZE_SAMPLE] if (side := _long_side(it, max_pixels))]
    if not sides:
        return "airbench", "no readable image among the first sampled: the small-image recipe"
    median = sorted(sides)[len(sides) // 2]
    if median <= SMALL_IMAGE_SIDE:
        return "airbench", f"median image side {median} px <= {SMALL_IMAGE_SIDE}: the small-image recipe"
    return "imagenet-vit", f"median image side {median} px > {SMALL_IMAGE_SIDE}: the ImageNet-size recipe"


def _long_side(item: Item, max_pixels: int) -> int:
    """The longer side from the image's header (nothing decoded), or 0 when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(read_bytes(item))) as im:
            w, h = im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0
    return max(w, h) if w * h <= max_pixels else 0


def missing_parts(out: Path, n_items: int, chunk_size: int) -> list[int]:
    """Indices of the parts not yet on disk, ascending. Listed once, by rank 0, and shared: a rank
    listing `out` itself could already see parts that another rank has just written."""
    done = table.done_parts(out)
    for i in sorted(done):
        if (version := table.read_schema_version(table.part_path(out, i))) != table.SCHEMA_VERSION:
            raise table.SchemaError(f"{table.part_path(out, i)} was written by another version of curate (scores "
                                    f"schema {version}): a resumed table must be one version; score again with "
                                    "--overwrite")
    return sorted(set(range(_num_parts(n_items, chunk_size))) - done)


def _num_parts(n_items: int, chunk_size: int) -> int:
    return -(-n_items // chunk_size)


def merge_timing(per_rank: Sequence[dict[str, float]]) -> dict[str, float]:
    """The job's phases take as long as its slowest rank's."""
    return {k: max(t[k] for t in per_rank) for k in per_rank[0]}


def _check_same_index(group: Dist, items: Sequence[Item]) -> None:
    """Every rank indexes SOURCE itself; parts are index ranges, so all must see the same list."""
    hashes = group.all_gather(index_sha256(items))
    if len(set(hashes)) > 1:
        raise ValueError(f"ranks indexed different inputs (index sha256 per rank: {hashes}): SOURCE must "
                         "be the same files, on a shared file system, for every rank")


def open_out(cfg: ScoreConfig, items: Sequence[Item]) -> RunFolder:
    """The run folder, with every file this run may write claimed up front (parts, proxy,
    manifest): a killed run owns what it left behind, and --overwrite removes exactly that."""
    source = Path(cfg.source)
    folder = RunFolder.open(cfg.out, COMMAND, mode_of(cfg.resume, cfg.overwrite),
                            config={**cfg.fingerprint(), "index_sha256": index_sha256(items)},
                            free=RESUME_FREE, sources=[source] if source.is_dir() else [])
    names = [table.part_path(Path(), i).as_posix() for i in range(_num_parts(len(items), cfg.chunk_size))]
    fold_proxies = cfg.folds if cfg.folds > 1 and cfg.train_epochs else 0
    proxy_files = [*((MODEL, TRAIN_STATE) if cfg.train_epochs else ()),
                   *(name for f in range(fold_proxies) for name in fold_files(f))]
    folder.claim(table.MANIFEST, *names, *proxy_files)
    for name in proxy_files:
        (cfg.out / name).parent.mkdir(parents=True, exist_ok=True)
    return folder


def num_classes(items: Sequence[Item], max_classes: int = DEFAULT_MAX_CLASSES) -> int:
    """The proxy's head size: labels are class indices 0..C-1 (-1: unknown)."""
    n = max((it.label for it in items), default=-1) + 1
    if fault := class_count_fault(n, "the inputs' largest label + 1 =", max_classes):
        raise ValueError(f"need labelled inputs from at least 2 classes to score with a proxy ({fault})")
    return n


def _make_model(run: _Run) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The proxy model with its given weights (none yet when it is trained here), and what the
    manifest says about it so far. Writes nothing: a wrong model name or checkpoint fails here."""
    cfg, recipe = run.cfg, run.recipe

    def create() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)  # same initial weights on every run, resume and rank
        # Hub weights keep their own head (labels must be in its class space); otherwise one per class.
        return create_model(recipe, None if cfg.pretrained else num_classes(run.items, cfg.max_classes),
                            cfg.pretrained)

    model = run.group.main_first(create)  # rank 0 fills the hub cache; the others read it, no download race
    check_input_size(model, recipe)
    record: dict[str, Any] = {"name": cfg.proxy, "model": recipe.model, "recipe": asdict(recipe)}
    if cfg.checkpoint is not None:
        record |= {"weights": "checkpoint", "checkpoint": str(cfg.checkpoint),
                   "checkpoint_sha256": load_checkpoint(model, cfg.checkpoint)}
    elif cfg.pretrained:
        record |= {"weights": "pretrained", "pretrained_tag": model.pretrained_cfg.get("tag", "")}
    return model, record


def _train_here(run: _Run, model: torch.nn.Module) -> tuple[Dynamics | None, dict[str, Any]]:
    """With --train-epochs: train the proxy on rank 0 alone, exactly as a single process would;
    the other ranks then load it. Returns the dynamics and the record of the trained weights.

    Not DDP: a proxy trained data-parallel sees other batches and learning-rate steps, so its
    scores would depend on the number of ranks. Here rank 0 trains (same seed, order and batches
    as one process) while the others wait; every epoch then sits in proxy/train-state.pt with the
    per-epoch dynamics, and the other ranks go through `train_proxy`'s own resume path, which finds
    all epochs done and only loads weights and dynamics. Training is not parallelised; scoring is.
    Rank 0 alone writes proxy/model.pt (temp-then-rename), and every rank waits for it before
    hashing it.
    """
    cfg, recipe = run.cfg, run.recipe
    if cfg.train_epochs is None:
        return None, {}
    setup = TrainSetup(cfg.train_epochs, recipe.batch_size, cfg.workers, run.device, cfg.seed,
                       cfg.out / TRAIN_STATE, name=cfg.proxy)
    dyn = run.group.main_first(lambda: train_proxy(model, run.items, recipe, setup, progress=cfg.progress))
    weights = cfg.out / MODEL
    run.group.main_only(lambda: save_weights(model.state_dict(), weights))
    return dyn, {"weights": "trained", "checkpoint": str(weights), "checkpoint_sha256": file_sha256(weights),
                 "training": {"epochs": cfg.train_epochs, "lr": recipe.lr, "batch_size": recipe.batch_size,
                              "weight_decay": recipe.weight_decay, "seed": cfg.seed,
                              "warmup_epochs": recipe.warmup_epochs,
                              "dynamics_from_epoch": dynamics_skip(recipe), "history": dyn.history()}}


def _fold_proxies(run: _Run) -> tuple[HeldOut | None, dict[str, Any]]:
    """With --folds K > 1: the K fold proxies and their record; nothing otherwise."""
    cfg = run.cfg
    if cfg.folds < 2 or cfg.probe:
        return None, {}
    assert cfg.train_epochs is not None
    plan = FoldTraining(cfg.folds, cfg.train_epochs, cfg.seed, num_classes(run.items, cfg.max_classes),
                        cfg.workers, cfg.out, cfg.proxy, cfg.progress)
    held_out, record = train_fold_proxies(plan, run.recipe, run.items, run.device, run.group)
    return held_out, {"folds": record}


def _parts_spec(run: _Run, weights: str) -> PartsSpec:
    cfg = run.cfg
    return PartsSpec(cfg.out, cfg.chunk_size, cfg.batch_size, run.recipe.img_size, cfg.workers, cfg.max_pixels,
                     {"proxy": cfg.proxy, "weights": weights, "folds": str(cfg.folds)}, cfg.progress)


def _write_manifest(cfg: ScoreConfig, items: Sequence[Item], proxy: dict[str, Any],
                    timing: dict[str, float], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's record, written once (by rank 0, after every rank has written its parts); counts
    come from the whole table, so they include parts written before a resume; `ranks` holds what
    each rank wrote in this invocation and how long it took."""
    by_status = _table_counts(cfg.out, len(items))
    written = sum(r["rows_written"] for r in ranks)
    manifest = {
        "schema_version": table.SCHEMA_VERSION,
        "source": cfg.source,
        "proxy": proxy,
        "seed": cfg.seed,
        "index_sha256": index_sha256(items),
        "counts": {"inputs": len(items), "ok": by_status.get("ok", 0), "error": by_status.get("error", 0),
                   "classes": len({it.label for it in items})},
        # this invocation's: after a resume that found every part written, there is no rate to give
        "timing": timing | {"images_per_s": (written / max(timing["score_s"], 1e-9)) if written else None},
        "ranks": ranks,
        "config": cfg.fingerprint(),
        "versions": versions(),
    }
    write_json(cfg.out / table.MANIFEST, manifest)
    return manifest


def _table_counts(out: Path, n_items: int) -> dict[str, int]:
    """Rows per status; checks the table has every input exactly once (no part lost or doubled)."""
    scan = table.scan(out)
    rows, keys = scan.select(pl.len(), pl.col("key").n_unique()).collect().row(0)
    if rows != n_items or keys != n_items:
        raise ValueError(f"{out}: the table has {rows} rows and {keys} distinct keys for {n_items} inputs: a part "
                         "was changed by something else during the run; score again with --overwrite")
    counts = scan.group_by("status").len().collect()
    return dict(zip(counts["status"].to_list(), counts["len"].to_list()))
