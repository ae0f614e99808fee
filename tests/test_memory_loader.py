"""`--loader memory`: the train split decoded once, batches augmented in the main process, read
back through curate's own shard reader and compared with the per-sample transform."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torchvision.transforms import functional as TF

from cli import main
from curate.shard.format import decode_sample, read_split
from sparsevit import data, memory
from sparsevit.train import TrainConfig, build, run_train, train_loader

from .sparse_fixtures import write_shards

TINY = dict(model="vit_tiny_patch16_224", model_kwargs={"depth": 2}, img_size=64, patch_size=8, batch_size=8,
            num_classes=4, progress=False, workers=2, loader="memory")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("toy"))


def _run(toy: Path, tmp_path: Path, **changes):
    return build(TrainConfig(shards=toy, out=tmp_path / "run", **(TINY | changes)), device=torch.device("cpu"))


def _stored(toy: Path) -> dict[str, dict]:
    """Every training sample as curate's reader decodes it, by key."""
    import webdataset as wds
    split = read_split(toy, "train")
    return {s["key"]: s for s in map(decode_sample, wds.DataPipeline(wds.SimpleShardList(split.urls),
                                                                     wds.tarfile_to_samples()))}


def test_an_epoch_covers_the_split_once_in_an_order_of_its_own(toy: Path, tmp_path: Path):
    run = _run(toy, tmp_path)
    split = read_split(toy, "train")
    epochs = []
    for epoch in (0, 1):
        batches, plan = train_loader(run, split, epoch)
        keys = [k for b in batches for k in b.keys]
        assert plan.steps == 8 and plan.unused == 0 and len(keys) == 64 == len(set(keys))
        epochs.append(keys)
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]
    stored = _stored(toy)
    batch = next(train_loader(run, split, 0)[0])
    assert batch.label.tolist() == [stored[k]["label"] for k in batch.keys]
    assert batch.image.shape == (8, 3, 64, 64) and batch.importance.shape == (8, 64)


def test_batched_crops_and_maps_are_what_the_per_sample_transform_makes(toy: Path, tmp_path: Path):
    split = read_split(toy, "train")
    decoded = memory.decode_split(split, 0)
    stored = _stored(toy)
    rows = list(range(16))
    geometry = data.Geometry(64, 8)
    whole = data.TrainTransform(geometry, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    batch = memory.make_batch(decoded, rows, whole, [])
    for i, key in enumerate(batch.keys):  # the box of the whole image: the image itself, exactly
        assert torch.allclose(batch.image[i], data.to_tensor(stored[key]["image"]), atol=1e-5)
    crop = data.TrainTransform(geometry, scale=(0.2, 0.6))
    random.seed(3)
    batch = memory.make_batch(decoded, rows, crop, [])
    random.seed(3)
    for i, key in enumerate(batch.keys):
        (top, left, h, w), flip = crop.draw(64, 64)
        image = data.to_tensor(stored[key]["image"])
        want = TF.resized_crop(image, top, left, h, w, [64, 64], antialias=False)
        want = TF.hflip(want) if flip else want
        # bilinear both; only the crop's border differs (roi_align reads the pixels beyond it)
        assert (batch.image[i] - want).abs().mean() < 0.03
        grid = data.crop_map(stored[key]["importance"], (top, left, h, w), (64, 64), 8, flip)
        assert torch.allclose(batch.importance[i], grid.flatten(), atol=1e-6)


def test_batched_map_reprojection_is_crop_map_for_any_box_flip_and_image_shape():
    rng = np.random.default_rng(0)
    maps = rng.random((32, 7, 5)).astype(np.float32)
    hw = np.stack([rng.integers(20, 90, 32), rng.integers(20, 90, 32)], 1)
    boxes = []
    for h, w in hw:
        bh, bw = rng.integers(1, h + 1), rng.integers(1, w + 1)
        boxes.append((rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1), bh, bw))
    flips = rng.random(32) < 0.5
    got = data.crop_maps(maps, np.array(boxes), hw, 6, flips)
    for i in range(32):
        want = data.crop_map(maps[i], boxes[i], tuple(hw[i]), 6, bool(flips[i]))
        assert torch.allclose(got[i], want, atol=1e-6)


def test_the_same_seed_draws_the_same_batches(toy: Path, tmp_path: Path):
    split = read_split(toy, "train")
    out = []
    for name in ("a", "b"):
        run = _run(toy, tmp_path / name)
        random.seed(5)
        out.append(list(train_loader(run, split, 2)[0]))
    for a, b in zip(*out):
        assert a.keys == b.keys and torch.equal(a.image, b.image) and torch.equal(a.importance, b.importance)


def test_rows_the_pruner_sets_out_take_no_steps(toy: Path, tmp_path: Path):
    run = _run(toy, tmp_path, example_pruning="trilevel")
    split = read_split(toy, "train")
    held = {k for k in _stored(toy) if run.pruner.is_held(k)}
    assert 0 < len(held) < 64
    batches, plan = train_loader(run, split, 0)
    keys = [k for b in batches for k in b.keys]
    assert not held & set(keys) and plan.steps == (64 - len(held)) // 8
    assert len(keys) + plan.unused == 64 - len(held)


