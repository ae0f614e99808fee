"""The scoring pass: decoded batches through the proxy (and the fold proxies) into rows of the
scores table (`table`), one part file per `chunk_size` inputs.

Columns are named by the table's field groups; a batch fills those it knows and `table.PartRows`
gives the others nulls, so the schema is the one list of columns.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from curate.ingest.sources import Item
from curate.score import metrics, table
from curate.score.folds import HeldOut
from curate.score.loader import DecodedItems, Meta, chunk_batches, make_loader
from curate.score.phash import phashes
from curate.score.proxies import ProxyModel, ProxyOutput


@dataclass(frozen=True)
class PartsSpec:
    """How the table is cut and written: parts of `chunk_size` inputs, in index order, in `out`."""

    out: Path
    chunk_size: int
    batch_size: int
    img_size: int  # the proxy's input side
    workers: int
    max_pixels: int
    metadata: Mapping[str, str]  # each part's schema metadata besides the version: proxy, weights, folds
    progress: bool


@dataclass(frozen=True)
class Scorer:
    """What turns a batch into rows: the proxy, its training dynamics and the fold proxies."""

    proxy: ProxyModel
    summary: dict[str, torch.Tensor] | None  # per-input dynamics (Dynamics.summary); None: not trained here
    held_out: HeldOut | None  # None: --folds 1

    def columns(self, items: Sequence[Item], metas: Sequence[Meta], idx: torch.Tensor,
                images: torch.Tensor) -> dict[str, list[Any]]:
        """One batch's columns: identity and file facts for all rows, proxy outputs for the decoded ones."""
        ok = [m.error == "" for m in metas]
        cols = _identity(items, metas)
        if self.held_out is not None:  # error rows have a fold too: it is a property of the key
            cols["fold"] = [int(self.held_out.folds[i]) for i in idx.tolist()]
        if not any(ok):
            return cols
        good = torch.tensor(ok)
        labels = torch.tensor([it.label for it in items])[good]
        out = self.proxy.score_batch(images[good], labels)
        decoded = {**_scores(out.logits, labels.to(out.logits.device), table.names(table.SCORE_FIELDS)),
                   **self._dynamics(idx[good]), **_maps(out), "thumbnail": list(thumbnails(images[good])),
                   "phash": list(phashes(images[good])),
                   **self._probs(images[good], idx[good], labels, out)}
        return cols | {name: _with_nulls(values, ok) for name, values in decoded.items()}

    def _dynamics(self, idx: torch.Tensor) -> dict[str, list[Any]]:
        if self.summary is None:
            return {}
        return {name: [_finite(v) for v in self.summary[name][idx].tolist()]
                for name in table.names(table.DYNAMICS_FIELDS)}

    def _probs(self, images: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor,
               out: ProxyOutput) -> dict[str, list[Any]]:
        """probs (out of sample with folds, else the proxy's own) and the out-of-sample scores."""
        if self.held_out is None:
            return {"probs": list(out.logits.float().cpu().softmax(-1).numpy())}
        oos = self.held_out.logits(images, idx)
        scores = _scores(oos, labels, table.OOS_SCORES)
        return {"probs": list(oos.softmax(-1).numpy()), **{table.OOS_PREFIX + k: v for k, v in scores.items()}}


def score_parts(spec: PartsSpec, items: Sequence[Item], scorer: Scorer, todo: Sequence[int]) -> dict[str, int]:
    """Score and write the parts `todo`; returns what was written (parts, rows, ok, error)."""
    work = {"parts_written": len(todo), "rows_written": 0, "ok": 0, "error": 0}
    if not todo:
        return work
    batches = [b for p in todo for b in chunk_batches(p * spec.chunk_size,
                                                      min((p + 1) * spec.chunk_size, len(items)), spec.batch_size)]
    loader = make_loader(DecodedItems(items, spec.img_size, spec.max_pixels), batches, spec.workers,
                         pin_memory=scorer.proxy.mean.is_cuda)
    # The embedding width fixes the schema; one dummy image tells it for any model.
    dim = scorer.proxy.score_batch(torch.zeros(1, 3, spec.img_size, spec.img_size, dtype=torch.uint8))
    part_schema = table.schema(dim.embedding.shape[1], dim.logits.shape[1], spec.metadata)
    bar = tqdm(total=sum(len(b) for b in batches), desc="score", unit="img", disable=not spec.progress)
    # A batch never spans two parts (chunk_batches), and the loader keeps their order.
    for part, part_batches in itertools.groupby(loader, key=lambda batch: int(batch[0][0]) // spec.chunk_size):
        rows = table.PartRows(part_schema)
        for idx, images, metas in part_batches:
            rows.add(scorer.columns([items[i] for i in idx.tolist()], metas, idx, images))
            bar.update(len(idx))
        table.write_part(table.part_path(spec.out, part), rows.columns, part_schema)
        status = rows.columns["status"]
        work["rows_written"] += len(rows)
        work["ok"] += status.count("ok")
        work["error"] += status.count("error")
    bar.close()
    return work


def thumbnails(images: torch.Tensor) -> np.ndarray:
    """uint8 (B, 3, S, S) -> (B, 3 * 8 * 8) uint8 area averages: a near-duplicate descriptor."""
    small = F.adaptive_avg_pool2d(images.float(), table.THUMB_SIDE)  # (B, 3, 8, 8)
    return small.round().to(torch.uint8).flatten(1).numpy()


def _identity(items: Sequence[Item], metas: Sequence[Meta]) -> dict[str, list[Any]]:
    """table.IDENTITY_FIELDS: what the index and the decoder know of every input."""
    return {"key": [it.key for it in items], "source": [it.source for it in items],
            "label": [it.label for it in items], "class_name": [it.class_name for it in items],
            "status": ["error" if m.error else "ok" for m in metas], "error": [m.error or None for m in metas],
            "width": [m.width or None for m in metas], "height": [m.height or None for m in metas],
            "num_bytes": [m.num_bytes for m in metas], "content_hash": [m.content_hash or None for m in metas]}


def _scores(logits: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> dict[str, list[Any]]:
    """The example scores named `names` (the table's score columns, or those given out of sample)."""
    scores = metrics.example_scores(logits, labels)
    return {name: [_finite(v) for v in scores[name].cpu().tolist()] for name in names}


def _maps(out: ProxyOutput) -> dict[str, list[Any]]:
    """The embedding and table.MAP_FIELDS (none for a proxy without patch attention)."""
    cols: dict[str, list[Any]] = {"embedding": list(out.embedding.cpu().numpy())}
    if out.importance is not None:
        maps = out.importance.cpu().numpy()
        h, w = maps.shape[1:]
        cols |= {"importance": [table.importance_to_bytes(m) for m in maps],
                 "importance_h": [h] * len(maps), "importance_w": [w] * len(maps)}
    return cols


def _with_nulls(values: Sequence[Any], ok: Sequence[bool]) -> list[Any]:
    """Values of the decoded rows, in order, spread over all rows: null for the error rows."""
    it = iter(values)
    return [next(it) if good else None for good in ok]


def _finite(x: float) -> float | None:
    """NaN (e.g. a score of an unlabelled input) is stored as null."""
    return None if x != x else x
