"""Scores against the demo data's ground truth: label-noise AUC and importance localisation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from curate.demo.data import TRUTH
from curate.score import table
from curate.score.metrics import roc_auc
from curate.select.policies import HIGHER_IS_EASIER


def join_truth(scores: pl.DataFrame, demo_root: Path) -> pl.DataFrame:
    """Scores rows joined with truth.parquet (by source path); rows without truth are dropped."""
    root = demo_root.resolve()
    truth = pl.read_parquet(root / TRUTH).with_columns(
        source=pl.lit(str(root) + "/") + pl.col("path")).rename({"dup_group": "dup_group_true"})
    return scores.join(truth, on="source", how="inner")


def label_noise_auc(joined: pl.DataFrame, column: str) -> float:
    """ROC-AUC of `column` for "this label was flipped" over ok rows (1.0 = flipped ranked first)."""
    ok = joined.filter(pl.col("status") == "ok")
    values = torch.tensor(ok[column].cast(pl.Float64).to_numpy())
    if column in HIGHER_IS_EASIER:  # a low margin is the suspicious one: negated, as selection does
        values = -values
    return roc_auc(values, torch.tensor(ok["flipped"].to_numpy()))


def localisation(joined: pl.DataFrame, size: int | None = None, top: float = 0.25) -> dict[str, float]:
    """How well the importance map finds the object box, over ok rows with a map.

    For each image, the top `top` fraction of patches by importance is taken; `on_box` is the
    fraction of them whose centre lies in the object box, `area` the fraction of all patches on
    the box (what a random map would get). ratio = on_box / area, averaged over images.
    """
    rows = joined.filter((pl.col("status") == "ok") & pl.col("importance").is_not_null())
    on_box, area = [], []
    for r in rows.select("importance", "importance_h", "importance_w", "width", "height",
                         "x0", "y0", "x1", "y1").iter_rows():
        grid = table.importance_from_bytes(r[0], r[1], r[2]).astype(np.float32)
        inside = _patch_in_box(grid.shape, (r[3], r[4]), r[5:9]).ravel()
        k = max(1, int(round(top * grid.size)))
        best = np.argsort(-grid.ravel(), kind="stable")[:k]
        on_box.append(inside[best].mean())
        area.append(inside.mean())
    return {"on_box": float(np.mean(on_box)), "area": float(np.mean(area)),
            "ratio": float(np.mean(on_box) / np.mean(area)), "images": len(on_box)}


def _patch_in_box(grid: tuple[int, int], image_wh: tuple[int, int], box: tuple[int, ...]) -> np.ndarray:
    """Boolean (gh, gw): patch centres (the map covers the whole image) inside the box."""
    gh, gw = grid
    w, h = image_wh
    ys = (np.arange(gh) + 0.5) * h / gh
    xs = (np.arange(gw) + 0.5) * w / gw
    x0, y0, x1, y1 = box
    return ((ys[:, None] >= y0) & (ys[:, None] < y1)) & ((xs[None, :] >= x0) & (xs[None, :] < x1))


def duplicate_detection(joined: pl.DataFrame) -> dict[str, float]:
    """Found groups and false merges, for rows with a predicted `dup_group` and the truth's.

    A planted group counts as found when all its members share one predicted group; `merged` is
    the fraction of images that are no one's duplicate but were put in a group anyway.
    """
    planted = (joined.filter(pl.col("dup_group_true") >= 0).group_by("dup_group_true")
               .agg(found=(pl.col("dup_group").n_unique() == 1) & (pl.col("dup_group").first() >= 0)))
    others = joined.filter(pl.col("dup_group_true") < 0)
    return {"groups": len(planted), "found": float(planted["found"].mean()),
            "singles": len(others), "merged": float((others["dup_group"] >= 0).mean())}