def test_rs2_epochs_are_fresh_shares_in_full_batches(toy: Path, tmp_path: Path):
    run = _run(toy, tmp_path, example_pruning="rs2", example_keep=0.5)
    split = read_split(toy, "train")
    shares = []
    for epoch in (0, 1):
        batches, plan = train_loader(run, split, epoch)
        keys = {k for b in batches for k in b.keys}
        admitted = {k for k, w in zip(sorted(_stored(toy)), run.pruner.weights(sorted(_stored(toy)), epoch)) if w}
        assert keys <= admitted and plan.steps == len(admitted) // 8 and len(keys) == 8 * plan.steps
        shares.append(keys)
    assert shares[0] != shares[1]


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_top_score_takes_every_step_and_trains_the_top_of_each_batch(tmp_path: Path, loader: str):
    import polars as pl
    shards = write_shards(tmp_path / "shards")
    keys = sorted(_stored(shards))
    score = {k: float(i * 37 % 64) for i, k in enumerate(keys)}
    pl.DataFrame({"key": keys, "kept": [True] * 64, "score": [score[k] for k in keys]}).write_parquet(
        shards / "selection.parquet")
    run = _run(shards, tmp_path, example_pruning="top-score", loader=loader)
    batches, plan = train_loader(run, read_split(shards, "train"), 0)
    assert plan.steps == 8  # nothing sits out before batching
    for batch in batches:
        kept = {k for k, w in zip(batch.keys, run.pruner.weights(batch.keys, 0).tolist()) if w}  # what the step trains
        assert len(kept) == 6  # round(0.7 x 8)
        assert min(score[k] for k in kept) > max(score[k] for k in set(batch.keys) - kept)
    run_train(TrainConfig(shards=shards, out=tmp_path / "trained", epochs=1, example_pruning="top-score",
                          **(TINY | {"loader": loader})))
    epoch = [json.loads(line) for line in (tmp_path / "trained" / "metrics.jsonl").open()][-1]
    assert (epoch["images"], epoch["trained"]) == (64, 48)  # every row read, 6 of each 8 trained


def test_top_score_without_stored_scores_is_refused(toy: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="selection.parquet"):
        _run(toy, tmp_path, example_pruning="top-score")


def test_ranks_share_the_order_and_take_disjoint_equal_steps(toy: Path):
    decoded = memory.decode_split(read_split(toy, "train"), 0)
    order = memory.epoch_order(decoded, 0, 0, lambda keys: torch.ones(len(keys)))
    plan = memory.epoch_plan(order[:61], 2, 8)
    assert plan.steps == 3 and plan.unused == 61 - 48
    assert not set(order[0::2]) & set(order[1::2])


def test_a_split_too_big_for_memory_is_refused(toy: Path):
    with pytest.raises(ValueError, match="--loader stream"):
        memory.decode_split(read_split(toy, "train"), 0, max_bytes=10_000)


def test_curate_train_memory_lists_undecodable_samples_every_epoch(tmp_path: Path):
    broken = {"train-1-0003", "train-2-0007"}
    shards = write_shards(tmp_path / "some", corrupt=lambda key: key in broken)
    args = ["train", str(shards), "--out", str(tmp_path / "r1"), "--model", "vit_tiny_patch16_224", "--model-arg",
            "depth=2", "--img-size", "64", "--patch-size", "8", "--batch-size", "8", "--num-classes", "4", "--quiet",
            "--epochs", "2", "--loader", "memory", "--keep", "0.5"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    epochs = [json.loads(line) for line in (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert len(epochs) == 2
    for e in epochs:  # 62 good samples: 7 batches of 8, 6 left for the next epoch's order
        assert e["images"] == 56 and e["unused"] == 6 and e["skipped"] == 2
        assert sorted(s["key"] for s in e["skipped_keys"]) == sorted(broken)
    res = CliRunner().invoke(main, args[:3] + [str(tmp_path / "r2")] + args[4:] + ["--decode", "gpu"])
    assert res.exit_code == 2 and "--loader memory" in res.output and not (tmp_path / "r2").exists()
    dead = write_shards(tmp_path / "dead", corrupt=lambda key: key.startswith("train"))
    res = CliRunner().invoke(main, ["train", str(dead), "--out", str(tmp_path / "r3")] + args[4:])
    assert res.exit_code != 0 and "every training sample failed to decode" in res.output


class CornerCrops(data.TrainTransform):
    def draw(self, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
        return (height - 5, width - 7, 5, 7), random.random() < 0.5


def test_images_of_other_sizes_crop_as_they_would_alone():
    from torchvision.ops import roi_align
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((20, 31), (32, 32), (27, 18))]
    images = memory.pad_images(arrays)
    sizes = [a.shape[:2] for a in arrays]
    decoded = memory.Decoded(["a", "b", "c"], images, sizes, torch.zeros(3, dtype=torch.long), None, [])
    plain = data.Normalize((0, 0, 0), (1, 1, 1))
    random_crops = data.TrainTransform(data.Geometry(32, 4), scale=(0.05, 0.3), normalize=plain)
    corner = CornerCrops(data.Geometry(32, 4), normalize=plain)  # upsampled against the bottom-right edge
    for seed, crop in [(0, corner), (1, corner)] + [(s, random_crops) for s in range(5)]:
        random.seed(seed)
        batch = memory.make_batch(decoded, [0, 1, 2], crop, [])
        random.seed(seed)
        for i, a in enumerate(arrays):
            (top, left, h, w), flip = crop.draw(*sizes[i])
            alone = torch.from_numpy(a).permute(2, 0, 1)[None].float()
            box = torch.tensor([[0, left, top, left + w, top + h]], dtype=torch.float32)
            want = roi_align(alone, box, output_size=32, spatial_scale=1.0, sampling_ratio=-1, aligned=True)[0]
            want = want.flip(-1) if flip else want
            assert torch.allclose(batch.image[i] * 255, want, atol=1e-3), (seed, i)
