"""`curate train`: a timm ViT trained from curated shards with token dropping, sparse attention
and dynamic example pruning. DDP under torchrun (gloo on CPU, nccl on CUDA).

Files in RUN: config.json, metrics.jsonl (one JSON object per logged step and per epoch, from
rank 0; --resume drops the records of the epoch it trains again), checkpoint.pt (after every
epoch, written atomically: resume continues the same run),
keys-rank{R}-epoch{E}.txt with --record-keys (which samples each rank trained on), and
summary.json at the end.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.utils import ModelEmaV3
from tqdm import tqdm

from curate.common import dist
from curate.common.atomic import atomic_path, write_bytes, write_json
from curate.common.runfolder import RunFolder, mode_of
from curate.common.runtime import load_weights, save_weights
from curate.common.schedule import warmup_cosine
from curate.ingest.limits import class_count_fault
from curate.shard import format as shard_format
from sparsevit import data, device_decode, memory, names, prune, schedule, selector
from sparsevit.model import SparseConfig, SparseViT, check_geometry, create_sparse, num_keep

COMMAND = "train"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MAX_SKIPPED_LISTED = 100  # keys of undecodable samples written per epoch record; the count is exact
# Settings that may change between a run and its --resume without changing what it trains.
RESUME_FREE = ("out", "resume", "overwrite", "progress", "workers", "loader", "log_every", "eval_every", "record_keys")


@dataclass(frozen=True)
class TrainConfig:
    shards: Path  # output of `curate shard`: a train (and validation) split
    out: Path  # run folder
    model: str = "deit_tiny_patch16_224"  # any timm VisionTransformer name
    img_size: int = 224
    patch_size: int | None = None  # None: the model's own
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. depth, embed_dim for small runs
    num_classes: int | None = None  # None: from the shards' manifest.json
    epochs: int = 10
    batch_size: int = 64  # per rank
    lr: float = 1e-3  # for batch 512 summed over ranks, scaled linearly (DeiT)
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    smoothing: float = 0.1  # label smoothing
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (timm's --scale)
    mixup: float = 0.0  # mixup alpha; > 0 turns it on
    cutmix: float = 0.0  # cutmix alpha; > 0 turns it on
    drop_path: float = 0.0
    ema: float = 0.0  # EMA decay; 0: off
    keep: float = 1.0  # target fraction of patch tokens kept at the input
    keep_schedule: str = "constant"  # constant | trilevel | toe
    sparse: SparseConfig = field(default_factory=SparseConfig)
    online_keep: float = 1.0  # keep ratio at each of sparse.online_blocks
    select_by: str = "maps"  # with sparse.selector_blocks: who ranks tokens in training (maps | selector | mix)
    distill_weight: float = 1.0  # selector: loss towards the maps' top k
    ratio_weight: float = 2.0  # selector: loss holding the mean keep probability at the keep ratio (DynamicViT)
    selector_lr_scale: float = 10.0  # selectors' lr / the ViT's (docs/benchmarks.md, "A learned token selector")
    example_pruning: str = "none"  # none | infobatch | trilevel | rs2 | top-score
    example_keep: float = 0.7  # rs2: share of the examples each epoch trains; top-score: of each batch
    workers: int = 2  # loader processes per rank
    decode: str = "cpu"  # cpu: loader workers decode (PIL) | gpu: nvJPEG in the main process (device_decode)
    loader: str = "stream"  # stream: decode every epoch in loader workers | memory: decode once (sparsevit.memory)
    shuffle_buffer: int = 1000
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    seed: int = 0
    log_every: int = 10  # steps
    eval_every: int = 1  # epochs
    record_keys: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1 or not 0 < self.online_keep <= 1:
            raise ValueError(f"keep ratios must be in (0, 1], got {self.keep}, {self.online_keep}")
        if self.select_by not in selector.SELECT_BY:
            raise ValueError(f"select_by must be one of {selector.SELECT_BY}, got {self.select_by!r}")
        if self.select_by != "maps" and not self.sparse.selector_blocks:
            raise ValueError(f"select_by {self.select_by} needs selector blocks (--selector-blocks)")
        if self.sparse.selector_blocks and self.keep >= 1:
            raise ValueError("a token selector learns which tokens to drop: set keep < 1")
        if self.keep_schedule not in schedule.KEEP_SCHEDULES:
            raise ValueError(f"keep schedule must be one of {sorted(schedule.KEEP_SCHEDULES)}")
        if self.example_pruning not in prune.PRUNERS:
            raise ValueError(f"example pruning must be one of {sorted(prune.PRUNERS)}")
        if not 0 < self.example_keep <= 1:
            raise ValueError(f"example_keep must be in (0, 1], got {self.example_keep}")
        if self.decode not in names.DECODE:
            raise ValueError(f"decode must be one of {names.DECODE}, got {self.decode!r}")
        if self.loader not in names.LOADERS:
            raise ValueError(f"loader must be one of {names.LOADERS}, got {self.loader!r}")
        if self.loader == "memory" and self.decode == "gpu":
            raise ValueError("--loader memory decodes the split once, on the CPU: it has no use for --decode gpu")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be >= 1")
        check_geometry(self.img_size, self.patch_size)
        if self.num_classes is not None and (fault := class_count_fault(self.num_classes, "--num-classes")):
            raise ValueError(fault)
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))  # a list from JSON or click
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale}")
        mode_of(self.resume, self.overwrite)

    def class_count(self) -> int:
        """--num-classes, else the class count the shard writer recorded (checked)."""
        return self.num_classes or shard_format.num_classes(self.shards)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shards"], d["out"] = str(self.shards), str(self.out)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        """The config `to_json` wrote (a checkpoint's, config.json), checked as a new one is:
        a damaged or hostile file fails here, with the setting it got wrong. Keys of other
        versions are ignored; the run-folder flags are cleared."""
        known = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
        sparse = known.get("sparse", {})
        if not isinstance(sparse, dict) or not isinstance(known.get("model_kwargs", {}), dict):
            raise ValueError("sparse and model_kwargs must be objects")
        known |= {"sparse": SparseConfig(**sparse), "resume": False, "overwrite": False,
                  "shards": Path(str(known.get("shards", ""))), "out": Path(str(known.get("out", "")))}
        if not isinstance(known.get("model", ""), str):
            raise ValueError(f"model must be a timm model name, got {known['model']!r:.40}")
        return cls(**known)


@dataclass
class Run:
    """Everything the loop mutates, in one place (and in the checkpoint)."""
    cfg: TrainConfig
    net: torch.nn.Module  # DDP-wrapped when distributed
    core: SparseViT
    opt: torch.optim.Optimizer
    ema: ModelEmaV3 | None
    pruner: prune.NoPruning
    mixer: data.MapMixup | None
    ctx: dist.Dist
    device: torch.device
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    wall: float = 0.0  # training seconds so far (resume adds to it)
    folder: RunFolder | None = None  # the run folder, on rank 0
    class_names: list[str] | None = None  # by class index, from the shards; kept in the checkpoint
    decoded: dict[tuple[str, ...], memory.Decoded] = field(default_factory=dict)  # --loader memory, by split urls


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate each epoch, checkpoint; returns the summary written to summary.json."""
    with ExitStack() as stack:
        ctx = stack.enter_context(_process_group())
        device = default_device(ctx)
        # Everything that can fail on the shards or the settings fails before --out is touched.
        if cfg.decode == "gpu" and device.type != "cuda":
            raise ValueError("--decode gpu decodes JPEGs with nvJPEG on a CUDA device; none is available here")
        train_split = shard_format.read_split(cfg.shards, "train")
        val_split = validation_split(cfg.shards)
        _check_trainable(cfg, train_split, ctx.world_size)
        ctx.from_main(lambda: check_shards(cfg, [train_split, *([val_split] if val_split else [])]))
        warning = resolution_warning(cfg.shards, cfg.img_size)
        if warning:
            ctx.main_only(lambda: print(f"warning: {warning}", file=sys.stderr, flush=True))
        run = build(cfg, ctx, device, train_split)
        folder = ctx.main_only(lambda: open_out(cfg, ctx.world_size))
        if folder is not None:
            stack.callback(folder.close)
        run.folder = folder
        if cfg.resume:
            load_checkpoint(run)
            ctx.main_only(lambda: trim_metrics(cfg.out / METRICS, run.epoch))
        _log_header(run, train_split, val_split)
        for epoch in range(run.epoch, cfg.epochs):
            rec = train_epoch(run, train_split, epoch)
            if val_split is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                rec.update(evaluate(run, val_split))
            run.epoch = epoch + 1
            # log, then checkpoint: a kill in between re-runs the epoch, and trim_metrics on
            # --resume drops its first record, so each epoch is logged exactly once
            ctx.main_only(lambda rec=rec: _log(run, rec))
            ctx.main_only(lambda: _save_checkpoint(run))
            ctx.barrier()
        summary = _summary(run)
        ctx.main_only(lambda: write_json(cfg.out / SUMMARY, summary))
        return summary


# --- set-up -------------------------------------------------------------------------------

def _process_group() -> Any:
    """Our own group when launched by torchrun: nccl on CUDA, gloo on CPU; dist.session reuses it."""
    if dist.launched() and not tdist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return _owned_session()
    return dist.session()


class _owned_session:
    def __enter__(self) -> dist.Dist:
        self.inner = dist.session()
        return self.inner.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)
        tdist.destroy_process_group()


