"""`curate shard` end to end on scored demo data, through timm's and webdataset's readers."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import timm.data
import webdataset as wds
from click.testing import CliRunner

from cli import epoch_cost_line, main
from curate.score.job import ScoreConfig, run_score
from curate.select.policies import SelectConfig
from curate.shard.job import ShardConfig, run_shard
from curate.common.atomic import file_sha256
from curate.shard.format import read_samples
from curate.shard.verify import verify
from curate.score.table import importance_from_bytes
from sparsevit.train import resolution_warning

from .conftest import ROOT
from .test_score_job import random_checkpoint


@pytest.fixture(scope="module")
def scored(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The small demo scored by a CNN (no maps) and a ViT (maps), random weights: fast."""
    tmp = tmp_path_factory.mktemp("scored")
    src = small_demo / "train"
    for proxy in ("demo-cnn", "demo-vit"):
        ckpt = random_checkpoint(tmp / f"{proxy}.pt", classes=4, proxy=proxy)
        run_score(ScoreConfig(str(src), tmp / proxy, proxy=proxy, checkpoint=ckpt, workers=0, progress=False,
                              importance="none" if proxy == "demo-cnn" else "auto"))
    return src, tmp / "demo-cnn", tmp / "demo-vit"


def test_timm_and_webdataset_read_the_shards(scored, small_demo: Path, tmp_path: Path):
    src, cnn, vit = scored
    out = tmp_path / "shards"
    res = run_shard(ShardConfig(str(src), (cnn, vit), out, SelectConfig(keep=0.5, policy="hard", class_balanced=True),
                                dedup=None, val=str(small_demo / "val"), samples_per_shard=10, shard_multiple=4,
                                name="demo", progress=False))
    sel = res.selection
    assert len(sel) == 96 and sel["key"].n_unique() == 96
    assert sel["kept"].sum() == 48
    per_class = res.per_class  # class-balanced 0.5: each class keeps half its inputs (rounded)
    assert (per_class["kept"] - per_class["inputs"] * 0.5).abs().max() < 1
    kept = dict(sel.filter(pl.col("kept")).select("key", "label").iter_rows())
    train = res.manifest["splits"]["train"]
    assert [s["count"] for s in train["shards"]] == [6] * 8  # ceil(48 / 10) = 5 shards, rounded up to 8
    assert verify(out) == []

    ds = timm.data.create_dataset("wds/demo", root=str(out), split="train", is_training=False)
    labels = sorted(int(t) for _, t in ds)
    assert labels == sorted(kept.values())

    urls = sorted(str(p) for p in out.glob("train-*.tar"))
    seen = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
        imp = s["importance.npy"]
        assert imp.dtype == np.float16 and imp.shape == (8, 8)
        assert s["json"]["class_name"] and s["jpg"].size == (64, 64)
        seen[s["__key__"]] = s["cls"]
    assert seen == kept
    raw = next(read_samples(Path(urls[0])))
    source = json.loads(raw["json"])["source"]  # relative to SOURCE: no path of the building machine
    assert not source.startswith("/") and raw["jpg"] == (src / source).read_bytes()  # original bytes
    val = timm.data.create_dataset("wds/demo", root=str(out), split="validation", is_training=False)
    assert sum(1 for _ in val) == 16


def _cut_into_parts(scores: Path, dest: Path, rows_per_part: int) -> Path:
    """A copy of a scores table whose rows are spread over several part files."""
    dest.mkdir()
    whole = pq.read_table(sorted(scores.glob("part-*.parquet")))
    for i, start in enumerate(range(0, whole.num_rows, rows_per_part)):
        pq.write_table(whole.slice(start, rows_per_part), dest / f"part-{i:06d}.parquet")
    shutil.copy(scores / "manifest.json", dest / "manifest.json")
    return dest


def test_streamed_maps_and_scores_equal_the_tables(scored, tmp_path: Path):
    """Maps and scores are fetched per shard, not held per key: what each sample carries must be
    exactly its row of the Parquet tables, whatever the part layout and writer count."""
    src, cnn, vit = scored
    vit_parts = _cut_into_parts(vit, tmp_path / "vit-parts", rows_per_part=25)
    kw = dict(select=SelectConfig(keep=0.75, by=("el2n", "margin")), dedup=None, samples_per_shard=7, progress=False)
    one = run_shard(ShardConfig(str(src), (vit, cnn), tmp_path / "one", workers=1, **kw))
    run_shard(ShardConfig(str(src), (vit_parts, cnn), tmp_path / "parts", workers=2, **kw))
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert len(names) == 11 and names == sorted(p.name for p in (tmp_path / "parts").glob("*.tar"))
    for name in names:  # the part layout and the writer count change no byte
        assert file_sha256(tmp_path / "one" / name) == file_sha256(tmp_path / "parts" / name), name

    tables = [pl.read_parquet(d / "*.parquet").sort("key") for d in (vit, cnn)]
    rows = {r["key"]: r for r in tables[0].iter_rows(named=True)}
    by_table = [{r["key"]: r for r in t.select("key", "el2n", "margin").iter_rows(named=True)} for t in tables]
    score = dict(one.selection.select("key", "score").iter_rows())
    urls = sorted(str(p) for p in (tmp_path / "parts").glob("train-*.tar"))
    seen = set()
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        key, row = s["__key__"], rows[s["__key__"]]
        expected = importance_from_bytes(row["importance"], row["importance_h"], row["importance_w"])
        assert s["importance.npy"].dtype == np.float16 and np.array_equal(s["importance.npy"], expected)
        scores = {"score": score[key]} | {f"{c}@{i}": t[key][c] for i, t in enumerate(by_table)
                                          for c in ("el2n", "margin")}
        assert s["json"]["scores"] == scores and str(src / s["json"]["source"]) == row["source"]
        assert s["cls"] == row["label"] and s["jpg"] == Path(row["source"]).read_bytes()
        seen.add(key)
    assert seen == set(one.selection.filter(pl.col("kept"))["key"])


