"""`curate score` as a library call: index -> proxy -> scores parts -> manifest.

Work is cut into parts of `chunk_size` inputs in index order. A part file that exists is complete
(written under a temporary name, then renamed), so a killed job resumes by skipping those parts.

Under torchrun every rank runs `run_score` (see `curate.common.dist`); parts are the unit of work there
too. Rank 0 prepares `out`, trains the proxy if asked, lists the missing parts and deals them out
round-robin; each rank scores and writes its own parts under the same global names a single
process would use, so the table, resume and `scan_parquet` do not depend on the number of ranks.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from tqdm import tqdm

from curate.common.atomic import file_sha256, jsonable, write_json
from curate.common.dist import Dist, session
from curate.common.runfolder import RunFolder, mode_of
from curate.common.runtime import load_weights, rank_device, save_weights, versions
from curate.ingest.decode import DEFAULT_MAX_PIXELS
from curate.ingest.limits import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
from curate.ingest.sources import DEFAULT_MAX_CLASSES, Item, index_sha256, open_source
from curate.score import label_issues, metrics, table
from curate.score.folds import assign_folds, check_folds
from curate.score.loader import DecodedItems, Meta, chunk_batches, make_loader
from curate.score.proxies import ProxyModel, Recipe, create_model, load_checkpoint, resolve_recipe
from curate.score.proxy_training import Dynamics, TrainSetup, train_proxy

COMMAND = "score"
# Config fields that may change between a run and its resume without changing any result.
# label_filter too: the label pass runs again at the end of every run, so a resume may change it.
RESUME_FREE = ("resume", "overwrite", "workers", "progress", "distributed", "label_filter")
MODEL = "proxy/model.pt"
TRAIN_STATE = "proxy/train-state.pt"


def fold_files(fold: int) -> tuple[str, str]:
    """(weights, training state) of the proxy trained without fold `fold`."""
    return f"proxy/fold-{fold}/model.pt", f"proxy/fold-{fold}/train-state.pt"


@dataclass(frozen=True)
class ScoreConfig:
    source: str  # ImageFolder root, WebDataset shards (dir, .tar, glob, brace) or a CSV/Parquet list
    out: Path  # output folder: part-*.parquet, manifest.json, config.json, proxy/
    proxy: str = "demo-vit"  # recipe name (see `curate proxies`) or any timm model name
    checkpoint: Path | None = None  # weights to load (torch.load, weights_only=True)
    pretrained: bool = False  # timm hub weights (needs network access)
    train_epochs: int | None = None  # train the proxy here for N epochs (early-dynamics scores)
    folds: int = 1  # K > 1: K more proxies, each trained without one fold, score it out of sample
    label_filter: str = label_issues.DEFAULT_FILTER  # cleanlab's filter_by for `label_issue`
    image_size: int | None = None  # proxy input side; default: the recipe's
    batch_size: int = 256  # inference batch
    workers: int = 2  # DataLoader decode workers
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # model init, training order and augmentation
    chunk_size: int = 4096  # inputs per Parquet part (the unit of resume)
    importance: str = "cls"  # cls: CLS->patch attention of the last blocks | rollout | none
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
        if self.folds < 1 or (self.folds > 1 and self.train_epochs is None):
            raise ValueError(f"--folds must be >= 1, and K > 1 trains K proxies here: it needs --train-epochs "
                             f"(got --folds {self.folds})")
        mode_of(self.resume, self.overwrite)
        if self.label_filter not in label_issues.FILTERS:
            raise ValueError(f"--label-filter must be one of {', '.join(label_issues.FILTERS)}, "
                             f"got {self.label_filter!r}")
        if self.importance not in ("cls", "rollout", "none"):
            raise ValueError(f"--importance must be cls, rollout or none, got {self.importance!r}")
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
    device = rank_device(cfg.device, group)
    recipe = resolve_recipe(cfg.proxy, cfg.image_size)
    model, info = _make_model(cfg, recipe, items, group)
    folder = group.main_only(lambda: open_out(cfg, items))
    try:
        held_out = _fold_proxies(cfg, recipe, items, info, device, group)  # first: rank 0 has the full one to train
        proxy, info, dyn = _finish_proxy(cfg, recipe, model, info, items, device, group)
        t_train = time.perf_counter()
        parts = group.from_main(lambda: missing_parts(cfg.out, len(items), cfg.chunk_size))
        work = _score_parts(cfg, items, recipe, proxy, dyn, info, parts[group.rank::group.world_size], held_out)
        t_scored = time.perf_counter()
        ranks = group.all_gather({"rank": group.rank, **work})  # also: every part is written
        labels = group.from_main(lambda: label_issues.annotate(table.parts(cfg.out), cfg.label_filter))
        t_end = time.perf_counter()
        timing = {"index_and_train_s": t_train - t0, "score_s": t_scored - t_train,
                  "label_issues_s": t_end - t_scored, "total_s": t_end - t0}
        per_rank = group.all_gather(timing)
        ranks = [r | {"timing": t} for r, t in zip(ranks, per_rank)]
        timing = merge_timing(per_rank)
        manifest = group.from_main(lambda: _write_manifest(cfg, items, info | {"label_issues": labels}, timing, ranks))
    finally:
        if folder is not None:
            folder.close()
    return ScoreResult(manifest, sum(r["parts_written"] for r in ranks), timing, group.is_main)


def missing_parts(out: Path, n_items: int, chunk_size: int) -> list[int]:
    """Indices of the parts not yet on disk, ascending. Listed once, by rank 0, and shared: a rank
    listing `out` itself could already see parts that another rank has just written."""
    return sorted(set(range(_num_parts(n_items, chunk_size))) - table.done_parts(out))


def _num_parts(n_items: int, chunk_size: int) -> int:
    return -(-n_items // chunk_size)


def merge_timing(per_rank: Sequence[dict[str, float]]) -> dict[str, float]:
    """The job's phases take as long as its slowest rank's."""
    return {k: max(t[k] for t in per_rank) for k in per_rank[0]}


def _check_same_index(group: Dist, items: Sequence[Item]) -> None:
    """Every rank indexes SOURCE itself; parts are index ranges, so all must see the same list."""
    hashes = group.all_gather(index_sha256(items))
    if len(set(hashes)) > 1:
        raise RuntimeError(f"ranks indexed different inputs (index sha256 per rank: {hashes}): SOURCE must "
                           "be the same files, on a shared file system, for every rank")


def open_out(cfg: ScoreConfig, items: Sequence[Item]) -> RunFolder:
    """The run folder, with every file this run may write claimed up front (parts, proxy,
    manifest): a killed run owns what it left behind, and --overwrite removes exactly that."""
    source = Path(cfg.source)
    folder = RunFolder.open(cfg.out, COMMAND, mode_of(cfg.resume, cfg.overwrite),
                            config={**cfg.fingerprint(), "index_sha256": index_sha256(items)},
                            free=RESUME_FREE, sources=[source] if source.is_dir() else [])
    names = [table.part_path(Path(), i).as_posix() for i in range(_num_parts(len(items), cfg.chunk_size))]
    proxy_files = [*((MODEL, TRAIN_STATE) if cfg.train_epochs else ()),
                   *(name for f in range(cfg.folds if cfg.folds > 1 else 0) for name in fold_files(f))]
    folder.claim(table.MANIFEST, *names, *proxy_files)
    for name in proxy_files:
        (cfg.out / name).parent.mkdir(parents=True, exist_ok=True)
    return folder


def num_classes(items: Sequence[Item]) -> int:
    n = max((it.label for it in items), default=-1) + 1
    if n < 2:
        raise ValueError("need labelled inputs from at least 2 classes to score with a proxy")
    return n


def _make_model(cfg: ScoreConfig, recipe: Recipe, items: Sequence[Item], group: Dist
                ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The proxy model with its given weights (none yet when it is trained here), and what the
    manifest says about it. Writes nothing: a wrong model name or checkpoint fails here."""
    def create() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)  # same initial weights on every run, resume and rank
        # Hub weights keep their own head (labels must be in its class space); otherwise one per class.
        return create_model(recipe, None if cfg.pretrained else num_classes(items), cfg.pretrained)

    model = group.main_first(create)  # rank 0 fills the hub cache; the others read it, no download race
    check_input_size(model, recipe)
    info: dict[str, Any] = {"name": cfg.proxy, "model": recipe.model, "recipe": asdict(recipe)}
    if cfg.checkpoint is not None:
        info.update(weights="checkpoint", checkpoint=str(cfg.checkpoint),
                    checkpoint_sha256=load_checkpoint(model, cfg.checkpoint))
    elif cfg.pretrained:
        info.update(weights="pretrained", pretrained_tag=model.pretrained_cfg.get("tag", ""))
    return model, info