def default_device(ctx: dist.Dist) -> torch.device:
    """This rank's GPU when there is one, else the CPU."""
    return torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def validation_split(root: Path) -> shard_format.Split | None:
    """The shards' validation split, or None when they were written without one."""
    try:
        return shard_format.read_split(root, "validation")
    except KeyError:
        return None


def _check_trainable(cfg: TrainConfig, split: shard_format.Split, world_size: int) -> None:
    """An epoch must hold at least one full batch on every rank, or the run would train nothing."""
    plan = data.plan_epoch(split, 0, cfg.seed, world_size, cfg.workers, cfg.batch_size)
    if plan.steps == 0:
        raise ValueError(f"{cfg.shards}: {split.num_samples} training samples give no full batch of "
                         f"{cfg.batch_size} per rank ({world_size} rank(s)): lower --batch-size")


def check_shards(cfg: TrainConfig, splits: list[shard_format.Split]) -> None:
    """What `curate verify` would refuse and training would die on (sample counts against the
    index, keys held twice, a cls that is no class index), found from the tar headers before
    anything is trained or written; the message names the shard and the key."""
    classes = cfg.class_count()
    faults = [f"{split.name}: {fault}" for split in splits for fault in shard_format.scan_split(split, classes)]
    if faults:
        raise shard_format.FormatError(f"{cfg.shards}: {len(faults)} fault(s) that would break training: "
                                       + "; ".join(faults) + f"; check every shard with: curate verify {cfg.shards}")


