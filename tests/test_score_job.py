"""`curate score` end to end: every input one row, bad files as error rows, kill and resume."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from cli import main
from curate.common.runfolder import RunFolderError
from curate.score.job import ScoreConfig, run_score
from curate.score.proxies import create_model, resolve_recipe
from curate.score.table import SCHEMA_VERSION, importance_from_bytes, read_schema_version

from .conftest import ROOT, jpeg_bytes

SCORE_COLUMNS = ["loss", "margin", "el2n", "entropy", "pred", "confidence", "forgetting", "el2n_mean",
                 "margin_mean"]


def random_checkpoint(path: Path, classes: int, proxy: str = "demo-vit") -> Path:
    torch.manual_seed(0)
    torch.save(create_model(resolve_recipe(proxy), classes).state_dict(), path)
    return path


def read(out: Path) -> pl.DataFrame:
    return pl.scan_parquet(out / "*.parquet").collect().sort("key")


def _png(mode: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    if mode == "I;16":
        arr = np.linspace(0, 65535, 24 * 16, dtype=np.uint16).reshape(16, 24)
        Image.fromarray(arr).save(buf, "PNG")
    else:
        Image.new(mode, (24, 16), **kw).save(buf, "PNG", **({"transparency": 0} if mode == "P" else {}))
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    img = Image.new("RGB", (40, 30), (20, 200, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display: reported size becomes 30 x 40
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture()
def messy_folder(tmp_path: Path) -> Path:
    """Every kind of trouble a real crawl has, in two classes."""
    root = tmp_path / "messy"
    good, bad = root / "good", root / "bad"
    good.mkdir(parents=True), bad.mkdir()
    full = jpeg_bytes()
    files = {
        good / "a.b.c.JPEG": full, good / "with space.jpg": full, good / "ünïcødé name.jpg": full,
        good / "cmyk.jpg": jpeg_bytes(mode="CMYK"), good / "gray.png": _png("L", color=90),
        good / "palette.png": _png("P", color=3), good / "sixteen.png": _png("I;16"),
        good / "rotated.jpg": _rotated_jpeg(),
        bad / "truncated.jpg": full[: len(full) // 2], bad / "empty.jpg": b"",
        bad / "notes.txt": b"not an image at all\n", bad / "fine.jpg": full,
    }
    for path, data in files.items():
        path.write_bytes(data)
    return root


def test_messy_folder_every_file_is_one_row(messy_folder: Path, tmp_path: Path):
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=2)
    out = tmp_path / "scores"
    run_score(ScoreConfig(str(messy_folder), out, checkpoint=ckpt, workers=0, progress=False))
    df = read(out)
    assert len(df) == 12 and df["key"].n_unique() == 12
    assert df["key"].str.contains(r"^[A-Za-z0-9_-]{1,80}$").all()
    errors = dict(df.filter(pl.col("status") == "error").select("source", "error").iter_rows())
    assert {Path(s).name for s in errors} == {"truncated.jpg", "empty.jpg", "notes.txt"}
    assert errors[str(messy_folder / "bad" / "empty.jpg")] == "empty file"
    assert errors[str(messy_folder / "bad" / "notes.txt")].startswith("not an image")
    assert errors[str(messy_folder / "bad" / "truncated.jpg")].startswith("truncated image")
    ok = df.filter(pl.col("status") == "ok")
    assert ok.select(pl.col(c).is_not_null().all() for c in ["el2n", "loss", "importance", "embedding"]).row(0) \
        == (True, True, True, True)
    rotated = ok.filter(pl.col("source").str.ends_with("rotated.jpg")).row(0, named=True)
    assert (rotated["width"], rotated["height"]) == (30, 40)
    err = df.filter(pl.col("status") == "error")
    assert err.select(pl.col(c).is_null().all() for c in ["el2n", "importance", "embedding"]).row(0) \
        == (True, True, True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 12, "ok": 9, "error": 3, "classes": 2}


def test_table_schema_importance_and_embedding(small_demo: Path, tmp_path: Path):
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=4)
    out = tmp_path / "scores"
    run_score(ScoreConfig(str(small_demo / "train"), out, checkpoint=ckpt, workers=0, progress=False,
                          chunk_size=40))
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3 and all(read_schema_version(p) == SCHEMA_VERSION for p in parts)
    df = read(out)
    assert len(df) == 96 and (df["status"] == "ok").all()
    row = df.row(0, named=True)
    grid = importance_from_bytes(row["importance"], row["importance_h"], row["importance_w"])
    assert grid.shape == (8, 8) and grid.dtype == np.float16
    assert float(grid.astype(np.float32).sum()) == pytest.approx(1.0, abs=1e-2)
    assert df.schema["embedding"] == pl.Array(pl.Float32, 192)
    assert df["forgetting"].is_null().all()  # no dynamics without training here


def test_refuses_non_empty_out_and_resume_with_other_settings(small_demo: Path, tmp_path: Path):
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=4)
    out = tmp_path / "scores"
    cfg = ScoreConfig(str(small_demo / "train"), out, checkpoint=ckpt, workers=0, progress=False)
    run_score(cfg)
    with pytest.raises(RunFolderError, match="--resume"):
        run_score(cfg)
    with pytest.raises(ValueError, match="chunk_size"):
        run_score(ScoreConfig(**{**cfg.__dict__, "resume": True, "chunk_size": 7}))
    again = run_score(ScoreConfig(**{**cfg.__dict__, "resume": True}))
    assert again.parts_written == 0
    with pytest.raises(ValueError, match="exactly one"):
        ScoreConfig(str(small_demo), out, checkpoint=ckpt, train_epochs=2)


def _cli(out: Path, src: Path, *extra: str) -> list[str]:
    # small parts and batch 1 keep the scoring phase long enough to be killed in the middle
    return [sys.executable, str(ROOT / "cli.py"), "score", str(src), "--out", str(out), "--train-epochs", "3",
            "--chunk-size", "4", "--batch-size", "1", "--workers", "0", "--quiet", *extra]


def kill_when(cmd: list[str], path_glob: tuple[Path, str], timeout: float = 120) -> None:
    """Start `cmd` and SIGKILL it the moment a file matching the glob appears."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    folder, pattern = path_glob
    while not any(folder.glob(pattern)):
        assert proc.poll() is None, f"{cmd} exited ({proc.returncode}) before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting to kill"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_in_training_and_in_scoring_then_resume_equals_clean_run(small_demo: Path, tmp_path: Path):
    src = small_demo / "train"
    clean = tmp_path / "clean"
    run_score(ScoreConfig(str(src), clean, train_epochs=3, chunk_size=4, batch_size=1, workers=0, progress=False))

    killed = tmp_path / "killed"
    kill_when(_cli(killed, src), (killed / "proxy", "train-state.pt"))  # after epoch 1 of 3
    assert torch.load(killed / "proxy" / "train-state.pt", weights_only=True)["epoch"] < 3
    assert not list(killed.glob("part-*.parquet"))
    kill_when(_cli(killed, src, "--resume"), (killed, "part-000001.parquet"))  # while scoring
    parts_before = len(list(killed.glob("part-*.parquet")))
    assert 0 < parts_before < 24, "the second kill must land while scoring"
    subprocess.run(_cli(killed, src, "--resume"), cwd=ROOT, check=True)

    a, b = read(clean), read(killed)
    assert a["key"].to_list() == b["key"].to_list() and len(a) == 96
    for col in SCORE_COLUMNS:
        np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), rtol=0, atol=1e-6, err_msg=col)
    assert a["importance"].to_list() == b["importance"].to_list()
    assert a["forgetting"].is_not_null().all()


