"""The learned token selector: it learns a map's ranking from features, drops tokens with no maps
at inference (fixed k), trains end to end from shards, and ships through `curate predict` and
torch.export with the same outputs as the model in the run."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from sparsevit import data, predict, selector
from sparsevit.model import SparseConfig, create_sparse
from sparsevit.train import TrainConfig

from .sparse_fixtures import object_image, write_shards

TINY = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=2", "--img-size", "64", "--patch-size", "8",
        "--batch-size", "8", "--lr", "0.05", "--num-classes", "4", "--quiet"]


def tiny(cfg: SparseConfig, depth: int = 2):
    torch.manual_seed(0)
    return create_sparse("vit_tiny_patch16_224", cfg, num_classes=4, img_size=64, patch_size=8, depth=depth)


def test_agreement_is_one_for_the_same_ranking_and_minus_one_reversed():
    maps = torch.rand(5, 64)
    same = selector.agreement(maps * 3 - 1, maps, 16)  # any increasing function: the same ranking
    assert same["overlap"] == pytest.approx(5) and same["spearman"] == pytest.approx(5)
    rev = selector.agreement(-maps, maps, 16)
    assert rev["overlap"] == 0 and rev["spearman"] == pytest.approx(-5)


def test_the_selector_learns_a_maps_ranking_from_token_features():
    torch.manual_seed(0)
    sel, direction = selector.TokenSelector(32, heads=4), torch.randn(32)
    opt = torch.optim.Adam(sel.parameters(), lr=1e-2)
    k = 16
    for _ in range(300):
        x = torch.randn(32, 64, 32)
        loss = selector.distill_loss(sel(x), x @ direction, k)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(256, 64, 32)
    with torch.no_grad():
        agree = selector.agreement(sel(x), x @ direction, k)
    assert agree["overlap"] / 256 > 0.75 and agree["spearman"] / 256 > 0.85, agree  # chance: 0.25 and 0


def test_without_maps_the_selector_keeps_k_tokens_and_with_all_kept_the_model_is_dense():
    model = tiny(SparseConfig(selector_blocks=(1,), package=True)).eval()
    assert model.tokens_per_block(0.5) == [1 + 64, 1 + 32 + 1]  # block 0 sees all, block 1 keeps half + package
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(x, None, 0.5, selector_share=1.0)  # no maps needed
        assert out.shape == (3, 4)
        assert not torch.equal(out, model.vit(x))
        torch.testing.assert_close(model(x, None, 1.0, selector_share=1.0), model.vit(x))
    with pytest.raises(ValueError, match="needs the importance maps"):
        model(x, None, 0.5)  # ranked by maps, and none given


def test_training_forward_has_the_eval_value_and_gradients_reach_the_selector():
    model = tiny(SparseConfig(selector_blocks=(0,)))
    x, maps = torch.randn(4, 3, 64, 64), torch.rand(4, 64)
    model.train()
    out, losses = model(x, maps, 0.5, with_losses=True)
    assert set(losses) == {"distill0", "ratio0"}
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(out, model(x, maps, 0.5), rtol=0, atol=0)  # straight-through: value 1
    model.train()
    out.sum().backward()  # the task loss alone reaches the selector (through 1 + p - p.detach())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.selectors.parameters()
               if p.requires_grad and p.ndim > 1)


def test_selector_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="importance maps"):
        SparseConfig(selector_blocks=(0,), drop_by="random")
    with pytest.raises(ValueError, match="must not come after online blocks"):
        SparseConfig(selector_blocks=(2,), online_blocks=(1,))
    with pytest.raises(ValueError, match="beyond depth"):
        tiny(SparseConfig(selector_blocks=(2,)))
    with pytest.raises(ValueError, match="needs selector blocks"):
        TrainConfig(shards=Path("s"), out=Path("o"), keep=0.5, select_by="selector")
    with pytest.raises(ValueError, match="keep < 1"):
        TrainConfig(shards=Path("s"), out=Path("o"), sparse=SparseConfig(selector_blocks=(0,)))


@pytest.fixture(scope="module")
def selector_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sel")
    toy, run = write_shards(root / "toy"), root / "run"
    args = ["train", str(toy), "--out", str(run), *TINY, "--epochs", "3", "--keep", "0.5", "--selector-blocks", "1",
            "--select-by", "mix", "--ema", "0.9"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return run


def test_a_selector_run_reports_accuracy_without_maps_and_agreement_with_them(selector_run: Path):
    epochs = [json.loads(line) for line in (selector_run / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert len(epochs) == 3
    for e in epochs:
        assert 0 <= e["val_acc_selected"] <= 1 and 0 <= e["val_acc_dropped"] <= 1
        assert 0 <= e["val_selector_overlap"] <= 1 and -1 <= e["val_selector_spearman"] <= 1
        assert e["distill_loss"] > 0
    assert epochs[-1]["distill_loss"] < epochs[0]["distill_loss"]
    summary = json.loads((selector_run / "summary.json").read_text())
    assert summary["val_acc_selected"] == epochs[-1]["val_acc_selected"]
    assert torch.load(selector_run / "checkpoint.pt", weights_only=True)["selectors"]  # saved with the ViT


def _image_folder(root: Path, n: int = 6) -> Path:
    """n images of the toy classes and one file that is not an image."""
    rng = random.Random(1)
    root.mkdir()
    for i in range(n):
        jpeg, _, _ = object_image(rng, i % 4)
        (root / f"img{i}.jpg").write_bytes(jpeg)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def test_predict_and_export_ship_the_runs_model_with_its_selector(selector_run: Path, tmp_path: Path):
    images = _image_folder(tmp_path / "images")
    out, pt2 = tmp_path / "pred.parquet", tmp_path / "model.pt2"
    res = CliRunner().invoke(main, ["predict", str(selector_run), str(images), "--out", str(out),
                                    "--export", str(pt2), "--workers", "0"])
    assert res.exit_code == 0, res.output
    table = pl.read_parquet(out).sort("path")
    assert table.height == 7 and table.filter(pl.col("error") != "")["path"].to_list() == [str(images / "broken.jpg")]
    model, run = predict.deployed(selector_run)
    assert model.keep == 0.5 == run.config.keep  # the run's keep, selector-chosen
    good = table.filter(pl.col("error") == "")
    tf = data.EvalTransform(data.Geometry(64, 8), normalize=data.Normalize.of(model.core.vit))  # as trained
    x = torch.stack([tf(Image.open(io.BytesIO(Path(p).read_bytes())).convert("RGB"), None)[0]
                     for p in good["path"]])
    with torch.no_grad():
        logits = model(x)
    assert good["label"].to_list() == logits.argmax(-1).tolist()
    np.testing.assert_allclose(good["prob"].to_numpy(), logits.softmax(-1).max(-1).values.numpy(), rtol=1e-5)
    shipped = torch.export.load(pt2).module()  # no sparsevit code needed to run it
    torch.testing.assert_close(shipped(x), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shipped(x[:1]), logits[:1], atol=1e-5, rtol=1e-5)  # any batch size


def test_predict_refuses_to_drop_tokens_without_a_selector(tmp_path: Path):
    toy, run = write_shards(tmp_path / "toy", per_class=4), tmp_path / "run"
    res = CliRunner().invoke(main, ["train", str(toy), "--out", str(run), *TINY, "--epochs", "1"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["predict", str(run), str(_image_folder(tmp_path / "im")), "--out",
                                    str(tmp_path / "p.parquet"), "--keep", "0.5"])
    assert res.exit_code != 0 and "no token selector" in res.output
    res = CliRunner().invoke(main, ["predict", str(run), str(tmp_path / "im"), "--out", str(tmp_path / "p.parquet"),
                                    "--workers", "0"])  # all tokens: no maps needed
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(tmp_path / "p.parquet")["label"].null_count() == 1  # the broken file only
