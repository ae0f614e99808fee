"""Dynamic example pruning during training, keyed by sample key and identical on every rank.

Every rank records (key, loss, correct) for its own samples; at the end of an epoch the records
of all ranks are merged (all_gather in the loop) and applied in sorted key order, so every rank
holds the same statistics. Which examples sit out is a function of (seed, epoch, key, stats)
only: no per-rank random state, so DDP ranks agree without exchanging the subset.

Pruning happens in the training loop, per batch (skipped rows are removed before the forward
pass): the loader still reads them, but the compute, which dominates, is saved, and every rank
keeps the same number of steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from curate.common.hashing import unit
from curate.common.registry import Registry
from curate.shard.format import SELECTION
from sparsevit import names

Record = tuple[str, float, bool]  # (key, loss, correct); loss NaN: the example sat out
PRUNERS: Registry[type["NoPruning"]] = Registry("example pruning", names.EXAMPLE_PRUNERS)


@PRUNERS.register("none")
@dataclass
class NoPruning:
    tracks = False  # whether update() needs the epoch's records

    def weights(self, keys: list[str], epoch: int) -> torch.Tensor:
        return torch.ones(len(keys))

    def admits(self, keys: list[str], epoch: int) -> torch.Tensor:
        """What a loader that plans the whole epoch (`--loader memory`) may leave out before batching:
        the rows of weight 0, unless the choice depends on the batch a row lands in."""
        return self.weights(keys, epoch)

    def update(self, records: list[Record], epoch: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@PRUNERS.register("infobatch")
@dataclass
class InfoBatch(NoPruning):
    """InfoBatch (Qin et al., ICLR'24): each epoch, skip a fraction `prune` of the examples whose
    last loss is below the mean, scale the kept low-loss ones' loss by 1 / (1 - prune) so the
    gradient stays unbiased, and train on everything in the last `anneal` share of epochs."""
    epochs: int
    seed: int = 0
    prune: float = 0.5
    anneal: float = 0.125
    tracks = True
    loss: dict[str, float] = field(default_factory=dict)

    def weights(self, keys: list[str], epoch: int) -> torch.Tensor:
        if not self.loss or epoch >= self.epochs * (1 - self.anneal):
            return torch.ones(len(keys))
        mean = sum(self.loss.values()) / len(self.loss)
        w = []
        for k in keys:
            low = self.loss.get(k, mean) < mean
            w.append(0.0 if low and unit(self.seed, k, f"ib{epoch}") < self.prune
                     else 1 / (1 - self.prune) if low else 1.0)
        return torch.tensor(w)

    def update(self, records: list[Record], epoch: int) -> None:
        for key, loss, _ in sorted(records):
            if not math.isnan(loss):  # NaN: sat out this epoch, keep the last loss
                self.loss[key] = loss

    def state_dict(self) -> dict[str, Any]:
        return {"loss": dict(self.loss)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss = dict(state["loss"])


@PRUNERS.register("trilevel")
@dataclass
class HoldOutSwap(NoPruning):
    """Tri-Level's example sparsity: a share `hold` of the examples sits out; every `every` epochs
    the `swap` share with the lowest forgetting count (the most unforgettable) leaves and as
    many held-out examples, drawn by key hash, come back. Forgetting is counted on the model
    being trained (correct -> incorrect transitions; never correct counts as the maximum)."""
    epochs: int
    seed: int = 0
    hold: float = 0.2
    swap: float = 0.05
    every: int = 0  # 0: 30 of 300 epochs, scaled to the run
    tracks = True
    last: dict[str, bool] = field(default_factory=dict)
    forgets: dict[str, int] = field(default_factory=dict)
    learned: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)

    def is_held(self, key: str) -> bool:
        """Held out now; a key not seen yet follows the initial random hold-out by its hash."""
        return key in self.held if key in self.seen else unit(self.seed, key, "hold") < self.hold

    def _see(self, key: str) -> None:
        if key not in self.seen:
            if self.is_held(key):
                self.held.add(key)
            self.seen.add(key)

    def weights(self, keys: list[str], epoch: int) -> torch.Tensor:
        return torch.tensor([0.0 if self.is_held(k) else 1.0 for k in keys])

    def update(self, records: list[Record], epoch: int) -> None:
        for key, loss, correct in sorted(records):
            self._see(key)
            if math.isnan(loss):  # sat out this epoch
                continue
            if self.last.get(key) and not correct:
                self.forgets[key] = self.forgets.get(key, 0) + 1
            self.last[key] = correct
            if correct:
                self.learned.add(key)
        every = self.every or max(1, round(self.epochs * 30 / 300))
        if (epoch + 1) % every == 0 and epoch + 1 < self.epochs:
            self._swap(epoch)

    def forgetting(self, key: str) -> int:
        return self.forgets.get(key, 0) if key in self.learned else self.epochs

    def _swap(self, epoch: int) -> None:
        n = round(self.swap * len(self.seen))
        active = sorted(self.seen - self.held, key=lambda k: (self.forgetting(k), unit(self.seed, k, f"t{epoch}")))
        back = sorted(self.held, key=lambda k: unit(self.seed, k, f"back{epoch}"))[:n]
        self.held = (self.held - set(back)) | set(active[:n])

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last), "forgets": dict(self.forgets), "learned": sorted(self.learned),
                "held": sorted(self.held), "seen": sorted(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last, self.forgets = dict(state["last"]), dict(state["forgets"])
        self.learned, self.held, self.seen = set(state["learned"]), set(state["held"]), set(state["seen"])


@PRUNERS.register("rs2")
@dataclass
class FreshSubsets(NoPruning):
    """RS2 (Okanovic et al., arXiv 2305.18424): every epoch trains a fresh random share `keep` of
    the examples, so an epoch costs `keep` of a full one but, over the run, every example teaches.
    Without replacement: each key has one random position u in [0, 1) and epoch e takes the window
    [e * keep, (e + 1) * keep) of positions (mod 1), so a key comes back before any other returns
    twice. (The paper reshuffles after each pass; here one order is walked again.) Needs no
    records: a function of (seed, epoch, key)."""
    epochs: int
    seed: int = 0
    keep: float = 0.7

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"rs2 keeps a share of the examples each epoch: in (0, 1], got {self.keep}")

    def weights(self, keys: list[str], epoch: int) -> torch.Tensor:
        start = epoch * self.keep % 1.0
        return torch.tensor([1.0 if (unit(self.seed, k, "rs2") - start) % 1.0 < self.keep else 0.0 for k in keys])


@PRUNERS.register("top-score")
@dataclass
class BatchTopScore(NoPruning):
    """Per-batch selection by the stored scores: every batch trains its share `keep` of rows with the
    highest score `curate shard` stored (SHARDS/selection.parquet's `score`, the hardest examples by
    the proxy), as airbench96_faster trains the highest-loss rows of each batch, but without its
    extra forward pass. The loader still reads every row; each step costs `keep` of the model's.
    Ties (and keys the table lacks, ranked last) fall by key hash, fresh each epoch."""
    epochs: int
    seed: int = 0
    keep: float = 0.7
    scores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"top-score keeps a share of each batch: in (0, 1], got {self.keep}")

    def weights(self, keys: list[str], epoch: int) -> torch.Tensor:
        rank = sorted(range(len(keys)), key=lambda i: (-self.scores.get(keys[i], -math.inf),
                                                       unit(self.seed, keys[i], f"top{epoch}")))
        w = torch.zeros(len(keys))
        w[rank[:max(1, round(self.keep * len(keys)))]] = 1.0
        return w

    def admits(self, keys: list[str], epoch: int) -> torch.Tensor:
        return torch.ones(len(keys))  # which rows train depends on the batch: chosen in the step


def stored_scores(shards: Path) -> dict[str, float]:
    """key -> `score` of the rows `curate shard` kept, from SHARDS/selection.parquet."""
    import polars as pl  # only the pruners that read stored scores need it

    table = shards / SELECTION
    if not table.is_file():
        raise ValueError(f"--example-pruning top-score ranks by the scores `curate shard` stores in {SELECTION}; "
                         f"{shards} has none: shard with `curate shard`, or pick another --example-pruning")
    rows = pl.read_parquet(table, columns=["key", "kept", "score"])
    rows = rows.filter(pl.col("kept") & pl.col("score").is_not_null())
    if rows.is_empty():
        raise ValueError(f"{table} has no kept row with a score: nothing to rank by")
    return dict(zip(rows["key"].to_list(), rows["score"].to_list()))


def make_pruner(name: str, epochs: int, seed: int, keep: float = 0.7, shards: Path | None = None) -> NoPruning:
    """The named pruner; `keep` goes to the pruners that take a share of the examples (rs2,
    top-score), the scores stored beside `shards` to those that rank by them (top-score)."""
    if name == "none":
        return NoPruning()
    cls = PRUNERS[name]
    params = {f.name for f in fields(cls)}
    extra: dict[str, Any] = {"keep": keep} if "keep" in params else {}
    if "scores" in params:
        if shards is None:
            raise ValueError(f"--example-pruning {name} needs the shard folder its scores are stored in")
        extra["scores"] = stored_scores(shards)
    return cls(epochs=epochs, seed=seed, **extra)  # type: ignore[call-arg]