def test_selection_counts_and_refusals(scored, tmp_path: Path):
    src, cnn, vit = scored
    res = run_shard(ShardConfig(str(src), (cnn,), tmp_path / "a", SelectConfig(keep=30, policy="random"), dry_run=True,
                                dedup=None, progress=False))
    assert res.manifest is None and not (tmp_path / "a").exists()
    counts = dict(res.selection.group_by("reason").len().iter_rows())
    assert counts == {"kept": 30, "pruned": 66}
    for dry_run in (False, True):  # a dry run checks SOURCE against the scores as the real run does
        with pytest.raises(ValueError, match="not the input"):
            run_shard(ShardConfig(str(src.parent / "val"), (cnn,), tmp_path / "b", dry_run=dry_run, progress=False))


def _shard_cmd(src: Path, scores: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "shard", str(src), "--scores", str(scores), "--out", str(out),
            "--keep", "1.0", "--samples-per-shard", "1", "--quiet", *extra]


@pytest.mark.slow
def test_sigkill_while_writing_then_resume_is_byte_identical(scored, tmp_path: Path):
    src, _, vit = scored
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_shard_cmd(src, vit, clean), cwd=ROOT, check=True, capture_output=True)
    proc = subprocess.Popen(_shard_cmd(src, vit, killed), cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "train-000003.tar").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "writer ended before it could be killed"
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finals = sorted(killed.glob("train-*.tar"))
    assert 0 < len(finals) < 96, "the kill must land while shards are being written"
    for path in finals:  # whatever sits under a final name is a complete shard
        assert file_sha256(path) == file_sha256(clean / path.name)
    subprocess.run(_shard_cmd(src, vit, killed, "--resume"), cwd=ROOT, check=True, capture_output=True)
    for path in sorted(clean.glob("*.tar")):
        assert file_sha256(path) == file_sha256(killed / path.name), path.name
    assert verify(killed) == []


def test_cli_shard_dry_run_and_verify_fault(scored, tmp_path: Path):
    src, cnn, vit = scored
    runner = CliRunner()
    res = runner.invoke(main, ["shard", str(src), "--scores", str(cnn), "--scores", str(vit), "--out",
                               str(tmp_path / "o"), "--keep", "0.75", "--dry-run", "--no-dedup"])
    assert res.exit_code == 0, res.output
    assert "96 inputs: kept 72, pruned 24" in res.output and "dry run" in res.output
    # random-weight proxies: their label issues (73 of 96) are not dropped by default
    assert "warning: label issues kept: the proxy that flagged them (73 of 96)" in res.output
    assert "an epoch over the kept set costs ~0.75x one over all 96 readable inputs (72 samples)" in res.output
    res = runner.invoke(main, ["shard", str(src), "--scores", str(vit), "--out", str(tmp_path / "o"),
                               "--quiet", "--samples-per-shard", "20"])
    assert res.exit_code == 0, res.output
    assert runner.invoke(main, ["verify", str(tmp_path / "o")]).exit_code == 0
    shard = tmp_path / "o" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = runner.invoke(main, ["verify", str(tmp_path / "o")])
    assert res.exit_code != 0 and "sha256" in res.output
    (tmp_path / "o" / "old-dataset.tar").write_text("the user's")
    res = runner.invoke(main, ["shard", str(src), "--scores", str(vit), "--out", str(tmp_path / "o"),
                               "--quiet", "--overwrite"])
    assert res.exit_code != 0 and "old-dataset.tar" in res.output
    assert (tmp_path / "o" / "old-dataset.tar").read_text() == "the user's"
    for out in (src, vit):  # --out is the source or a scores table: refused before anything is written
        before = sorted(p.name for p in out.iterdir())
        res = runner.invoke(main, ["shard", str(src), "--scores", str(vit), "--out", str(out), "--overwrite"])
        assert res.exit_code != 0 and sorted(p.name for p in out.iterdir()) == before, res.output