def test_webdataset_and_list_file_sources(tmp_path: Path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "in-000000.tar")) as sink:
        for i in range(6):
            sink.write({"__key__": f"s{i:03d}", "jpg": jpeg_bytes((40 * i, 10, 10)), "cls": i % 2})
        sink.write({"__key__": "broken", "jpg": b"\xff\xd8\xff garbage", "cls": 1})
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=2)
    run_score(ScoreConfig(str(shards), tmp_path / "a", checkpoint=ckpt, workers=0, progress=False))
    df = read(tmp_path / "a")
    assert len(df) == 7 and df.filter(pl.col("status") == "error")["key"].to_list() == ["broken"]
    assert df.filter(pl.col("key") == "s003")["label"].item() == 1

    for i in range(4):
        (tmp_path / f"img{i}.jpg").write_bytes(jpeg_bytes((10, 60 * i, 10)))
    pl.DataFrame({"path": [f"img{i}.jpg" for i in range(4)] + ["missing.jpg"], "label": [0, 1, 0, 1, 0]}) \
        .write_csv(tmp_path / "list.csv")
    run_score(ScoreConfig(str(tmp_path / "list.csv"), tmp_path / "b", checkpoint=ckpt, workers=0,
                          progress=False))
    df = read(tmp_path / "b")
    assert len(df) == 5
    assert df.filter(pl.col("status") == "error")["error"].item().startswith("read failed")