def check_input_size(model: torch.nn.Module, recipe: Recipe) -> None:
    """One forward of two blank images at the proxy's input size, before anything is written: a
    size the model cannot take (a patch grid that does not divide it, a stem that shrinks it to
    nothing) fails here, not after the run folder exists."""
    size = recipe.img_size
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, 3, size, size))
    except (RuntimeError, ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--image-size {size}: the proxy {recipe.model} cannot take {size}x{size} inputs "
                         f"({first})") from None
    finally:
        model.train(training)


def _finish_proxy(cfg: ScoreConfig, recipe: Recipe, model: torch.nn.Module, info: dict[str, Any],
                  items: Sequence[Item], device: torch.device, group: Dist
                  ) -> tuple[ProxyModel, dict[str, Any], Dynamics | None]:
    """Train the proxy here when asked, then wrap it for scoring."""
    dyn = None
    if cfg.train_epochs is not None:
        dyn = _train_on_main(cfg, recipe, model, items, device, group)
        weights = cfg.out / MODEL
        info.update(weights="trained", checkpoint=str(weights), checkpoint_sha256=file_sha256(weights),
                    training={"epochs": cfg.train_epochs, "lr": recipe.lr, "batch_size": recipe.batch_size,
                              "weight_decay": recipe.weight_decay, "seed": cfg.seed,
                              "warmup_epochs": recipe.warmup_epochs,
                              "dynamics_from_epoch": dynamics_skip(recipe), "history": dyn.history()})
    proxy = ProxyModel(model, cfg.importance, cfg.importance_blocks or recipe.importance_blocks).to(device)
    info["importance"] = {"method": proxy.importance, "blocks": list(proxy.blocks),
                          "grid": list(proxy.grid) if proxy.importance != "none" else None}
    return proxy, info, dyn


