"""`curate train --decode gpu` without a GPU: the loader workers' half (header size, crop box,
flip, maps) must equal the PIL path's for the same seed, and the main process's half runs on the
CPU with torchvision's decoder here (nvJPEG on CUDA in tests/test_gpu.py)."""
from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from curate.shard.format import read_samples, read_split
from sparsevit import data, device_decode
from sparsevit.train import TrainConfig, run_train

from .sparse_fixtures import write_shards

GEO = data.Geometry(64, 8)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = write_shards(tmp_path_factory.mktemp("toy"), per_class=6)
    return [s for url in read_split(root, "train").urls for s in read_samples(Path(url))]


def _augment() -> data.Augment:
    return data.Augment(data.TrainTransform(GEO), need_maps=True)


def _both(sample: dict, seed: int) -> tuple[dict, dict]:
    """The PIL path's and the deferred path's output for one sample, from the same random state."""
    random.seed(seed)
    pil = _augment()(sample)
    random.seed(seed)
    return pil, device_decode.DeferredAugment(_augment())(sample)


def _with_image(sample: dict, image: Image.Image, fmt: str, **save: object) -> dict:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    return {k: v for k, v in sample.items() if k != "jpg"} | {ext: buf.getvalue()}


def test_workers_draw_the_pil_paths_boxes_flips_and_maps(samples: list[dict]):
    flips = set()
    for i, sample in enumerate(samples):
        pil, deferred = _both(sample, seed=i)
        assert "jpeg" in deferred and "image" not in deferred
        random.seed(i)
        assert (deferred["box"], deferred["flip"]) == data.TrainTransform(GEO).draw(64, 64)
        assert torch.equal(deferred["importance"], pil["importance"])  # exactly the same map
        assert deferred["label"] == pil["label"] and deferred["key"] == pil["key"]
        flips.add(deferred["flip"])
    assert flips == {True, False}


def test_the_device_half_gives_the_pil_paths_pixels(samples: list[dict]):
    pairs = [_both(s, seed=i) for i, s in enumerate(samples[:16])]
    batch = device_decode.finish_batch(data.collate([d for _, d in pairs]), 64, torch.device("cpu"))
    pil = torch.stack([p["image"] for p, _ in pairs])
    assert batch.image.shape == pil.shape and batch.pending == []
    diff = (batch.image - pil).abs() * data.Normalize().tensors[1] * 255  # in 0..255 levels
    # the same libjpeg-turbo on the CPU, two antialiased bilinear resizes: 0.03 levels on average, 1 at
    # most when measured; a crop box off by one pixel would cost tens of levels at the square's edges
    assert diff.mean() < 0.5 and diff.max() <= 4
    assert torch.equal(batch.importance, data.collate([p for p, _ in pairs]).importance)


def test_what_a_plain_decoder_would_get_wrong_takes_the_pil_path(samples: list[dict]):
    base = samples[0]
    with Image.open(io.BytesIO(base["jpg"])) as im:
        im.load()
        exif = im.getexif()
        exif[0x0112] = 6
        odd = {"png": _with_image(base, im, "PNG"),
               "rotated": _with_image(base, im, "JPEG", quality=95, exif=exif.tobytes()),
               "cmyk": _with_image(base, im.convert("CMYK"), "JPEG", quality=95),
               "truncated": base | {"jpg": base["jpg"][:-200]}}
    for name, sample in odd.items():
        pil, deferred = _both(sample, seed=3)
        assert "jpeg" not in deferred, name
        assert deferred.keys() == pil.keys(), name
        if "image" in pil:
            assert torch.equal(deferred["image"], pil["image"]), name
        else:  # the truncated one: the same error, from the same decoder
            assert deferred["error"] == pil["error"], name
    mixed = [_both(s, seed=i)[1] for i, s in enumerate([samples[1], odd["png"], samples[2], odd["truncated"]])]
    batch = device_decode.finish_batch(data.collate(mixed), 64, torch.device("cpu"))
    assert batch.image.shape == (3, 3, 64, 64) and len(batch.skipped) == 1
    assert torch.equal(batch.image[1], mixed[1]["image"])  # the ready one kept its place


def test_a_jpeg_the_device_decoder_refuses_is_skipped_not_fatal(samples: list[dict], monkeypatch):
    deferred = [_both(s, seed=i)[1] for i, s in enumerate(samples[:4])]
    bad = deferred[2]["jpeg"]
    real = device_decode.decode_jpeg

    def picky(jpegs, **kw):
        if isinstance(jpegs, list) and any(j is bad for j in jpegs) or jpegs is bad:
            raise RuntimeError("nvjpeg: corrupt data\nmore")
        return real(jpegs, **kw)

    monkeypatch.setattr(device_decode, "decode_jpeg", picky)
    batch = device_decode.finish_batch(data.collate(deferred), 64, torch.device("cpu"))
    assert batch.keys == [d["key"] for i, d in enumerate(deferred) if i != 2]
    assert batch.image.shape[0] == batch.label.shape[0] == batch.importance.shape[0] == 3
    assert batch.skipped == [(deferred[2]["key"], "DecodeError: cpu JPEG decoder: nvjpeg: corrupt data")]


def test_decode_gpu_without_cuda_is_refused_before_out_is_touched(tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root = write_shards(tmp_path / "toy", per_class=4)
    cfg = TrainConfig(shards=root, out=tmp_path / "run", model="vit_tiny_patch16_224", img_size=64, patch_size=8,
                      model_kwargs={"depth": 1}, num_classes=4, batch_size=8, workers=0, decode="gpu",
                      progress=False)
    with pytest.raises(ValueError, match="nvJPEG on a CUDA device"):
        run_train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"decode must be one of \(.cpu., .gpu.\)"):
        TrainConfig(shards=root, out=tmp_path / "run", decode="nvjpeg")
