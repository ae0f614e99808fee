"""Perceptual hashes (curate/score/phash.py) and the near-duplicate groups built on them: the bits
are imagehash's, copies (re-encoded, resized, mirrored) group with their original, distinct
images do not, groups do not chain, and copies with different labels are a label issue."""
import io
import json
from pathlib import Path

import imagehash
import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps

from cli import main
from curate.score.job import ScoreConfig, run_score
from curate.score.phash import dhash_bits, phash_bits, phashes, similarity
from curate.select.embeddings import load_phashes, phash_links, star_groups


def photo(seed: int, side: int = 64) -> Image.Image:
    """A textured image: smooth random blobs (a photograph's low frequencies, unlike flat colour)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
    return small.resize((side, side), Image.BICUBIC)


def batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_the_bits_are_imagehashs():
    for seed in range(5):
        grey = photo(seed).convert("L")
        ours = phash_bits(torch.tensor(np.asarray(grey), dtype=torch.float32).view(1, 1, 64, 64))[0].numpy()
        assert (ours == imagehash.phash(grey, 16).hash.flatten()).all()
        small = grey.resize((17, 16), Image.LANCZOS)
        ours = dhash_bits(torch.tensor(np.asarray(small), dtype=torch.float32).view(1, 1, 16, 17))[0].numpy()
        assert (ours == imagehash.dhash(small, 16).hash.flatten()).all()


def test_copies_are_similar_and_other_images_are_not():
    im = photo(0)
    copies = [jpeg(im, 50), im.resize((48, 48)).resize((64, 64)), ImageOps.mirror(im)]
    h = phashes(batch([im, *copies, photo(1), photo(2)]))
    for i in range(1, 4):
        assert similarity(h[0], h[i]) >= 0.75, i
    assert similarity(h[0], h[4]) < 0.75 and similarity(h[0], h[5]) < 0.75
    assert similarity(h[0], h[3]) == similarity(h[3], h[0]), "symmetric"


def test_star_groups_do_not_chain():
    # 0~1 and 1~2 but not 0~2; 3~4: stars {0, 1} and {3, 4}, and 2 stays alone
    groups = star_groups(6, np.array([0, 1, 3]), np.array([1, 2, 4]))
    assert groups.tolist() == [0, 0, -1, 3, 3, -1]
    assert star_groups(3, np.array([], dtype=np.int64), np.array([], dtype=np.int64)).tolist() == [-1, -1, -1]


def test_phash_links_find_a_mirrored_copy():
    im = photo(3)
    h = phashes(batch([photo(4), im, photo(5), ImageOps.mirror(im)]))
    a, b = phash_links(h, 0.75)
    assert {(int(x), int(y)) for x, y in zip(a, b)} == {(1, 3), (3, 1)}


@pytest.mark.slow
def test_shard_flags_copies_with_different_labels(tmp_path: Path):
    """A real scores table over images the test wrote: a copy filed under another class is grouped
    with its original, flagged dup_label_conflict, and dropped with --drop-label-issues."""
    src = tmp_path / "train"
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(8):
            photo(10 * c + i).save(src / f"c{c}" / f"{i}.jpg", quality=95)
    jpeg(photo(0), 50).save(src / "c1" / "copy-of-c0-0.jpg", quality=50)  # c0/0.jpg, labelled c1
    ImageOps.mirror(photo(1)).save(src / "c0" / "mirror-of-0-1.jpg", quality=90)  # same label: a plain copy
    scores = tmp_path / "scores"
    run_score(ScoreConfig(str(src), scores, proxy="demo-cnn", train_epochs=1, workers=0, progress=False))
    keys, h = load_phashes(scores)
    assert h.shape == (18, 256)
    res = CliRunner().invoke(main, ["shard", str(src), "--scores", str(scores), "--out", str(tmp_path / "s"),
                                    "--keep", "1.0", "--dedup", "0.75", "--drop-label-issues", "--quiet"])
    assert res.exit_code == 0, res.output
    sel = pl.read_parquet(tmp_path / "s" / "selection.parquet").join(
        pl.read_parquet(next(scores.glob("part-*.parquet"))).select("key", "source"), on="key")
    name = sel.with_columns(pl.col("source").str.extract(r"(c\d/[^/]+)$", 1).alias("file"))
    conflict = set(name.filter(pl.col("dup_label_conflict"))["file"])
    assert conflict == {"c0/0.jpg", "c1/copy-of-c0-0.jpg"}
    assert set(name.filter(pl.col("dup_label_conflict"))["reason"]) == {"label_issue"}
    mirrored = name.filter(pl.col("file").is_in(["c0/1.jpg", "c0/mirror-of-0-1.jpg"]))
    assert sorted(mirrored["reason"]) == ["duplicate", "kept"]
    assert "2 inputs are copies of an image with another label" in res.output
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["counts"]["dup_label_conflict"] == 2


def test_a_version_2_table_refuses_phash_dedup_clearly(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.select.embeddings import embedding_columns

    t = pa.table({"key": ["a"], "status": ["ok"], "thumbnail": pa.array([[0] * 192], pa.list_(pa.uint8(), 192))})
    pq.write_table(t.replace_schema_metadata({"schema_version": "2"}), tmp_path / "part-000000.parquet")
    with pytest.raises(ValueError, match="no phash column.*--dedup-on thumbnail"):
        embedding_columns(tmp_path, 0.75, None)
    assert embedding_columns(tmp_path, 0.93, None, dedup_on="thumbnail")["dup_group"].to_list() == [-1]