def _train_on_main(cfg: ScoreConfig, recipe: Recipe, model: torch.nn.Module, items: Sequence[Item],
                   device: torch.device, group: Dist) -> Dynamics:
    """Train on rank 0 alone, exactly as a single process would; the other ranks then load it.

    Not DDP: a proxy trained data-parallel sees other batches and learning-rate steps, so its
    scores would depend on the number of ranks. Here rank 0 trains (same seed, order and batches
    as one process) while the others wait; every epoch then sits in proxy/train-state.pt with the
    per-epoch dynamics, and the other ranks go through `train_proxy`'s own resume path, which finds
    all epochs done and only loads weights and dynamics. Training is not parallelised; scoring is.
    Rank 0 alone writes proxy/model.pt (temp-then-rename), and every rank waits for it before
    hashing it.
    """
    dyn = group.main_first(lambda: _train(cfg, recipe, model, items, device))
    group.main_only(lambda: save_weights(model.state_dict(), cfg.out / MODEL))
    return dyn


def _train(cfg: ScoreConfig, recipe: Recipe, model: torch.nn.Module, items: Sequence[Item],
           device: torch.device) -> Dynamics:
    assert cfg.train_epochs is not None
    setup = TrainSetup(cfg.train_epochs, recipe.batch_size, cfg.workers, device, cfg.seed,
                       cfg.out / TRAIN_STATE, name=cfg.proxy)
    return train_proxy(model, items, recipe, setup, progress=cfg.progress)