def test_shard_uses_the_class_map_the_scoring_used(small_demo: Path, tmp_path: Path):
    src = small_demo / "train"
    names = sorted(p.name for p in src.iterdir())[::-1]  # reversed: labels differ from sorted order
    class_map = tmp_path / "classes.txt"
    class_map.write_text("\n".join(names) + "\n")
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=4)
    run_score(ScoreConfig(str(src), tmp_path / "s", checkpoint=ckpt, class_map=class_map, workers=0,
                          progress=False))
    res = run_shard(ShardConfig(str(src), (tmp_path / "s",), tmp_path / "o", SelectConfig(keep=1.0), progress=False))
    first = names[0]
    assert res.selection.filter(pl.col("class_name") == first)["label"].unique().to_list() == [0]
    assert verify(tmp_path / "o") == []


def test_epoch_cost_counts_only_readable_inputs():
    sel = pl.DataFrame({"kept": [True, True, False, False], "reason": ["kept", "kept", "pruned", "error"]})
    assert "~0.67x one over all 3 readable inputs (2 samples)" in epoch_cost_line(sel)


def test_max_side_ships_smaller_images_that_train_and_verify(scored, small_demo: Path, tmp_path: Path):
    """--max-side below the demo's 64 px re-encodes every image; above it keeps the original bytes."""
    src, cnn, vit = scored
    common = dict(select=SelectConfig(keep=0.5), dedup=None, val=str(small_demo / "val"), samples_per_shard=16,
                  progress=False)
    small = run_shard(ShardConfig(str(src), (cnn, vit), tmp_path / "small", max_side=48, quality=85, **common))
    same = run_shard(ShardConfig(str(src), (cnn, vit), tmp_path / "same", max_side=128, **common))
    assert small.manifest["images"] == {"max_side": 48, "quality": 85}
    for out in (tmp_path / "small", tmp_path / "same"):
        assert verify(out) == []
    urls = sorted(str(p) for p in (tmp_path / "small").glob("*.tar"))
    n = 0
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
        assert s["jpg"].size == (48, 48) and s["json"]["original_size"] == [64, 64]
        assert s["json"]["stored"] == "reduced"
        assert s.get("importance.npy") is None or s["importance.npy"].shape == (8, 8)  # maps unchanged
        n += 1
    assert n == 48 + 16  # train and validation
    for path in (tmp_path / "same").glob("train-*.tar"):
        for raw in read_samples(path):
            meta = json.loads(raw["json"])
            assert meta["stored"] == "original" and raw["jpg"] == (src / meta["source"]).read_bytes()
    sizes = {name: sum(p.stat().st_size for p in (tmp_path / name).glob("train-*.tar")) for name in ("small", "same")}
    assert sizes["small"] < sizes["same"]
    assert "below --img-size 64" in resolution_warning(tmp_path / "small", 64)  # crops would be upsampled
    assert resolution_warning(tmp_path / "small", 48) == resolution_warning(tmp_path / "same", 64) == ""
    manifest = json.loads((tmp_path / "same" / "manifest.json").read_text())
    manifest["images"]["max_side"] = "big"  # a hand-edited manifest: a fault, not a crash
    (tmp_path / "same" / "manifest.json").write_text(json.dumps(manifest))
    assert verify(tmp_path / "same") == ["manifest.json: images.max_side 'big' is not a size in pixels"]
    res = CliRunner().invoke(main, ["shard", str(src), "--scores", str(vit), "--out", str(tmp_path / "x"),
                                    "--max-side", "4"])
    assert res.exit_code != 0 and "--max-side" in res.output


def test_keep_as_a_percentage_and_a_misspelt_by_column_get_answers(scored, tmp_path: Path):
    src, cnn, _ = scored
    runner = CliRunner()
    res = runner.invoke(main, ["shard", str(src), "--scores", str(cnn), "--out", str(tmp_path / "o"), "--keep",
                               "75%", "--dry-run", "--no-dedup"])
    assert res.exit_code == 0 and "96 inputs: kept 72, pruned 24" in res.output, res.output
    res = runner.invoke(main, ["shard", str(src), "--scores", str(cnn), "--out", str(tmp_path / "o"), "--keep",
                               "most", "--dry-run"])
    assert res.exit_code != 0 and "a percentage (70%)" in res.output
    res = runner.invoke(main, ["shard", str(src), "--scores", str(cnn), "--out", str(tmp_path / "o"), "--by",
                               "el2m", "--dry-run"])
    assert res.exit_code != 0 and "did you mean 'el2n' for 'el2m'?" in res.output, res.output


def test_the_readmes_polars_snippet_runs_on_a_cnn_table_and_a_vit_table(scored, capsys):
    text = (ROOT / "README.md").read_text()
    snippet = text[text.index("```python\nimport numpy as np, polars as pl"):].split("```")[1].removeprefix("python\n")
    for scores in scored[1:]:
        env: dict = {}
        exec(snippet.replace('"scores/*.parquet"', repr(f"{scores}/*.parquet")), env)
        assert env["df"].height == 96 and "el2n" in capsys.readouterr().out
        assert (env["maps"].height > 0) == (scores.name == "demo-vit")
        if env["maps"].height:
            assert env["grid"].shape == (8, 8)