def resolution_warning(shards: Path, img_size: int) -> str:
    """A warning when the shards were written with `--max-side` below the training size, or "":
    every crop is then upsampled, and the model sees less detail than --img-size promises (on the
    demo's images: docs/benchmarks.md, "Shards at `--max-side`")."""
    max_side = shard_format.max_side_of(shard_format.read_manifest(shards))
    if max_side is None or max_side >= img_size:
        return ""
    return (f"{shards} was written with --max-side {max_side}, below --img-size {img_size}: every crop is "
            f"upsampled; write the shards with --max-side >= {img_size} (e.g. 256 for 224) to keep the detail")


def open_out(cfg: TrainConfig, world_size: int) -> RunFolder:
    """The run folder (rank 0 holds it), with the files every epoch writes claimed up front."""
    folder = RunFolder.open(cfg.out, COMMAND, mode_of(cfg.resume, cfg.overwrite), config=cfg.to_json(),
                            free=RESUME_FREE, sources=[cfg.shards])
    keys = [keys_name(r, e) for r in range(world_size) for e in range(cfg.epochs)] if cfg.record_keys else []
    folder.claim(METRICS, CHECKPOINT, SUMMARY, *keys)
    return folder


def keys_name(rank: int, epoch: int) -> str:
    return f"keys-rank{rank}-epoch{epoch}.txt"


def class_names(cfg: TrainConfig) -> list[str] | None:
    """The shards' class names by index, for the checkpoint (predictions name their class), or
    None when the shards record none or --num-classes counts differently."""
    names = shard_format.class_names(shard_format.read_manifest(cfg.shards))
    return names if names is not None and len(names) == cfg.class_count() else None


def build(cfg: TrainConfig, ctx: dist.Dist | None = None, device: torch.device | None = None,
          split: shard_format.Split | None = None) -> Run:
    """The run `curate train` trains: model, optimizer, EMA, mixup and example pruner, from the
    config and the shards' train split (read when not given). One process by default, on the GPU
    when there is one; `run_train` passes its process group. Writes nothing."""
    ctx = ctx or dist.Dist()
    device = device or default_device(ctx)
    split = split or shard_format.read_split(cfg.shards, "train")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    core = create_sparse(cfg.model, cfg.sparse, cfg.class_count(), cfg.img_size, cfg.patch_size,
                        drop_path_rate=cfg.drop_path, **cfg.model_kwargs).to(device)
    if cfg.keep < 1 and cfg.sparse.drop_by == "importance" and not split.has_maps:
        raise ValueError(f"{cfg.shards}: the train split has no importance maps; use --drop-by random or keep 1")
    # fused: one kernel per step instead of a dozen ops per parameter (on CPU the per-op cost
    # is a fixed share of a small model's step; docs/benchmarks.md, "Epochs that cost what they train")
    opt = create_optimizer_v2(param_groups(core, cfg), "adamw", lr=base_lr(cfg, ctx.world_size),
                              weight_decay=cfg.weight_decay, fused=True)
    net: torch.nn.Module = core
    if ctx.enabled:
        net = torch.nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.index is not None
                                                        else None)
    ema = ModelEmaV3(core, decay=cfg.ema) if cfg.ema > 0 else None
    mixer = data.MapMixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                          num_classes=core.vit.num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None
    pruner = prune.make_pruner(cfg.example_pruning, cfg.epochs, cfg.seed, cfg.example_keep, cfg.shards)
    return Run(cfg, net, core, opt, ema, pruner, mixer, ctx, device, class_names=class_names(cfg))