@dataclass(frozen=True)
class HeldOut:
    """The fold proxies: `proxies[f]` never trained on the items with `folds == f`."""

    folds: np.ndarray  # int16 (N,), fold per item
    proxies: list[ProxyModel]

    def logits(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Each image's logits from the proxy that held it out (one forward per fold present)."""
        fold = torch.from_numpy(self.folds[idx.numpy()].astype(np.int64))
        out: torch.Tensor | None = None
        for f in fold.unique().tolist():
            rows = fold == f
            logits = self.proxies[f].score_batch(images[rows]).logits.float().cpu()
            out = torch.empty(len(images), logits.shape[1]) if out is None else out
            out[rows] = logits
        assert out is not None
        return out


def _fold_proxies(cfg: ScoreConfig, recipe: Recipe, items: Sequence[Item], info: dict[str, Any],
                  device: torch.device, group: Dist) -> HeldOut | None:
    """With --folds K > 1: train (or, on resume, load) the K fold proxies and record them.

    The folds are dealt out over the ranks, rank 0 last (it then trains the proxy on everything
    while the others wait); each fold is trained by one process exactly as a single process
    would train it, so the table does not depend on the number of ranks."""
    if cfg.folds < 2:
        return None
    assert cfg.train_epochs is not None
    folds = assign_folds([it.key for it in items], [it.label for it in items], cfg.folds, cfg.seed)
    histories: dict[int, list[dict[str, float]]] = {}

    def train_fold(f: int) -> None:
        model = _fold_model(cfg, recipe, items, f)
        subset = [items[i] for i in np.flatnonzero(folds != f)]
        weights, state = (cfg.out / name for name in fold_files(f))
        setup = TrainSetup(cfg.train_epochs, recipe.batch_size, cfg.workers, device, _fold_seed(cfg.seed, f),
                           state, name=f"{cfg.proxy} fold {f + 1}/{cfg.folds}")
        histories[f] = train_proxy(model, subset, recipe, setup, progress=cfg.progress).history()
        save_weights(model.state_dict(), weights)

    group.deal(list(range(cfg.folds)), train_fold, first_rank=1)
    proxies = []
    for f in range(cfg.folds):
        model = _fold_model(cfg, recipe, items, f)
        model.load_state_dict(load_weights(cfg.out / fold_files(f)[0]))
        proxies.append(ProxyModel(model, "none").to(device))
    histories = {k: v for h in group.all_gather(histories) for k, v in h.items()}
    info["folds"] = {"k": cfg.folds, "stratified_by": "label", "seed": cfg.seed, "per_fold": [
        {"fold": f, "held_out": int((folds == f).sum()), "checkpoint": str(cfg.out / fold_files(f)[0]),
         "checkpoint_sha256": file_sha256(cfg.out / fold_files(f)[0]), "history": histories[f]}
        for f in range(cfg.folds)]}
    return HeldOut(folds, proxies)


def _fold_seed(seed: int, fold: int) -> int:
    return seed * 1_000_003 + 7919 * (fold + 1)  # distinct from the full proxy's and the other folds'


def _fold_model(cfg: ScoreConfig, recipe: Recipe, items: Sequence[Item], fold: int) -> torch.nn.Module:
    torch.manual_seed(_fold_seed(cfg.seed, fold))
    return create_model(recipe, num_classes(items), False)


def _score_parts(cfg: ScoreConfig, items: Sequence[Item], recipe: Recipe, proxy: ProxyModel,
                 dyn: Dynamics | None, info: dict[str, Any], todo: Sequence[int],
                 held_out: HeldOut | None) -> dict[str, int]:
    """Score and write the parts `todo`; returns what was written (parts, rows, ok, error)."""
    work = {"parts_written": len(todo), "rows_written": 0, "ok": 0, "error": 0}
    if not todo:
        return work
    summary = dyn.summary(dynamics_skip(recipe)) if dyn is not None else None
    batches = [b for p in todo for b in chunk_batches(p * cfg.chunk_size,
                                                      min((p + 1) * cfg.chunk_size, len(items)), cfg.batch_size)]
    dataset = DecodedItems(items, recipe.img_size, cfg.max_pixels)
    loader = make_loader(dataset, batches, cfg.workers, pin_memory=proxy.mean.is_cuda)
    # The embedding width fixes the schema; one dummy image tells it for any model.
    dim = proxy.score_batch(torch.zeros(1, 3, recipe.img_size, recipe.img_size, dtype=torch.uint8))
    part_schema = table.schema(dim.embedding.shape[1], dim.logits.shape[1],
                               {"proxy": cfg.proxy, "weights": info["weights"], "folds": str(cfg.folds)})
    bar = tqdm(total=sum(len(b) for b in batches), desc="score", unit="img", disable=not cfg.progress)
    for part, rows in _parts(loader, items, proxy, summary, cfg.chunk_size, bar, held_out):
        table.write_part(table.part_path(cfg.out, part), rows, part_schema)
        work["rows_written"] += len(rows["key"])
        work["ok"] += rows["status"].count("ok")
        work["error"] += rows["status"].count("error")
    bar.close()
    return work


def dynamics_skip(recipe: Recipe) -> int:
    """Epochs left out of the training dynamics: those inside the learning-rate warmup."""
    return math.ceil(recipe.warmup_epochs)


def _parts(loader: Any, items: Sequence[Item], proxy: ProxyModel, summary: dict[str, torch.Tensor] | None,
           chunk_size: int, bar: tqdm, held_out: HeldOut | None) -> Iterator[tuple[int, dict[str, list]]]:
    """Group the loader's batches back into parts; yields (part index, columns) per complete part."""
    current, rows = -1, _empty_rows()
    for idx, images, metas in loader:
        part = int(idx[0]) // chunk_size
        if part != current:
            if current >= 0:
                yield current, rows
            current, rows = part, _empty_rows()
        ok = torch.tensor([m.error == "" for m in metas])
        out = proxy.score_batch(images[ok]) if ok.any() else None
        oos = held_out.logits(images[ok], idx[ok]) if held_out is not None and out is not None else None
        _append(rows, [items[i] for i in idx.tolist()], metas, ok, out, idx, summary)
        _append_held_out(rows, [items[i] for i in idx.tolist()], ok, out, oos, idx, held_out)
        rows["thumbnail"].extend(t if good else None for t, good in zip(thumbnails(images), ok.tolist()))
        bar.update(len(idx))
    if current >= 0:
        yield current, rows


def _empty_rows() -> dict[str, list]:
    filled_later = set(label_issues.COLUMNS)
    return {f.name: [] for f in table.BASE_FIELDS if f.name not in filled_later} | {
        "embedding": [], "thumbnail": [], "probs": []}


def thumbnails(images: torch.Tensor) -> np.ndarray:
    """uint8 (B, 3, S, S) -> (B, 3 * 8 * 8) uint8 area averages: a near-duplicate descriptor."""
    small = F.adaptive_avg_pool2d(images.float(), table.THUMB_SIDE)  # (B, 3, 8, 8)
    return small.round().to(torch.uint8).flatten(1).numpy()


_SCORE_COLS = ("loss", "margin", "el2n", "entropy", "pred", "confidence")
_DYN_COLS = ("forgetting", "el2n_mean", "margin_mean")


def _append(rows: dict[str, list], items: list[Item], metas: list[Meta], ok: torch.Tensor,
            out: Any, idx: torch.Tensor, summary: dict[str, torch.Tensor] | None) -> None:
    """Add one batch's rows: identity and file facts for all, proxy outputs for the decoded ones."""
    labels = torch.tensor([it.label for it in items])[ok]
    scores = metrics.example_scores(out.logits, labels.to(out.logits.device)) if out is not None else {}
    scores = {k: v.cpu().tolist() for k, v in scores.items()}
    emb = out.embedding.cpu().numpy() if out is not None else None
    imp = out.importance.cpu().numpy() if out is not None and out.importance is not None else None
    j = 0
    for item, meta, good, i in zip(items, metas, ok.tolist(), idx.tolist()):
        _append_identity(rows, item, meta)
        for col in _SCORE_COLS:
            rows[col].append(_finite(scores[col][j]) if good else None)
        for col in _DYN_COLS:
            rows[col].append(_finite(summary[col][i].item()) if good and summary is not None else None)
        rows["embedding"].append(emb[j] if good else None)
        rows["importance"].append(table.importance_to_bytes(imp[j]) if good and imp is not None else None)
        rows["importance_h"].append(imp.shape[1] if good and imp is not None else None)
        rows["importance_w"].append(imp.shape[2] if good and imp is not None else None)
        j += int(good)


_OOS_COLS = ("loss", "margin", "el2n")


def _append_held_out(rows: dict[str, list], items: list[Item], ok: torch.Tensor, out: Any,
                     oos: torch.Tensor | None, idx: torch.Tensor, held_out: HeldOut | None) -> None:
    """probs (out of sample with folds, else the proxy's own), fold and the out-of-sample scores."""
    logits = oos if oos is not None else (out.logits.float().cpu() if out is not None else None)
    probs = logits.softmax(-1).numpy() if logits is not None else None
    labels = torch.tensor([it.label for it in items])[ok]
    scores = metrics.example_scores(oos, labels) if oos is not None else {}
    scores = {k: v.tolist() for k, v in scores.items()}
    j = 0
    for good, i in zip(ok.tolist(), idx.tolist()):
        rows["probs"].append(probs[j] if good and probs is not None else None)
        rows["fold"].append(int(held_out.folds[i]) if held_out is not None else None)
        for col in _OOS_COLS:
            rows[f"oos_{col}"].append(_finite(scores[col][j]) if good and oos is not None else None)
        j += int(good)


def _append_identity(rows: dict[str, list], item: Item, meta: Meta) -> None:
    rows["key"].append(item.key)
    rows["source"].append(item.source)
    rows["label"].append(item.label)
    rows["class_name"].append(item.class_name)
    rows["status"].append("error" if meta.error else "ok")
    rows["error"].append(meta.error or None)
    rows["width"].append(meta.width or None)
    rows["height"].append(meta.height or None)
    rows["num_bytes"].append(meta.num_bytes)
    rows["content_hash"].append(meta.content_hash or None)


def _finite(x: float) -> float | None:
    """NaN (e.g. a score of an unlabelled input) is stored as null."""
    return None if x != x else x


def _write_manifest(cfg: ScoreConfig, items: Sequence[Item], info: dict[str, Any],
                    timing: dict[str, float], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's record, written once (by rank 0, after every rank has written its parts); counts
    come from the whole table, so they include parts written before a resume; `ranks` holds what
    each rank wrote in this invocation and how long it took."""
    by_status = _table_counts(cfg.out, len(items))
    written = sum(r["rows_written"] for r in ranks)
    manifest = {
        "schema_version": table.SCHEMA_VERSION,
        "source": cfg.source,
        "proxy": info,
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
        raise RuntimeError(f"{out}: the table has {rows} rows and {keys} distinct keys for {n_items} inputs")
    counts = scan.group_by("status").len().collect()
    return dict(zip(counts["status"].to_list(), counts["len"].to_list()))
