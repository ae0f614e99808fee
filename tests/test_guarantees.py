"""The same guarantees in every command (tests/test_hostile.py has the inputs of `score` and
`shard`): `curate predict` under the output and input rules, `curate verify` and `curate train`
refusing the same broken shards before any training, no sample dropped without a word, and
settings checked before the first write."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

import polars as pl
import pytest
import torch
from click.testing import CliRunner

from cli import main
from curate.shard.verify import verify

from .conftest import ROOT, jpeg_bytes
from .sparse_fixtures import CLASS_NAMES, write_shards
from .test_score_job import random_checkpoint

TINY = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=2", "--img-size", "64", "--patch-size", "8",
        "--batch-size", "8", "--lr", "0.05", "--quiet"]
SECRET = "hunter2-the-users-secret"


def _cli(*args: str) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(res: object, *needles: str) -> None:
    """Failed with a message, not a traceback, and the message says what it should."""
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    for needle in needles:
        assert needle in res.output, res.output


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch `curate train` run on toy shards that record their class names."""
    tmp = tmp_path_factory.mktemp("run")
    toy = write_shards(tmp / "toy", per_class=4)
    res = _cli("train", toy, "--out", tmp / "run", *TINY, "--epochs", "1", "--workers", "0")
    assert res.exit_code == 0, res.output
    return tmp / "run"


def image_folder(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"img{i}.jpg").write_bytes(jpeg_bytes((40 * i, 200, 30), (64, 64)))
    return root


# --- curate predict: outputs ----------------------------------------------------------------


def test_predict_never_overwrites_a_file_without_being_asked_and_never_an_input(run: Path, tmp_path: Path):
    images = image_folder(tmp_path / "images")
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    before = (images / "img0.jpg").read_bytes()
    for option, target, extra in (("--out", precious, ()), ("--export", precious, ()),
                                  ("--out", images / "img0.jpg", ("--overwrite",)),
                                  ("--export", images / "img0.jpg", ("--overwrite",)),
                                  ("--out", images / "new.parquet", ("--overwrite",)),
                                  ("--out", run / "checkpoint.pt", ("--overwrite",))):
        res = _cli("predict", run, images, option, target, "--workers", "0", *extra)
        _one_line_error(res, option)
    assert precious.read_text() == "mine" and (images / "img0.jpg").read_bytes() == before
    assert not (images / "new.parquet").exists()
    res = _cli("predict", run, images, "--out", precious, "--workers", "0", "--overwrite")
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(precious).height == 3  # asked for: replaced