def param_groups(core: SparseViT, cfg: TrainConfig) -> list[dict[str, Any]]:
    """timm's weight-decay groups for the ViT (no decay on norms, biases, pos_embed, cls_token),
    then the selectors' with their learning-rate scale (read by _set_lr)."""
    groups = param_groups_weight_decay(core.vit, cfg.weight_decay, no_weight_decay_list=core.vit.no_weight_decay())
    if core.selectors:
        groups += [g | {"lr_scale": cfg.selector_lr_scale}
                   for g in param_groups_weight_decay(core.selectors, cfg.weight_decay)]
    return groups


# --- one epoch ----------------------------------------------------------------------------

def _seed_epoch(run: Run, epoch: int) -> None:
    """Per (seed, epoch, rank): a resumed run draws what the uninterrupted run drew."""
    s = run.cfg.seed * 1_000_003 + epoch * 1009 + run.ctx.rank
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def geometry(run: Run) -> data.Geometry:
    """The model's input: its side and patch grid, which the maps are pooled to."""
    return data.Geometry(run.cfg.img_size, _patch(run))


def train_loader(run: Run, split: shard_format.Split, epoch: int) -> tuple[Iterator[data.Batch], data.EpochPlan]:
    """This rank's batches of one epoch (`plan.steps` of them, the same on every rank), augmented
    and normalised for the model, the maps following every crop and flip; and the epoch's plan."""
    cfg = run.cfg
    normalize = data.Normalize.of(run.core.vit)
    transform = data.TrainTransform(geometry(run), scale=cfg.crop_scale, normalize=normalize)
    if cfg.loader == "memory":
        return _memory_loader(run, split, epoch, transform)
    plan = data.plan_epoch(split, epoch, cfg.seed, run.ctx.world_size, cfg.workers, cfg.batch_size)
    aug: Any = data.Augment(transform, need_maps=split.has_maps)
    if cfg.decode == "gpu":
        aug = device_decode.DeferredAugment(aug)
    pipe = data.make_pipeline(plan, aug, cfg.batch_size, cfg.shuffle_buffer, cfg.seed, epoch)
    batches = data.iterate(data.make_loader(pipe, cfg.workers), plan.steps, cfg.batch_size)
    if cfg.decode == "gpu":
        batches = (device_decode.finish_batch(b, cfg.img_size, run.device, normalize) for b in batches)
    return batches, plan


def _memory_loader(run: Run, split: shard_format.Split, epoch: int, transform: data.TrainTransform
                   ) -> tuple[Iterator[data.Batch], data.EpochPlan]:
    """`train_loader` from the split decoded once (sparsevit.memory), the pruner's sat-out rows
    left out before batching."""
    cfg, ctx = run.cfg, run.ctx
    urls = tuple(split.urls)
    if urls not in run.decoded:
        run.decoded[urls] = memory.decode_split(split, cfg.workers)
    decoded = run.decoded[urls]
    order = memory.epoch_order(decoded, cfg.seed, epoch, lambda keys: run.pruner.admits(keys, epoch))
    plan = memory.epoch_plan(order, ctx.world_size, cfg.batch_size)
    return memory.batches(decoded, order[ctx.rank::ctx.world_size], plan.steps, cfg.batch_size, transform), plan