def test_cli_score_and_inspect_with_plots(small_demo: Path, tmp_path: Path):
    runner = CliRunner()
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=4)
    out = tmp_path / "scores"
    res = runner.invoke(main, ["score", str(small_demo / "train"), "--out", str(out), "--checkpoint", str(ckpt),
                               "--workers", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "scored 96 inputs (96 ok, 0 errors, 4 classes)" in res.output
    res = runner.invoke(main, ["inspect", str(out), "--plots", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    assert "96 inputs, 96 ok, 0 errors, 96 unique keys" in res.output and "per class" in res.output
    for png in ("score_histograms.png", "importance_overlay.png"):
        assert Image.open(tmp_path / "plots" / png).size[0] > 100
    res = runner.invoke(main, ["score", str(small_demo / "train"), "--out", str(out), "--checkpoint", str(ckpt)])
    assert res.exit_code != 0 and "--resume" in res.output
    res = runner.invoke(main, ["score", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--train-epochs", "1"])
    assert res.exit_code != 0 and "does not exist" in res.output


def test_a_failed_start_writes_nothing_and_overwrite_keeps_the_users_files(small_demo: Path, tmp_path: Path):
    runner = CliRunner()
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=4)
    src = str(small_demo / "train")
    out = tmp_path / "scores"
    for wrong in (["--checkpoint", str(ckpt), "--device", "cuda:7"], ["--proxy", "demo-vti", "--train-epochs", "1"],
                  ["--checkpoint", str(random_checkpoint(tmp_path / "w3.pt", classes=3))]):
        res = runner.invoke(main, ["score", src, "--out", str(out), "--workers", "0", "--quiet", *wrong])
        assert res.exit_code != 0 and not out.exists(), res.output  # the corrected rerun finds nothing in its way
    mine = tmp_path / "mine"
    (mine / "proxy").mkdir(parents=True)
    for name in ("manifest.json", "config.json", "part-000000.parquet", "proxy/model.pt"):
        (mine / name).write_text("the user's")
    res = runner.invoke(main, ["score", src, "--out", str(mine), "--checkpoint", str(ckpt), "--overwrite"])
    assert res.exit_code != 0 and "holds no curate run" in res.output
    assert all((mine / n).read_text() == "the user's" for n in ("manifest.json", "config.json", "proxy/model.pt"))
    res = runner.invoke(main, ["score", src, "--out", str(small_demo / "train" / "scores"), "--checkpoint",
                               str(ckpt)])
    assert res.exit_code != 0 and "input folder" in res.output and not (small_demo / "train" / "scores").exists()


def test_proxy_health_is_recorded_printed_and_a_proxy_near_chance_is_called_out(small_demo: Path, tmp_path: Path):
    out = tmp_path / "scores"
    res = CliRunner().invoke(main, ["score", str(small_demo / "train"), "--out", str(out), "--proxy", "demo-cnn",
                                    "--train-epochs", "1", "--workers", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    (epoch,) = json.loads((out / "manifest.json").read_text())["proxy"]["training"]["history"]
    assert epoch["epoch"] == 1 and epoch["loss"] > 0 and 0 <= epoch["accuracy"] <= 1
    assert "proxy training (loss / accuracy per epoch, given labels): 1: " in res.output
    # one step of training on 96 images of 4 classes: near chance, and said so with what to do
    assert epoch["accuracy"] < 0.5 and "near chance (25.0% for 4 classes)" in res.output
    assert "curate proxies" in res.output


def test_health_warning_thresholds():
    from curate.score.proxy_training import health_warning

    assert health_warning([{"epoch": 1, "loss": 2.0, "accuracy": 0.16}], 8, "p")  # 2x chance is 0.25
    assert not health_warning([{"epoch": 1, "loss": 2.0, "accuracy": 0.26}], 8, "p")
    assert health_warning([{"epoch": 1, "loss": 0.6, "accuracy": 0.70}], 2, "p")  # binary: chance + 0.25
    assert not health_warning([{"epoch": 1, "loss": 0.4, "accuracy": 0.80}], 2, "p")
    assert not health_warning([], 8, "p")  # nothing trained here: nothing to judge


def test_dry_run_lists_classes_and_a_dataset_root_is_called_out(small_demo: Path, tmp_path: Path):
    res = CliRunner().invoke(main, ["score", str(small_demo / "train"), "--out", str(tmp_path / "o"),
                                    "--train-epochs", "1", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "96 inputs in 4 classes" in res.stdout and "circle" in res.stdout and not (tmp_path / "o").exists()
    assert "warning" not in res.stderr
    # SOURCE one level too high: its "classes" are the splits
    res = CliRunner().invoke(main, ["score", str(small_demo), "--out", str(tmp_path / "o"), "--train-epochs", "1",
                                    "--dry-run"])
    assert res.exit_code == 0 and "looks like a dataset root" in res.stderr and "train, val" in res.stderr
    assert f"score {small_demo / 'train'}" in res.stderr and not (tmp_path / "o").exists()


def _maps(out: Path) -> list[np.ndarray]:
    df = read(out)
    return [importance_from_bytes(r["importance"], r["importance_h"], r["importance_w"])
            for r in df.iter_rows(named=True)]


def test_cli_image_size_and_importance_blocks_reach_the_model_and_the_maps(small_demo: Path, tmp_path: Path):
    """--image-size sizes the proxy's input (so its patch grid and maps); --importance-blocks picks
    the blocks the maps come from and nothing else."""
    torch.manual_seed(0)
    ckpt = tmp_path / "w32.pt"  # weights for 32 px inputs: a 64 px model would not load them
    torch.save(create_model(resolve_recipe("demo-vit", 32), 4).state_dict(), ckpt)
    runs = {}
    for blocks in ("0", "-1"):
        out = tmp_path / f"blocks{blocks}"
        res = CliRunner().invoke(main, ["score", str(small_demo / "train"), "--out", str(out), "--checkpoint",
                                        str(ckpt), "--image-size", "32", "--importance-blocks", blocks,
                                        "--workers", "0", "--quiet"])
        assert res.exit_code == 0, res.output
        runs[blocks] = json.loads((out / "manifest.json").read_text())["proxy"], read(out), _maps(out)
    (first, df0, maps0), (last, df1, maps1) = runs["0"], runs["-1"]
    assert first["recipe"]["img_size"] == 32 and first["recipe"]["model_kwargs"]["img_size"] == 32
    assert first["importance"] == {"method": "cls", "blocks": [0], "grid": [4, 4], "flip_tta": False}  # 32 / patch 8
    assert last["importance"]["blocks"] == [3]  # -1: the last of 4 blocks
    assert all(m.shape == (4, 4) for m in maps0 + maps1) and len(maps0) == 96
    assert not all(np.array_equal(a, b) for a, b in zip(maps0, maps1))  # other blocks, other maps
    assert df0["loss"].to_list() == df1["loss"].to_list()  # same model: same scores


def test_one_class_is_refused_before_out_is_touched(tmp_path: Path):
    root = tmp_path / "one"
    (root / "only").mkdir(parents=True)
    for i in range(3):
        (root / "only" / f"{i}.jpg").write_bytes(jpeg_bytes())
    with pytest.raises(ValueError, match="at least 2 classes.*largest label \\+ 1 = 1 is not a class count"):
        run_score(ScoreConfig(str(root), tmp_path / "out", train_epochs=1, workers=0, progress=False))
    assert not (tmp_path / "out").exists()


def test_inspect_reads_tar_members_and_files_with_a_hash_in_their_name(tmp_path: Path):
    from curate.score.inspect import thumbnail

    (tmp_path / "a#b.jpg").write_bytes(jpeg_bytes())
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "k", "jpg": jpeg_bytes()})
    assert thumbnail(str(tmp_path / "a#b.jpg"), 16).shape == (16, 16, 3)  # a "#" in a file name is no tar
    assert thumbnail(f"{tmp_path / 's.tar'}#k.jpg", 16).shape == (16, 16, 3)
    assert thumbnail(f"{tmp_path / 's.tar'}#gone.jpg", 16) is None
