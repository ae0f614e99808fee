"""Shard writing: plans, byte-identical tars, crash/resume, and round trips through timm's and
webdataset's own readers. All data is made here: tiny JPEGs, one PNG, one BMP (transcoded)."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from curate.common.atomic import write_json
from curate.ingest.sources import Item, read_bytes
from curate.score.table import importance_from_bytes, importance_to_bytes
from curate.shard.format import SampleData, image_ext, write_index
from curate.shard.plan import ShardPlan, plan_shards
from curate.shard.verify import sample_faults, verify
from curate.shard.writer import FIXED_MTIME, TAR_MODE, TAR_OWNER, write_split

N_TRAIN, N_VAL, CLASSES = 25, 4, 4
Load = Callable[[Sequence[str]], Iterator[SampleData]]


@dataclass(frozen=True)
class Row:
    """What the caller joins per key: where the bytes are, and the scores-table columns."""

    item: Item
    importance: bytes | None  # table form: float16 little-endian
    grid: tuple[int, int]


def _image_bytes(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 80} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _make_rows(root: Path, split: str, n: int, width0: int) -> dict[str, Row]:
    """Every image has a unique width, so samples stay identifiable through timm's reader
    (it yields only (image, target), no key)."""
    rows: dict[str, Row] = {}
    for i in range(n):
        fmt = {n - 1: "BMP", n - 2: "PNG"}.get(i, "JPEG") if split == "train" else "JPEG"
        label = i % CLASSES
        key = f"c{label}-{split}_{i:03d}"
        path = root / f"{key}.{fmt.lower()}"
        path.write_bytes(_image_bytes(fmt, (width0 + i, 12 + i % 3), seed=i))
        grid = (3 + i % 2, 4)
        imp = np.random.default_rng(100 + i).random(grid).astype(np.float16)
        item = Item(key, str(path), label, f"class{label}", str(path))
        rows[key] = Row(item, importance_to_bytes(imp) if split == "train" else None, grid)
    return rows


def make_loader(rows: dict[str, Row], fail_at: int | None = None) -> tuple[Load, list[list[str]]]:
    """A `load` as the caller builds it (read_bytes + importance_from_bytes), recording calls;
    with `fail_at`, it dies after yielding that many samples in total (a simulated kill)."""
    calls: list[list[str]] = []
    done = [0]

    def load(keys: Sequence[str]) -> Iterator[SampleData]:
        calls.append(list(keys))
        for key in keys:
            if fail_at is not None and done[0] == fail_at:
                raise RuntimeError("simulated crash")
            row = rows[key]
            imp = None  # validation rows carry no map
            if row.importance is not None:
                imp = importance_from_bytes(row.importance, *row.grid)
            meta = {"class_name": row.item.class_name, "source": row.item.source, "el2n": 0.5}
            done[0] += 1
            yield SampleData(key, read_bytes(row.item), row.item.label, meta, imp)

    return load, calls


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Row]]:
    root = tmp_path_factory.mktemp("images")
    return {"train": _make_rows(root, "train", N_TRAIN, 16),
            "validation": _make_rows(root, "validation", N_VAL, 60)}


def plans(data: dict[str, dict[str, Row]]) -> dict[str, ShardPlan]:
    return {"train": plan_shards(list(data["train"]), "train", 4, shard_multiple=2),
            "validation": plan_shards(list(data["validation"]), "validation", 2)}


def write_all(out: Path, data: dict[str, dict[str, Row]]) -> dict[str, list]:
    infos = {s: write_split(out, p, make_loader(data[s])[0], resume=False, progress=False)
             for s, p in plans(data).items()}
    write_index(out, "demo", infos, {"train": True, "validation": False}, CLASSES, extra={"selection_hash": "x"})
    return infos


@pytest.fixture(scope="module")
def written(data: dict[str, dict[str, Row]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_all(out, data)
    return out


def shas(infos: list) -> list[str]:
    return [i.sha256 for i in infos]


# --- plan -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, per_shard, multiple, expected_shards",
    [(25, 4, 2, 8), (10, 100, 4, 4), (7, 3, 3, 3), (5, 1, 2, 4), (8, 8, 1, 1), (12, 4, 1, 3)],
)
def test_plan_balanced(n: int, per_shard: int, multiple: int, expected_shards: int) -> None:
    keys = [f"k{i}" for i in range(n)]
    plan = plan_shards(keys, "train", per_shard, shard_multiple=multiple)
    sizes = [len(s) for s in plan.shards]
    assert len(sizes) == expected_shards and len(sizes) % multiple == 0
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first N % n shards hold the extra one
    assert Counter(k for s in plan.shards for k in s) == Counter(keys)
    assert plan.num_samples == n and plan.filenames[0] == "train-000000.tar"


def test_plan_deterministic_and_order_independent() -> None:
    keys = [f"c{i % 3}-img_{i:04d}" for i in range(50)]
    a = plan_shards(keys, "train", 7, shard_multiple=4, seed=3)
    assert a == plan_shards(list(reversed(keys)), "train", 7, shard_multiple=4, seed=3)
    flat = [k for s in a.shards for k in s]
    assert flat != sorted(keys)  # shuffled, so shards mix classes
    other = plan_shards(keys, "train", 7, shard_multiple=4, seed=4)
    assert [k for s in other.shards for k in s] != flat


def test_plan_errors() -> None:
    with pytest.raises(ValueError, match="cannot fill 4 shards"):
        plan_shards(["a", "b", "c"], "train", 1, shard_multiple=4)
    with pytest.raises(ValueError, match="first dot"):
        plan_shards(["a.b", "c"], "train", 1)
    with pytest.raises(ValueError, match="more than once"):
        plan_shards(["a", "a"], "train", 1)
    with pytest.raises(ValueError, match="without 'tar'"):  # timm would parse it as a pattern
        plan_shards(["a"], "start", 1)


def test_image_ext() -> None:
    assert image_ext(_image_bytes("JPEG", (4, 4), 0)) == "jpg"
    assert image_ext(_image_bytes("PNG", (4, 4), 0)) == "png"
    assert image_ext(_image_bytes("WEBP", (4, 4), 0)) == "webp"
    assert image_ext(_image_bytes("BMP", (4, 4), 0)) is None
    assert image_ext(b"") is None


# --- round trips through real readers ---------------------------------------------------------


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _expected(rows: dict[str, Row]) -> Counter:
    """(size, label) per sample; sizes are unique, so this names each sample."""
    sizes = {k: _pixels(r.item.path).shape[1::-1] for k, r in rows.items()}
    return Counter((tuple(sizes[k]), r.item.label) for k, r in rows.items())


@pytest.mark.parametrize("is_training", [False, True])
def test_timm_reads_it_unchanged(written: Path, data: dict, is_training: bool) -> None:
    from timm.data import create_dataset

    ds = create_dataset("wds/demo", root=str(written), split="train", is_training=is_training,
                        batch_size=1, seed=0)
    got = [(img.size, target) for img, target in ds]
    assert all(isinstance(t, int) for _, t in got)
    # Every sample exactly once: one worker, so with_epoch(N) in training neither wraps nor cuts.
    assert Counter(got) == _expected(data["train"])
    val = create_dataset("wds/demo", root=str(written), split="validation")
    assert Counter((img.size, t) for img, t in val) == _expected(data["validation"])


def test_webdataset_fields(written: Path, data: dict) -> None:
    rows = data["train"]
    urls = [str(written / f) for f in plans(data)["train"].filenames]
    decoded = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode("pil")}
    raw = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    assert set(decoded) == set(rows)
    for key, sample in decoded.items():
        row = rows[key]
        imp = sample["importance.npy"]
        assert imp.dtype == np.float16 and imp.shape == row.grid
        assert np.array_equal(imp, importance_from_bytes(row.importance, *row.grid))
        assert sample["cls"] == row.item.label
        assert sample["json"]["class_name"] == row.item.class_name
        assert sample["json"]["importance_shape"] == list(row.grid)
        original = Path(row.item.path).read_bytes()
        if key.endswith(("023", "024")):  # the PNG (kept) and the BMP (transcoded)
            assert "jpg" not in raw[key] and image_ext(raw[key]["png"]) == "png"
            assert np.array_equal(np.asarray(sample["png"]), _pixels(row.item.path))
        else:
            assert raw[key]["jpg"] == original  # the original bytes, not a re-encode
    assert decoded["c0-train_024"]["json"]["transcoded_from"] == "BMP"
    assert raw["c3-train_023"]["png"] == Path(rows["c3-train_023"].item.path).read_bytes()


def test_tar_headers_fixed_and_samples_contiguous(written: Path) -> None:
    with tarfile.open(written / "train-000000.tar") as tf:
        members = tf.getmembers()
    assert {(m.mtime, m.uname, m.gname, m.uid, m.gid, m.mode) for m in members} == {
        (FIXED_MTIME, TAR_OWNER, TAR_OWNER, 0, 0, TAR_MODE)}
    assert all(not m.pax_headers for m in members)  # plain ustar headers, nothing time-based
    keys = [m.name.split(".", 1)[0] for m in members]
    runs = [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    assert len(runs) == len(set(runs))  # each key's members form one contiguous run
    assert any(m.name.endswith(".importance.npy") for m in members)


# --- determinism, crash and resume ------------------------------------------------------------


def test_byte_identical_across_runs(written: Path, data: dict, tmp_path: Path) -> None:
    again = write_all(tmp_path, data)
    manifest = json.loads((written / "manifest.json").read_text())
    for split, infos in again.items():
        assert shas(infos) == [e["sha256"] for e in manifest["splits"][split]["shards"]]
    assert (tmp_path / "_info.json").read_bytes() == (written / "_info.json").read_bytes()


def test_crash_then_resume_is_byte_identical(written: Path, data: dict, tmp_path: Path) -> None:
    plan = plans(data)["train"]
    first_two = len(plan.shards[0]) + len(plan.shards[1])
    crashing, _ = make_loader(data["train"], fail_at=first_two + 1)  # dies inside shard 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_split(tmp_path, plan, crashing, resume=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train-000001.tar"]
    load, calls = make_loader(data["train"])
    infos = write_split(tmp_path, plan, load, resume=True, progress=False)
    assert calls == plan.shards[2:]  # complete shards were not reloaded
    clean = json.loads((written / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert shas(infos) == [e["sha256"] for e in clean]
    assert [i.count for i in infos] == [len(s) for s in plan.shards]


def test_leftover_tmp_is_overwritten(written: Path, data: dict, tmp_path: Path) -> None:
    plan = plans(data)["train"]
    (tmp_path / ".train-000003.tar.tmp").write_bytes(b"half a tar from a killed run")
    infos = write_split(tmp_path, plan, make_loader(data["train"])[0], resume=True, progress=False)
    clean = json.loads((written / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert shas(infos) == [e["sha256"] for e in clean]
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_refuses_a_changed_plan(written: Path, data: dict, tmp_path: Path) -> None:
    shutil.copy(written / "train-000000.tar", tmp_path / "train-000000.tar")
    other = plan_shards(list(data["train"]), "train", 4, shard_multiple=2, seed=9)
    with pytest.raises(ValueError, match="other keys than the plan"):
        write_split(tmp_path, other, make_loader(data["train"])[0], resume=True, progress=False)


def test_load_must_yield_the_requested_keys(data: dict, tmp_path: Path) -> None:
    plan = plans(data)["validation"]
    load, _ = make_loader(data["validation"])

    def reversed_load(keys: Sequence[str]) -> Iterator[SampleData]:
        return load(list(reversed(keys)))

    with pytest.raises(ValueError, match="expected"):
        write_split(tmp_path, plan, reversed_load, resume=False, progress=False)
    assert not list(tmp_path.iterdir())  # neither a final shard nor a tmp file


# --- verify -----------------------------------------------------------------------------------


def test_verify_clean(written: Path) -> None:
    assert verify(written) == []


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_sample_faults() -> None:
    good = {"__key__": "k", "jpg": _image_bytes("JPEG", (8, 8), 0), "cls": b"3",
            "json": b'{"importance_shape": [2, 3]}',
            "importance.npy": _npy(np.zeros((2, 3), np.float16))}
    assert sample_faults(good, require_importance=True) == []
    cases = {
        "exactly one": {"png": _image_bytes("PNG", (8, 8), 0)},
        "does not decode": {"jpg": good["jpg"][:40]},
        "cls": {"cls": b"three"},
        "json": {"json": b"[1]"},
        "float16 2-D": {"importance.npy": _npy(np.zeros((2, 3), np.float32))},
        "shape": {"importance.npy": _npy(np.zeros((3, 2), np.float16))},
        "NaN": {"importance.npy": _npy(np.full((2, 3), np.nan, np.float16))},
    }
    for expected, change in cases.items():
        faults = sample_faults({**good, **change}, require_importance=True)
        assert len(faults) == 1 and expected in faults[0], (expected, faults)
    no_map = {k: v for k, v in good.items() if k != "importance.npy"}
    assert "missing" in sample_faults(no_map, require_importance=True)[0]
    assert sample_faults(no_map, require_importance=False) == []


def _copy(written: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(written, out)
    return out


def test_verify_flipped_byte_and_truncation(written: Path, tmp_path: Path) -> None:
    out = _copy(written, tmp_path)
    shard = out / "train-000000.tar"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 3] ^= 0xFF
    shard.write_bytes(bytes(blob))
    (out / "train-000001.tar").write_bytes((written / "train-000001.tar").read_bytes()[:3000])
    faults = verify(out)
    assert any("train-000000.tar" in f and "sha256" in f for f in faults)
    assert any("train-000001.tar" in f and "sha256" in f for f in faults)
    assert any("train-000001.tar" in f and "samples read" in f for f in faults)


def test_verify_missing_shard_bad_info_and_strays(written: Path, tmp_path: Path) -> None:
    out = _copy(written, tmp_path)
    (out / "train-000002.tar").unlink()
    info = json.loads((out / "_info.json").read_text())
    info["splits"]["train"]["num_samples"] += 1
    info["splits"]["validation"]["shard_lengths"][0] += 1
    write_json(out / "_info.json", info)
    (out / ".train-000005.tar.tmp").write_bytes(b"")
    (out / "train-000099.tar").write_bytes(b"")
    faults = verify(out)
    assert any("train-000002.tar" in f and "missing" in f for f in faults)
    assert any("num_samples" in f for f in faults)
    assert any("shard_lengths" in f and "validation" in f for f in faults)
    assert any(".train-000005.tar.tmp" in f for f in faults)
    assert any("train-000099.tar" in f and "not listed" in f for f in faults)


# --- images shipped at --max-side -------------------------------------------------------------

def _photo(size: tuple[int, int], orientation: int = 1) -> bytes:
    """A smooth JPEG (compresses like a photo) with a marker block in its top-left corner."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1).astype(np.uint8)
    rgb[: h // 8, : w // 8] = (255, 0, 0)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_reduce_image_shrinks_upright_and_keeps_what_is_already_small() -> None:
    from curate.ingest.decode import decode_rgb
    from curate.shard.format import reduce_image

    data = _photo((500, 375), orientation=6)  # stored landscape, displayed portrait
    out, meta = reduce_image("k", data, max_side=256, quality=90)
    assert meta == {"original_size": [375, 500], "stored": "reduced"} and len(out) < len(data)
    with Image.open(io.BytesIO(out)) as im:
        assert im.format == "JPEG" and im.size == (192, 256)
        assert im.getexif().get(0x0112) in (None, 1)  # upright pixels: nothing left to rotate
    expected = np.asarray(decode_rgb(data).resize((192, 256), Image.Resampling.BICUBIC), dtype=float)
    assert np.abs(np.asarray(decode_rgb(out), dtype=float) - expected).mean() < 3  # JPEG loss only
    small = _photo((200, 150))
    assert reduce_image("k", small, max_side=256, quality=90) == (small, {"original_size": [200, 150],
                                                                         "stored": "original"})
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (40, 90, 160)).save(buf, "PNG")  # one colour: a PNG of ~300 bytes
    flat = buf.getvalue()
    kept, meta = reduce_image("k", flat, max_side=100, quality=90)  # its JPEG would be larger
    assert kept == flat and meta == {"original_size": [300, 200], "stored": "original"}


def test_sample_faults_check_the_promised_size() -> None:
    big = _photo((64, 48))
    base = {"__key__": "k", "jpg": big, "cls": b"1"}
    def faults(meta: dict) -> list[str]:
        return sample_faults({**base, "json": json.dumps(meta).encode()}, require_importance=False, max_side=32)
    assert faults({"stored": "original", "original_size": [64, 48]}) == []
    assert "over max_side 32" in faults({"stored": "reduced", "original_size": [128, 96]})[0]
    assert "json says original bytes of 60x48" in faults({"stored": "original", "original_size": [60, 48]})[0]
    assert "lacks stored/original_size" in faults({})[0]