def train_epoch(run: Run, split: shard_format.Split, epoch: int) -> dict[str, Any]:
    cfg, ctx = run.cfg, run.ctx
    _seed_epoch(run, epoch)
    run.net.train()
    batches, plan = train_loader(run, split, epoch)
    totals = {"loss": 0.0, "correct": 0, "seen": 0, "trained": 0, "gflops": 0.0, "skipped": 0, "distill": 0.0}
    skipped: list[tuple[str, str]] = []  # (key, error) of samples that could not be decoded
    records: list[prune.Record] = []
    keys: list[str] = []  # what this rank trained on, for --record-keys
    t_epoch = t_log = time.perf_counter()
    bar = tqdm(total=plan.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
               disable=not (cfg.progress and ctx.is_main), dynamic_ncols=True)  # stderr, inside the epoch
    for i, batch in enumerate(batches):
        progress = epoch + i / plan.steps
        skipped += batch.skipped
        stats = train_step(run, batch, progress, epoch, 1 / plan.steps)
        records += stats.pop("records")
        for k in totals:
            totals[k] += stats[k]
        if cfg.record_keys:
            keys += batch.keys
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss'] / max(1, stats['trained']):.3f}", refresh=False)
        if ctx.is_main and (run.step % cfg.log_every == 0):
            now = time.perf_counter()
            _append_metrics(run, {"kind": "step", "epoch": epoch, "step": run.step, "lr": stats["lr"],
                                  "loss": stats["loss"] / max(1, stats["trained"]), "keep": stats["keep"],
                                  "tokens": stats["tokens"], "images_per_s": stats["seen"] * cfg.log_every /
                                  max(1e-9, now - t_log) if i else None})
            t_log = now
    bar.close()
    if cfg.record_keys:  # one file per epoch and rank: a resumed epoch replaces it, whole
        write_bytes(cfg.out / keys_name(ctx.rank, epoch), "".join(f"{k}\n" for k in keys).encode())
    seconds = time.perf_counter() - t_epoch
    run.wall += seconds
    if run.pruner.tracks:  # every rank gets every rank's records, applied in the same order
        run.pruner.update([r for part in ctx.all_gather(records) for r in part], epoch)
    sums = _sum_over_ranks(run, totals)
    skipped = _check_skipped(run, skipped, sums)
    return {"kind": "epoch", "epoch": epoch, "step": run.step, "seconds": seconds, "wall": run.wall,
            "skipped": int(sums["skipped"]), "skipped_keys": skipped,
            "train_loss": sums["loss"] / max(1, sums["trained"]), "train_acc": sums["correct"] / max(1, sums["trained"]),
            "images": int(sums["seen"]), "trained": int(sums["trained"]), "unused": plan.unused,
            "images_per_s": sums["seen"] / max(1e-9, seconds), "est_tflops": sums["gflops"] / 1e3,
            "distill_loss": sums["distill"] / max(1, sums["trained"]) if run.core.selectors else None}


def _check_skipped(run: Run, skipped: list[tuple[str, str]], sums: dict[str, float]) -> list[dict[str, str]]:
    """Every rank's undecodable samples, for the epoch record (the first MAX_SKIPPED_LISTED);
    an epoch in which every sample failed stops the run: nothing could be learned."""
    listed = [{"key": k, "error": e} for part in run.ctx.all_gather(skipped) for k, e in part]
    if sums["skipped"] and not sums["seen"]:
        example = listed[0] if listed else {"key": "?", "error": "?"}
        raise shard_format.FormatError(f"{run.cfg.shards}: every training sample failed to decode "
                           f"({int(sums['skipped'])}; e.g. {example['key']}: {example['error']}): check the "
                           "shards with `curate verify`")
    return listed[:MAX_SKIPPED_LISTED]


def train_step(run: Run, batch: data.Batch, progress: float, epoch: int, step_epochs: float) -> dict[str, Any]:
    """One optimizer step on the rows the example pruner keeps; returns sums for the epoch.
    `progress` is the step's start and `step_epochs` its length, in epochs."""
    cfg = run.cfg
    keep = schedule.KEEP_SCHEDULES[cfg.keep_schedule](progress, cfg.epochs, cfg.keep)
    lr = _set_lr(run, progress, step_epochs)
    x, y, maps, w, rows = _pruned_rows(run, batch, epoch)
    target = F.one_hot(y, run.core.vit.num_classes).float()
    target = target * (1 - cfg.smoothing) + cfg.smoothing / target.shape[1]
    if run.mixer is not None:
        x, target, maps = run.mixer.mix(x, y, maps, geometry(run).grid)
    with _autocast(run):
        logits, aux = run.net(x, maps, keep, cfg.online_keep, selector_share(cfg, progress), with_losses=True)
        logits = logits[0] if isinstance(logits, tuple) else logits
        per = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1)  # (B,)
        loss = (per * w).sum() / max(1, len(per))
        distill_value = 0.0  # for the epoch's distill_loss
        if aux:  # a model with selectors: their distillation and ratio losses join the task loss
            distill, ratio = _selector_losses(aux)
            loss = loss + cfg.distill_weight * distill + cfg.ratio_weight * ratio
            distill_value = float(distill.detach())
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.step += 1
    if run.ema is not None:
        run.ema.update(run.core, step=run.step)
    correct = (logits.argmax(-1) == y) & (w > 0)
    records = _records(batch.keys, rows, per.detach(), correct, w) if run.pruner.tracks else []
    n = int((w > 0).sum())
    tokens = run.core.tokens_per_block(keep, cfg.online_keep)
    return {"loss": float((per.detach() * (w > 0)).sum()), "correct": int(correct.sum()), "seen": len(batch),
            "skipped": len(batch.skipped),
            "trained": n, "gflops": n * run.core.train_gflops(keep, cfg.online_keep), "lr": lr, "keep": keep,
            "tokens": tokens[0], "records": records, "distill": distill_value * n}