def test_predict_checks_its_output_paths_before_any_work(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    images = image_folder(tmp_path / "images")
    (tmp_path / "adir").mkdir()
    monkeypatch.chdir(tmp_path)
    from sparsevit import predict as pred

    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(pred, "deployed", no_work)
    for args, needle in ((("--out", tmp_path / "nodir" / "p.parquet"), "does not exist"),
                         (("--out", tmp_path / "adir"), "is a folder"),
                         (("--out", "adir"), "is a folder"),
                         (("--export", tmp_path / "nodir" / "m.pt2"), "does not exist")):
        _one_line_error(_cli("predict", run, images, *args), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "images"]  # no .tmp left anywhere


# --- curate predict: inputs -----------------------------------------------------------------


def hostile_images(tmp_path: Path) -> Path:
    images = image_folder(tmp_path / "images", n=2)
    (tmp_path / "secret.txt").write_text(SECRET)
    (images / "x.jpg").symlink_to(tmp_path / "secret.txt")  # leaves the folder
    (images / "notes.jpg").write_text(SECRET)  # inside it, but text
    os.mkfifo(images / "fifo.jpg")
    (images / "zero.jpg").symlink_to("/dev/zero")
    with open(images / "huge.jpg", "wb") as f:  # sparse: 1 GiB + 1 on disk costs nothing
        f.truncate((1 << 30) + 1)
    (images / b"caf\xe9.jpg".decode("utf-8", "surrogateescape")).write_bytes(jpeg_bytes((10, 10, 200), (64, 64)))
    return images


def test_predict_reads_images_by_the_rules_of_score(run: Path, tmp_path: Path):
    images, out = hostile_images(tmp_path), tmp_path / "p.parquet"
    cmd = [sys.executable, str(ROOT / "cli.py"), "predict", str(run), str(images), "--out", str(out), "--workers", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # a FIFO must not hang it
    assert proc.returncode == 0, proc.stderr
    table = pl.read_parquet(out)
    rows = {Path(p).name: (label, err) for p, label, err in table.select("path", "label", "error").iter_rows()}
    assert table.height == 8 and len(rows) == 8  # one row per file
    assert rows["x.jpg"][1].endswith("not read (pass --allow-root DIR to read files there)")
    assert "not a regular file" in rows["fifo.jpg"][1] and "outside the folder" in rows["zero.jpg"][1]
    assert "more than the" in rows["huge.jpg"][1] and "bytes of text" in rows["notes.jpg"][1]
    assert rows["caf\\xe9.jpg"][1] == "" and rows["caf\\xe9.jpg"][0] is not None  # escaped, and predicted
    assert all(rows[f"img{i}.jpg"][1] == "" for i in range(2))
    everything = "\n".join(map(str, table.to_dicts())) + proc.stdout + proc.stderr
    assert SECRET not in everything and "hunter2" not in everything
    res = _cli("predict", run, images, "--out", tmp_path / "q.parquet", "--workers", "0", "--allow-root", tmp_path)
    assert res.exit_code == 0, res.output
    allowed = pl.read_parquet(tmp_path / "q.parquet").filter(pl.col("path").str.ends_with("/x.jpg"))
    assert "bytes of text" in allowed["error"].item() and SECRET not in allowed["error"].item()


def test_predictions_name_their_class(run: Path, tmp_path: Path):
    images = image_folder(tmp_path / "images")
    assert _cli("predict", run, images, "--out", tmp_path / "p.parquet", "--workers", "0").exit_code == 0
    table = pl.read_parquet(tmp_path / "p.parquet")
    assert table["class_name"].to_list() == [CLASS_NAMES[i] for i in table["label"].to_list()]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["class_names"] == list(CLASS_NAMES)


def _tampered_checkpoint(run: Path, path: Path, edit: Callable[[dict], None]) -> Path:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


@pytest.mark.parametrize("name,edit,needle", [
    ("img_size", lambda s: s["config"].update(img_size=100000), "img_size must be an integer from 8 to 4096"),
    ("keep", lambda s: s["config"].update(keep=5), "keep ratios must be in (0, 1], got 5"),
    ("patch_size", lambda s: s["config"].update(patch_size=0), "patch_size must be an integer that divides"),
    ("embed_dim", lambda s: s["config"]["model_kwargs"].update(embed_dim=3 * 10 ** 6), "do not fit the model"),
    ("heads", lambda s: s["config"]["model_kwargs"].update(embed_dim=10 ** 6), "timm refuses"),
    ("sparse", lambda s: s["config"].update(sparse="dense"), "sparse and model_kwargs must be objects"),
    ("weights", lambda s: s["model"].pop("head.weight"), "no classifier head"),
])
def test_a_damaged_checkpoint_is_refused_before_a_model_is_allocated(run: Path, tmp_path: Path, name: str,
                                                                     edit: Callable[[dict], None], needle: str):
    bad = _tampered_checkpoint(run, tmp_path / f"{name}.pt", edit)
    _one_line_error(_cli("predict", bad, image_folder(tmp_path / "im"), "--out", tmp_path / "p.parquet"), needle)
    assert not (tmp_path / "p.parquet").exists()


def test_a_checkpoint_that_is_not_one_is_a_message(run: Path, tmp_path: Path):
    for i, text in enumerate(("hello, not a checkpoint\n", "not a checkpoint\n")):  # KeyError, UnpicklingError
        (tmp_path / "text.pt").write_text(text)
        _one_line_error(_cli("predict", tmp_path / "text.pt", image_folder(tmp_path / f"im{i}"), "--out",
                             tmp_path / "p.parquet"), "not a torch checkpoint")


# --- verify and train refuse the same shards --------------------------------------------------


def _resign(shards: Path) -> None:
    """Make the indexes agree with the tars again (sha256, bytes): what a careless tool that
    rewrites shards would leave, and what only a content check can catch."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for part in manifest["splits"].values():
        for entry in part["shards"]:
            data = (shards / entry["filename"]).read_bytes()
            entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (shards / "manifest.json").write_text(json.dumps(manifest))


def _rewrite_tar(path: Path, edit: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]) -> None:
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    with tarfile.open(path, "w") as tf:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _set_first_cls(value: bytes) -> Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]:
    def edit(members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        first = next(i for i, (n, _) in enumerate(members) if n.endswith(".cls"))
        return [(n, value if i == first else d) for i, (n, d) in enumerate(members)]
    return edit


def _edit_indexes(shards: Path, edit: Callable[[dict, dict], None]) -> None:
    manifest, info = (json.loads((shards / n).read_text()) for n in ("manifest.json", "_info.json"))
    edit(manifest, info)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    (shards / "_info.json").write_text(json.dumps(info))


def _shift_count(delta: int) -> Callable[[dict, dict], None]:
    def edit(manifest: dict, info: dict) -> None:
        manifest["splits"]["train"]["shards"][0]["count"] += delta
        manifest["splits"]["train"]["num_samples"] += delta
        info["splits"]["train"]["shard_lengths"][0] += delta
        info["splits"]["train"]["num_samples"] += delta
    return edit


def broken(kind: str, shards: Path) -> str:
    """Break `shards` one way; returns what the messages must name."""
    first = sorted(shards.glob("train-*.tar"))[0]
    if kind.startswith("cls"):
        _rewrite_tar(first, _set_first_cls(kind.split("=")[1].encode()))
        _resign(shards)
        return first.name
    if kind.startswith("num_classes"):
        value = json.loads(kind.split("=")[1])
        _edit_indexes(shards, lambda m, i: m.update(num_classes=value))
        return "num_classes"
    if kind.startswith("count"):
        _edit_indexes(shards, _shift_count(int(kind.split("=")[1])))
        return first.name
    assert kind == "duplicate"
    second = sorted(shards.glob("train-*.tar"))[1]
    with tarfile.open(first) as tf:
        key = tf.getmembers()[0].name.split(".")[0]
        sample = [(m.name, tf.extractfile(m).read()) for m in tf if m.name.split(".")[0] == key]
    _rewrite_tar(second, lambda members: members + sample)

    def one_more(manifest: dict, info: dict) -> None:
        manifest["splits"]["train"]["shards"][1]["count"] += 1
        manifest["splits"]["train"]["num_samples"] += 1
        info["splits"]["train"]["shard_lengths"][1] += 1
        info["splits"]["train"]["num_samples"] += 1
    _edit_indexes(shards, one_more)
    _resign(shards)
    return key


@pytest.mark.parametrize("kind", ["cls=1000000000000", "cls=-1", "cls=-100", "cls=4", "num_classes=0",
                                  "num_classes=-1", "num_classes=1000000000", 'num_classes="three"', "count=50",
                                  "count=-2", "duplicate"])
def test_verify_and_train_refuse_what_would_break_training(tmp_path: Path, kind: str):
    shards = write_shards(tmp_path / "toy", per_class=4, multiple=2, per_shard=4)
    named = broken(kind, shards)
    faults = verify(shards)
    assert faults and any(named in f for f in faults), faults
    res = _cli("train", shards, "--out", tmp_path / "run", *TINY, "--epochs", "1", "--workers", "0")
    _one_line_error(res, named)
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "run").exists()  # refused before the run folder, let alone training


# --- no sample dropped without a word -----------------------------------------------------------


def test_an_epoch_trains_every_sample_but_less_than_a_batch(tmp_path: Path):
    shards = write_shards(tmp_path / "toy", per_class=8, multiple=2, per_shard=7, train_samples=25,
                          corrupt=lambda key: key == "train-0-0003")
    res = CliRunner().invoke(main, ["train", str(shards), "--out", str(tmp_path / "run"),
                                                   *TINY[:-1], "--epochs", "2", "--workers", "2"])
    assert res.exit_code == 0, res.output + res.stderr
    epochs = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "epoch"]
    for e in epochs:  # 25 samples, batch 8: 3 batches (24 samples, one of them undecodable), 1 unused
        assert e["unused"] == 1 and e["images"] == 23 and e["skipped"] == 1, e
        assert e["images"] + e["skipped"] + e["unused"] == 25
    assert "each epoch trains 24 of 25 samples; 1 unused: they do not fill a last batch of 8" in res.stderr
    assert "1 skipped (undecodable; keys in metrics.jsonl), 1 unused" in res.stderr
    assert "trained 2 epochs" in res.stdout and f"checkpoint {tmp_path / 'run' / 'checkpoint.pt'}" in res.stdout
    assert f"next: curate predict {tmp_path / 'run'}" in res.stdout


# --- settings checked before the first write ------------------------------------------------------


@pytest.mark.parametrize("size", ["1", "0", "100000"])
def test_score_image_size_is_checked_before_anything_is_written(small_demo: Path, tmp_path: Path, size: str):
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=4)
    res = _cli("score", small_demo / "train", "--out", tmp_path / "s", "--checkpoint", ckpt, "--image-size", size,
               "--quiet")
    _one_line_error(res, "--image-size must be from 8 to 4096")
    assert not (tmp_path / "s").exists()


def test_score_folds_are_checked_against_the_smallest_class(small_demo: Path, tmp_path: Path):
    res = _cli("score", small_demo / "train", "--out", tmp_path / "s", "--train-epochs", "1", "--folds", "30",
               "--quiet")
    _one_line_error(res, "--folds 30: class", "so some folds would hold out none of it")
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def scored(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("scored")
    ckpt = random_checkpoint(tmp / "w.pt", classes=4)
    res = _cli("score", small_demo / "train", "--out", tmp / "s", "--checkpoint", ckpt, "--workers", "0", "--quiet")
    assert res.exit_code == 0, res.output
    return tmp / "s"


@pytest.mark.parametrize("keep,needle", [("2.0", "for a count of 2 write 2"), ("-1", "not a fraction in (0, 1]"),
                                         ("0", "a count keeps at least 1"), ("lots", "a whole count >= 1")])
def test_shard_keep_forms_are_told_apart(small_demo: Path, scored: Path, tmp_path: Path, keep: str, needle: str):
    res = _cli("shard", small_demo / "train", "--scores", scored, "--out", tmp_path / "o", "--keep", keep, "--dry-run")
    _one_line_error(res, needle)


def test_shard_keep_1_is_a_count_of_one(small_demo: Path, scored: Path, tmp_path: Path):
    res = CliRunner().invoke(main, ["shard", str(small_demo / "train"), "--scores", str(scored),
                                                   "--out", str(tmp_path / "o"), "--keep", "1", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "kept 1" in res.stderr, res.stderr


@pytest.mark.parametrize("column", ["key", "class_name", "embedding", "importance"])
def test_shard_by_a_column_that_is_no_score_is_a_message(small_demo: Path, scored: Path, tmp_path: Path, column: str):
    res = _cli("shard", small_demo / "train", "--scores", scored, "--out", tmp_path / "o", "--by", column, "--dry-run")
    _one_line_error(res, f"--by {column}", "not a numeric score")


def test_a_folder_of_the_wrong_kind_is_named_as_what_it_is(small_demo: Path, scored: Path, tmp_path: Path):
    _one_line_error(_cli("train", scored, "--out", tmp_path / "run"),
                    "is the output of `curate score`, not of `curate shard`")
    shards = tmp_path / "shards"
    assert _cli("shard", small_demo / "train", "--scores", scored, "--out", shards, "--quiet").exit_code == 0
    _one_line_error(_cli("shard", small_demo / "train", "--scores", shards, "--out", tmp_path / "o"),
                    "is the output of `curate shard`, not of `curate score`")
