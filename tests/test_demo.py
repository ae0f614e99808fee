import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curate.demo.data import DemoConfig, make_demo
from curate.ingest.sources import from_image_folder


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.JPEG")):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_and_truth_matches_the_folder(tmp_path: Path):
    cfg = DemoConfig(root=tmp_path / "a", classes=4, per_class=40, val_per_class=5, seed=3)
    truth = make_demo(cfg)
    make_demo(DemoConfig(**{**cfg.__dict__, "root": tmp_path / "b"}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")

    train = truth.filter(pl.col("split") == "train")
    assert len(train) == 160 and len(truth.filter(pl.col("split") == "val")) == 20
    assert train["flipped"].sum() == 16  # 10%
    flipped = train.filter(pl.col("flipped"))
    assert (flipped["given_label"] != flipped["true_label"]).all()
    clean = train.filter(~pl.col("flipped"))
    assert (clean["given_label"] == clean["true_label"]).all()
    # labels in the truth are the ones an ImageFolder reader assigns (sorted class dirs)
    items = {it.source: it.label for it in from_image_folder(tmp_path / "a" / "train")}
    for path, label in train.select("path", "given_label").iter_rows():
        assert items[str(tmp_path / "a" / path)] == label


def test_boxes_hold_the_object_and_duplicates_look_alike(tmp_path: Path):
    truth = make_demo(DemoConfig(root=tmp_path, classes=3, per_class=40, val_per_class=2, seed=0))
    assert truth.select((pl.col("x0") >= 0) & (pl.col("x1") <= 64) & (pl.col("x0") < pl.col("x1"))).to_series().all()
    groups = (truth.filter(pl.col("dup_group") >= 0).group_by("dup_group", maintain_order=True)
              .agg(pl.col("path")))
    assert len(groups) >= 2 and groups["path"].list.len().min() >= 2

    def pixels(rel: str) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / rel), np.float32)

    singles = truth.filter(pl.col("dup_group") < 0)["path"].to_list()
    within, between = [], []
    for i, paths in enumerate(groups["path"].to_list()):
        within.append(np.abs(pixels(paths[0]) - pixels(paths[1])).mean())
        between.append(np.abs(pixels(paths[0]) - pixels(singles[i])).mean())
    # a near-copy differs from its original far less than another image does
    assert np.mean(within) * 3 < np.mean(between)


def test_demo_config_rejects_bad_values(tmp_path: Path):
    with pytest.raises(ValueError, match="classes"):
        DemoConfig(root=tmp_path, classes=1)
    with pytest.raises(ValueError, match="flip_fraction"):
        DemoConfig(root=tmp_path, flip_fraction=0.7)