def selector_share(cfg: TrainConfig, progress: float) -> float:
    """The share of rows whose tokens the selector ranks at this point of training: none with
    maps, all with selector; mix hands over linearly from the maps to the selector."""
    return {"maps": 0.0, "selector": 1.0, "mix": min(1.0, progress / cfg.epochs)}[cfg.select_by]


def _selector_losses(aux: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Distillation and ratio losses, each summed over the selector blocks."""
    def total(kind: str) -> torch.Tensor:
        return torch.stack([v for k, v in aux.items() if k.startswith(kind)]).sum()
    return total("distill"), total("ratio")


def _pruned_rows(run: Run, batch: data.Batch, epoch: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The rows the pruner keeps, on the device, with their loss weights; at least one row
    (weight 0 if all sat out) so every DDP rank joins the all-reduce."""
    if batch.image is None:  # every sample of the batch failed to decode
        return _placeholder_rows(run)
    w = run.pruner.weights(batch.keys, epoch)
    rows = torch.nonzero(w > 0).flatten()
    if len(rows) == 0:
        rows = torch.zeros(1, dtype=torch.long)
    x, y, maps = batch.image, batch.label, batch.importance
    if len(rows) < len(w):  # index only when rows sit out: it copies the whole image batch
        x, y, maps, w = x[rows], y[rows], None if maps is None else maps[rows], w[rows]
    dev = run.device
    return (x.to(dev, non_blocking=True), y.to(dev), None if maps is None else maps.to(dev), w.to(dev), rows)


def _placeholder_rows(run: Run
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One blank row of weight 0: the step still runs, so every DDP rank joins the all-reduce."""
    size, dev = run.cfg.img_size, run.device
    return (torch.zeros(1, 3, size, size, device=dev), torch.zeros(1, dtype=torch.long, device=dev),
            torch.zeros(1, run.core.num_patches, device=dev), torch.zeros(1, device=dev),
            torch.zeros(1, dtype=torch.long))


def _records(keys: list[str], rows: torch.Tensor, per: torch.Tensor, correct: torch.Tensor, w: torch.Tensor
             ) -> list[prune.Record]:
    out = {k: (k, float("nan"), False) for k in keys}
    for j, r in enumerate(rows.tolist()):
        if float(w[j]) > 0:
            out[keys[r]] = (keys[r], float(per[j]), bool(correct[j]))
    return list(out.values())


def base_lr(cfg: TrainConfig, world_size: int) -> float:
    """cfg.lr is for a global batch of 512, scaled linearly (DeiT)."""
    return cfg.lr * cfg.batch_size * world_size / 512


def _set_lr(run: Run, progress: float, step_epochs: float) -> float:
    cfg = run.cfg
    lr = warmup_cosine(progress, cfg.epochs, cfg.warmup_epochs, base_lr(cfg, run.ctx.world_size), cfg.min_lr,
                       step=step_epochs)
    for g in run.opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr


def _autocast(run: Run) -> Any:
    if run.cfg.amp and run.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _patch(run: Run) -> int:
    return run.core.vit.patch_embed.patch_size[0]


def _sum_over_ranks(run: Run, totals: dict[str, float]) -> dict[str, float]:
    parts = run.ctx.all_gather(totals)
    return {k: sum(p[k] for p in parts) for k in totals}


# --- evaluation ---------------------------------------------------------------------------

@torch.no_grad()
def evaluate(run: Run, split: shard_format.Split, random_tokens: bool = False) -> dict[str, Any]:
    """Accuracy with all tokens and dense attention (how the model is used after training), and
    as trained: keep ratio, drops and attention mode (by importance only where the split carries
    maps). With a token selector also as deployed: the selector alone picks the tokens (no maps),
    and how well its ranking agrees with the maps'. With `random_tokens`, also at the keep ratio
    with tokens kept at random (the control for the maps: `val_acc_random`). Each rank reads its
    own shards."""
    cfg = run.cfg
    net = run.ema.module if run.ema is not None else run.core
    net.eval()
    keep = cfg.keep
    by_importance = cfg.sparse.drop_by == "importance"
    sparse = keep < 1 or cfg.online_keep < 1 or cfg.sparse.attention != "dense"
    can_drop = sparse and (split.has_maps or not (by_importance or cfg.sparse.attention == "gather"))
    has_selector = bool(net.selectors)
    random_tokens = random_tokens and keep < 1
    counts = {"n": 0, "all": 0, "dropped": 0, "selected": 0, "random": 0, "skipped": 0, "overlap": 0.0,
              "spearman": 0.0, "compared": 0}
    for batch in eval_loader(run, split):
        counts["skipped"] += len(batch.skipped)
        if batch.image is None:
            continue
        x, y = batch.image.to(run.device), batch.label.to(run.device)
        maps = batch.importance.to(run.device) if batch.importance is not None else None
        with _autocast(run):
            counts["all"] += int((net.vit(x).argmax(-1) == y).sum())  # timm's forward: all tokens, dense
            if can_drop:
                counts["dropped"] += int((_logits(net(x, maps, keep, cfg.online_keep)).argmax(-1) == y).sum())
            if random_tokens:  # a random ranking in place of the maps: random tokens kept
                noise = torch.rand(len(y), net.num_patches, device=run.device)
                counts["random"] += int((_logits(net(x, noise, keep, cfg.online_keep)).argmax(-1) == y).sum())
            if has_selector:
                out = net(x, None, keep, cfg.online_keep, selector_share=1.0)
                counts["selected"] += int((_logits(out).argmax(-1) == y).sum())
                if maps is not None:
                    _add(counts, selector.agreement(net.selector_logits(x), maps, num_keep(maps.shape[1], keep)))
                    counts["compared"] += len(y)
        counts["n"] += len(y)
    net.train()
    s = _sum_over_ranks(run, counts)
    n, compared = max(1, s["n"]), s["compared"]
    return {"val_images": int(s["n"]), "val_skipped": int(s["skipped"]), "val_acc": s["all"] / n,
            "val_acc_dropped": s["dropped"] / n if can_drop else None,
            "val_acc_selected": s["selected"] / n if has_selector else None,
            "val_selector_overlap": s["overlap"] / compared if compared else None,
            "val_selector_spearman": s["spearman"] / compared if compared else None,
            **({"val_acc_random": s["random"] / n} if random_tokens else {})}


def _add(counts: dict[str, float], more: dict[str, float]) -> None:
    for k, v in more.items():
        counts[k] += v


def _logits(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def eval_loader(run: Run, split: shard_format.Split) -> Iterator[data.Batch]:
    """This rank's validation shards (urls[rank::world]), in order, partial last batch kept,
    with timm's eval transform (resize, centre crop) and the maps where the split has them."""
    cfg, ctx = run.cfg, run.ctx
    urls = split.urls[ctx.rank::ctx.world_size]
    if not urls:
        return iter(())
    transform = data.EvalTransform(geometry(run), normalize=data.Normalize.of(run.core.vit))
    aug = data.Augment(transform, need_maps=False)
    pipe = data.make_pipeline(data.EpochPlan(urls, 0, 0), aug, cfg.batch_size, 0, cfg.seed, 0, partial=True,
                              split_nodes=False)
    return iter(data.make_loader(pipe, min(cfg.workers, len(urls))))


# --- checkpoints and logs -----------------------------------------------------------------

def _save_checkpoint(run: Run) -> None:
    state = {"model": run.core.vit.state_dict(), "selectors": run.core.selectors.state_dict(),
             "opt": run.opt.state_dict(),
             "ema": run.ema.module.state_dict() if run.ema is not None else None,
             "pruner": run.pruner.state_dict(), "epoch": run.epoch, "step": run.step, "wall": run.wall,
             "config": run.cfg.to_json(), "class_names": run.class_names}
    save_weights(state, run.cfg.out / CHECKPOINT)


def load_checkpoint(run: Run) -> None:
    """Continue from the last finished epoch of the run's checkpoint: weights, EMA, optimizer,
    pruner, counters. `run_train`'s run folder has already checked that the settings are the ones
    this run was started with."""
    path = run.cfg.out / CHECKPOINT
    if not path.is_file():
        return  # --resume on an empty run folder starts from scratch
    _restore(run, load_weights(path, run.device))


def restore(checkpoint: Path, device: torch.device | None = None, **changes: Any) -> Run:
    """A run rebuilt from its checkpoint (a run folder or its checkpoint.pt), in one process,
    with `changes` to its settings (e.g. keep=0.5 to evaluate it at another keep ratio): for
    evaluating finished runs. Its shards must still be where it trained from."""
    path = checkpoint / CHECKPOINT if checkpoint.is_dir() else checkpoint
    state = load_weights(path, "cpu")
    run = build(replace(TrainConfig.from_json(state["config"]), **changes), device=device)
    _restore(run, state)
    return run


def _restore(run: Run, state: dict[str, Any]) -> None:
    run.core.vit.load_state_dict(state["model"])
    run.core.selectors.load_state_dict(state.get("selectors", {}))  # absent in checkpoints before selectors
    run.opt.load_state_dict(state["opt"])
    if run.ema is not None and state["ema"] is not None:
        run.ema.module.load_state_dict(state["ema"])
    run.pruner.load_state_dict(state["pruner"])
    run.epoch, run.step, run.wall = state["epoch"], state["step"], state["wall"]


def _append_metrics(run: Run, rec: dict[str, Any]) -> None:
    with open(run.cfg.out / METRICS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def trim_metrics(path: Path, epoch: int) -> None:
    """Before a resumed run goes on from `epoch`: drop the step and epoch records of epochs it
    will train again and a line cut short by the kill, so that no record is repeated."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # only the last line can be cut short, mid-write
        if not line.endswith("\n") or (rec.get("kind") in ("step", "epoch") and rec["epoch"] >= epoch):
            continue
        kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept))


def _log(run: Run, rec: dict[str, Any]) -> None:
    _append_metrics(run, rec)
    if run.cfg.progress:
        acc = f" val {rec['val_acc']:.1%}" if rec.get("val_acc") is not None else ""
        dropped = f" (dropped {rec['val_acc_dropped']:.1%})" if rec.get("val_acc_dropped") is not None else ""
        if rec.get("val_acc_selected") is not None:
            dropped += f" (selected {rec['val_acc_selected']:.1%})"
        lost = f", {rec['skipped']} skipped (undecodable; keys in {METRICS})" if rec["skipped"] else ""
        lost += f", {rec['unused']} unused" if rec["unused"] else ""
        print(f"epoch {rec['epoch'] + 1}/{run.cfg.epochs}: loss {rec['train_loss']:.3f} train "
              f"{rec['train_acc']:.1%}{acc}{dropped} {rec['images_per_s']:.0f} img/s {rec['seconds']:.1f}s"
              f"{lost}", file=sys.stderr, flush=True)  # progress: stderr; the summary (the result) goes to stdout


def _log_header(run: Run, split: shard_format.Split, val: shard_format.Split | None) -> None:
    cfg = run.cfg
    msg = {"kind": "start", "world_size": run.ctx.world_size, "device": str(run.device),
           "train_samples": split.num_samples, "val_samples": val.num_samples if val else 0,
           "tokens_per_block": run.core.tokens_per_block(cfg.keep, cfg.online_keep),
           "est_train_gflops_per_image": run.core.train_gflops(cfg.keep, cfg.online_keep),
           "dense_train_gflops_per_image": run.core.train_gflops(1.0), "resumed_at_epoch": run.epoch}
    run.ctx.main_only(lambda: _append_metrics(run, msg))
    plan = data.plan_epoch(split, run.epoch, cfg.seed, run.ctx.world_size, cfg.workers, cfg.batch_size)
    if plan.unused and cfg.progress and run.ctx.is_main:
        print(f"note: each epoch trains {split.num_samples - plan.unused} of {split.num_samples} samples; "
              f"{plan.unused} unused: {data.unused_reason(plan, run.ctx.world_size, cfg.batch_size)}",
              file=sys.stderr, flush=True)


def _summary(run: Run) -> dict[str, Any]:
    path = run.cfg.out / METRICS
    epochs = [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "epoch"] \
        if path.is_file() else []
    last = epochs[-1] if epochs else {}
    return {"epochs": run.epoch, "steps": run.step, "wall_s": run.wall, "val_acc": last.get("val_acc"),
            "val_acc_dropped": last.get("val_acc_dropped"), "val_acc_selected": last.get("val_acc_selected"),
            "train_acc": last.get("train_acc"), "unused_per_epoch": last.get("unused"),
            "skipped_per_epoch": last.get("skipped")}

