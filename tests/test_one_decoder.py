"""One decoder: the proxy (scoring) and the trained model (shards -> training loader) see the
same pixels for every image mode, including those where a plain `convert("RGB")` differs."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from curate.ingest.decode import to_tensor
from curate.ingest.sources import Item
from curate.score.loader import DecodedItems
from curate.shard import format as fmt
from curate.shard.plan import plan_shards
from curate.shard.writer import write_split
from sparsevit import data

SIZE = 24  # the images are 24 x 24: no JPEG draft, no resampling, pixels compare exactly


def _save(im: Image.Image, fmt_name: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt_name, **kw)
    return buf.getvalue()


def _rgba() -> Image.Image:
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    px[..., 3] = np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :]  # alpha ramps from clear to opaque
    return Image.frombytes("RGBA", (SIZE, SIZE), px.tobytes())


def _palette_with_transparency() -> bytes:
    im = Image.new("P", (SIZE, SIZE))
    im.putpalette([200, 30, 30, 30, 200, 30] + [0] * 762)
    im.paste(1, (6, 6, 18, 18))
    return _save(im, "PNG", transparency=0)  # index 0 (red) is transparent


def _sixteen_bit() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, SIZE).astype(np.uint16), (SIZE, 1))
    return _save(Image.frombytes("I;16", (SIZE, SIZE), ramp.astype("<u2").tobytes()), "PNG")


def _cmyk() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.frombytes("CMYK", (SIZE, SIZE), rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8).tobytes())


ODD = {
    "rgba.png": lambda: _save(_rgba(), "PNG"),
    "palette-transparency.png": _palette_with_transparency,
    "16bit.png": _sixteen_bit,
    "cmyk.jpg": lambda: _save(_cmyk(), "JPEG", quality=95),
    "rgba.tiff": lambda: _save(_rgba(), "TIFF"),  # not jpg/png/webp: the shard stores a PNG of it
    "cmyk.tiff": lambda: _save(_cmyk(), "TIFF"),
}


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return {name: make() for name, make in ODD.items()}


def _scored(tmp: Path, images: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """Pixels as `curate score` feeds them to the proxy (its DataLoader dataset)."""
    items = []
    for i, (name, raw) in enumerate(images.items()):
        path = tmp / name
        path.write_bytes(raw)
        items.append(Item(f"k{i}", str(path), 0, "c", str(path)))
    dataset = DecodedItems(items, SIZE)
    out = {}
    for i, name in enumerate(images):
        _, image, meta = dataset[i]
        assert meta.error == "", (name, meta.error)
        out[name] = image
    return out


def _trained(tmp: Path, images: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """Pixels as `curate train` decodes them: written by the shard writer, read by the loader."""
    keys = {f"k{i}": name for i, name in enumerate(images)}
    plan = plan_shards(sorted(keys), "train", 100)

    def load(batch: list[str]):
        for key in batch:
            yield fmt.SampleData(key, images[keys[key]], 0, {}, None)

    write_split(tmp / "shards", plan, load, resume=False, progress=False)
    augment = data.Augment(data.EvalTransform(data.Geometry(SIZE, 8), crop_pct=1.0), need_maps=False)
    out = {}
    for sample in fmt.read_samples(tmp / "shards" / plan.filenames[0]):
        decoded = fmt.decode_sample(sample)
        assert augment(sample)["image"].shape == (3, SIZE, SIZE)  # the real loader stage takes it too
        out[keys[decoded["key"]]] = to_tensor(decoded["image"].resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    return out


def test_scoring_and_training_see_the_same_pixels_for_every_mode(odd_images: dict[str, bytes], tmp_path: Path):
    scored, trained = _scored(tmp_path, odd_images), _trained(tmp_path, odd_images)
    for name in odd_images:
        assert torch.equal(scored[name], trained[name]), name


def test_a_plain_rgb_conversion_would_not_have(odd_images: dict[str, bytes], tmp_path: Path):
    """The check above can fail: the loader's old decoder (`convert("RGB")`) differs from what the
    proxy saw for alpha, palette transparency and 16-bit data."""
    scored = _scored(tmp_path, odd_images)
    for name in ("rgba.png", "palette-transparency.png", "16bit.png"):
        naive = to_tensor(Image.open(io.BytesIO(odd_images[name])).convert("RGB"))
        assert (naive.int() - scored[name].int()).abs().max() > 20, name
