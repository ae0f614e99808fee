"""`curate score --probe`: K-fold linear probes on a frozen model's embeddings fill the
out-of-sample columns, and cleanlab reads them; and the recipe chosen when none is named."""
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from curate.score import probe
from curate.score.folds import assign_folds
from curate.score.job import ScoreConfig, default_proxy, run_score
from curate.score.proxies import create_model, resolve_recipe
from curate.ingest.sources import from_image_folder


def _checkpoint(path: Path, classes: int) -> Path:
    torch.manual_seed(0)
    torch.save(create_model(resolve_recipe("airbench"), classes).state_dict(), path)
    return path


def test_probe_fills_held_out_probabilities_from_the_embeddings(small_demo: Path, tmp_path: Path):
    out = tmp_path / "s"
    run_score(ScoreConfig(str(small_demo / "train"), out, proxy="airbench", checkpoint=_checkpoint(tmp_path / "w.pt", 4),
                          probe=True, folds=3, workers=0, progress=False))
    df = pl.scan_parquet(out / "*.parquet").collect()
    manifest = json.loads((out / "manifest.json").read_text())
    rec = manifest["proxy"]["probe"]
    assert rec["k"] == 3 and rec["rows"] == len(df) == 96
    assert manifest["proxy"]["label_issues"]["agreement_per_fold"] is not None  # the probes' folds
    # The stored probabilities are the probes' own held-out predictions, recomputed here.
    order = df.sort("key")
    x, labels = np.stack(order["embedding"].to_numpy()), order["label"].to_numpy()
    folds = assign_folds(order["key"].to_list(), labels.tolist(), 3, 0)
    expected = probe.held_out_probs(x, labels, folds, 4)
    np.testing.assert_allclose(np.stack(order["probs"].to_numpy()), expected, atol=1e-6)
    assert (order["fold"].to_numpy() == folds).all()
    assert order["oos_loss"].is_not_null().all() and order["label_issue"].is_not_null().all()
    # A probe of held-out folds: no row's prediction came from a classifier fitted on it.
    two = folds < 2  # fold 0 predicted by a probe fitted on fold 1 alone: a different prediction
    again = probe.held_out_probs(x[two], labels[two], folds[two], 4)
    assert not np.allclose(again[folds[two] == 0], expected[folds == 0])


def test_probe_needs_frozen_weights(tmp_path: Path):
    with pytest.raises(ValueError, match="--probe fits linear classifiers"):
        ScoreConfig("x", tmp_path, train_epochs=2, probe=True)
    assert ScoreConfig("x", tmp_path, checkpoint=tmp_path, probe=True).folds == 5


def test_default_recipe_fits_the_image_size(tmp_path: Path):
    for side in (32, 160):
        root = tmp_path / str(side)
        for c in ("a", "b"):
            (root / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (side, side), (i * 40, 0, 0)).save(root / c / f"{i}.jpg")
        name, why = default_proxy(from_image_folder(root), 10 ** 8)
        assert name == ("airbench" if side == 32 else "imagenet-vit") and f"{side} px" in why


def test_airbench_training_resumes_exactly_inside_the_lookahead(small_demo: Path, tmp_path: Path, monkeypatch):
    """Killed after epoch 4 (lookahead averaging running since epoch 3), resumed: the same weights
    and dynamics as an uninterrupted run."""
    from dataclasses import replace

    from curate.score import proxy_training as pt

    items = from_image_folder(small_demo / "train")[::2]  # 48 images, 6 steps an epoch
    recipe = replace(resolve_recipe("airbench"), batch_size=8)

    def run(state: Path) -> tuple[dict, pt.Dynamics]:
        torch.manual_seed(0)
        model = create_model(recipe, 4)
        dyn = pt.train_proxy(model, items, recipe, pt.TrainSetup(5, 8, 0, torch.device("cpu"), 0, state), False)
        return model.state_dict(), dyn

    clean, clean_dyn = run(tmp_path / "clean.pt")
    save = pt.save_state

    def save_then_die(path, model, opt, dyn, epoch):
        save(path, model, opt, dyn, epoch)
        if epoch == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(pt, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed.pt")
    monkeypatch.setattr(pt, "save_state", save)
    resumed, resumed_dyn = run(tmp_path / "killed.pt")
    for name, value in clean.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(resumed_dyn.el2n, clean_dyn.el2n, equal_nan=True)
