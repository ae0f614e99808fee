"""Hostile inputs: nothing is read that was not asked for, every input ends as a row or a clear
message, and no damaged table, index or map is trusted. (Output safety: tests/test_runfolder.py.)"""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from curate.common.runfolder import RunFolder
from curate.ingest.sources import SourceError, index_sha256, open_source
from curate.score.table import importance_to_bytes
from curate.shard.format import FormatError, read_split
from curate.shard.verify import verify

from .conftest import ROOT
from .sparse_fixtures import write_shards
from .test_score_job import random_checkpoint

SECRET = "hunter2-the-users-secret"


def _jpeg(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _score(src: Path, out: Path, ckpt: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`curate score` in its own process, with a timeout: an input that blocks fails the test
    instead of hanging it."""
    cmd = [sys.executable, str(ROOT / "cli.py"), "score", str(src), "--out", str(out), "--checkpoint", str(ckpt),
           "--workers", "0", "--quiet", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _table(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(out.glob("part-*.parquet")))


def _everything_as_text(out: Path) -> str:
    """Every value of every column of the table, and every JSON file of the run, as one text."""
    df = _table(out)
    text = [str(v) for col in df.columns for v in df[col].to_list()]
    text += [p.read_text() for p in out.glob("*.json")]
    return "\n".join(text)


# --- list files name only what they may ----------------------------------------------------


@pytest.fixture()
def hostile_list(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(8):
        (data / f"ok{i}.jpg").write_bytes(_jpeg((200, 30, 30) if i % 2 else (30, 30, 200)))
        rows.append((f"ok{i}.jpg", i % 2))
    os.mkfifo(data / "pipe.jpg")  # inside the folder, but nobody ever writes to it
    (data / "zero.jpg").symlink_to("/dev/zero")  # inside the folder, endless
    (tmp_path / "secret.txt").write_text(SECRET)
    (data / "link-to-secret.jpg").symlink_to(tmp_path / "secret.txt")
    rows += [("pipe.jpg", 0), ("zero.jpg", 1), ("/etc/shadow", 0), ("/proc/self/environ", 1), ("../secret.txt", 0),
             ("link-to-secret.jpg", 1), ("/dev/zero", 0)]
    pl.DataFrame({"path": [r[0] for r in rows], "label": [r[1] for r in rows]}).write_csv(data / "list.csv")
    return data / "list.csv"


def test_a_list_file_cannot_make_curate_read_devices_fifos_or_files_outside_its_folder(hostile_list: Path,
                                                                                        tmp_path: Path):
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=2)
    res = _score(hostile_list, tmp_path / "s", ckpt, timeout=120)  # the FIFO must not block: it is not opened to wait
    assert res.returncode == 0, res.stderr
    df = _table(tmp_path / "s").sort("key")
    errors = dict(df.filter(pl.col("status") == "error").select("source", "error").iter_rows())
    assert len(df) == 15 and len(errors) == 7
    assert "not a regular file" in errors[str(hostile_list.parent / "pipe.jpg")]
    for outside in ("/etc/shadow", "/proc/self/environ", str(tmp_path / "secret.txt"), "/dev/zero",
                    str(hostile_list.parent / "zero.jpg"), str(hostile_list.parent / "link-to-secret.jpg")):
        assert "outside the list file's folder" in errors[outside], outside
    assert df.filter(pl.col("status") == "error")["num_bytes"].to_list() == [0] * 7  # nothing of them was read
    assert SECRET not in _everything_as_text(tmp_path / "s")
    assert os.environ.get("PATH", "") not in _everything_as_text(tmp_path / "s")  # nothing of /proc/self/environ


def test_allow_root_opens_a_folder_outside_the_list_on_purpose(hostile_list: Path, tmp_path: Path):
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=2)
    res = _score(hostile_list, tmp_path / "s", ckpt, "--allow-root", str(tmp_path))
    assert res.returncode == 0, res.stderr
    row = _table(tmp_path / "s").filter(pl.col("source") == str(tmp_path / "secret.txt")).row(0, named=True)
    assert row["status"] == "error" and row["error"].startswith("not an image")  # read, as asked, and refused


# --- ImageFolder oddities each become a row -------------------------------------------------


def test_image_folder_fifos_device_links_loops_and_non_utf8_names_are_rows(tmp_path: Path):
    root = tmp_path / "folder"
    for cls, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.jpg").write_bytes(_jpeg(colour))
    os.mkfifo(root / "a" / "pipe.jpg")
    (root / "a" / "zero.jpg").symlink_to("/dev/zero")
    (root / "b" / "loop.jpg").symlink_to(root / "b" / "loop.jpg")  # ELOOP
    (root / "loop-class").symlink_to(root / "loop-class")  # a class-level loop is no class
    odd = os.fsencode(str(root / "b")) + b"/caf\xe9.jpg"  # Latin-1 bytes: not UTF-8
    with open(odd, "wb") as f:
        f.write(_jpeg((30, 30, 200)))
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=2)
    res = _score(root, tmp_path / "s", ckpt, timeout=120)
    assert res.returncode == 0, res.stderr
    df = _table(tmp_path / "s")
    by_name = {Path(s).name: (st, e) for s, st, e in df.select("source", "status", "error").iter_rows()}
    assert len(df) == 10
    assert "not a regular file" in by_name["pipe.jpg"][1] and "not a regular file" in by_name["zero.jpg"][1]
    assert "symbolic links" in by_name["loop.jpg"][1]
    assert by_name["caf\\xe9.jpg"][0] == "ok"  # scored; its name shown with an escape


# --- labels -----------------------------------------------------------------------------------


def test_labels_must_be_integers_below_the_ceiling(tmp_path: Path):
    for name in ("x.jpg", "y.jpg"):
        (tmp_path / name).write_bytes(_jpeg((1, 2, 3)))
    for labels, match in (([0.5, 1.5], "Float64"), ([True, False], "Boolean"),
                          ([0, 20_000_000], "max-classes 100000")):
        path = tmp_path / "list.parquet"
        pl.DataFrame({"path": ["x.jpg", "y.jpg"], "label": labels}).write_parquet(path)
        with pytest.raises(SourceError, match=match):
            open_source(path)
    assert len(open_source(path, max_classes=30_000_000)) == 2  # a real 20M-class problem can say so


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_samples_without_a_usable_label_are_error_rows_that_shard_leaves_out(tmp_path: Path):
    img = _jpeg((200, 30, 30))
    members = [(f"s{i}.jpg", img) for i in range(6)] + [(f"s{i}.cls", str(i % 2).encode()) for i in range(6)]
    members.sort(key=lambda m: m[0])
    members += [("t0.jpg", img), ("t1.jpg", img), ("t1.cls", b"-3"), ("t2.jpg", img), ("t2.cls", b""),
                ("t3.jpg", img), ("t3.cls", b"seven")]
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "a.tar", members)
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=2)
    assert _score(shards, tmp_path / "s", ckpt).returncode == 0
    df = _table(tmp_path / "s")
    bad = dict(df.filter(pl.col("key").str.starts_with("t")).select("key", "error").iter_rows())
    assert set(bad) == {"t0", "t1", "t2", "t3"} and all(bad.values())
    assert "no label" in bad["t0"] and "no label" in bad["t1"] and "not an ASCII integer" in bad["t3"]
    res = CliRunner().invoke(main, ["shard", str(shards), "--scores", str(tmp_path / "s"), "--out",
                                    str(tmp_path / "o"), "--keep", "1.0", "--no-dedup", "--quiet",
                                    "--samples-per-shard", "10"])
    assert res.exit_code == 0, res.output
    sel = pl.read_parquet(tmp_path / "o" / "selection.parquet")
    assert sel.filter(pl.col("key").str.starts_with("t"))["reason"].to_list() == ["error"] * 4
    huge = _tar(tmp_path / "huge.tar", [("h.jpg", img), ("h.cls", b"9" * 20)])
    with pytest.raises(SourceError, match="max-classes"):
        open_source(huge)


# --- a cut tar loses nothing silently ---------------------------------------------------------


def test_a_tar_cut_inside_a_member_header_ends_with_an_error_row_for_the_rest(tmp_path: Path):
    img = _jpeg((200, 30, 30))
    members = [m for i in range(24) for m in ((f"s{i:02d}.jpg", img), (f"s{i:02d}.cls", b"1"))]
    whole = _tar(tmp_path / "whole.tar", members).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tf:
        last = [m for m in tf.getmembers() if m.name == "s23.jpg"][0]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:last.offset + 200])  # inside the header of the 24th sample's image
    items = open_source(cut)
    assert len(items) == 24 and [it.key for it in items[:23]] == [f"s{i:02d}" for i in range(23)]
    assert "tar cut or corrupt" in items[23].problem and "lost" in items[23].problem
    assert all(not it.problem for it in items[:23])
    assert len(open_source(tmp_path / "whole.tar")) == 24 and not any(it.problem for it in open_source(
        tmp_path / "whole.tar"))


# --- damaged tables and indexes are refused ---------------------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small ImageFolder scored by a demo-vit with random weights (maps included)."""
    tmp = tmp_path_factory.mktemp("scored")
    for cls, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        (tmp / "src" / cls).mkdir(parents=True)
        for i in range(6):
            (tmp / "src" / cls / f"{i}.jpg").write_bytes(_jpeg(colour, 32 + i))
    ckpt = random_checkpoint(tmp / "w.pt", classes=2)
    assert _score(tmp / "src", tmp / "s", ckpt).returncode == 0
    return tmp / "src", tmp / "s"


def _shard(src: Path, scores: Path, out: Path) -> object:
    return CliRunner().invoke(main, ["shard", str(src), "--scores", str(scores), "--out", str(out), "--keep", "1.0",
                                     "--no-dedup", "--quiet", "--samples-per-shard", "4"])


def _edit_table(scores: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(scores, copy)
    part = sorted(copy.glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(edit(table), part)
    return copy


def test_a_table_of_another_schema_version_is_refused(scored: tuple[Path, Path], tmp_path: Path):
    src, scores = scored
    edited = _edit_table(scores, tmp_path, lambda t: t.replace_schema_metadata({b"schema_version": b"999"}))
    res = _shard(src, edited, tmp_path / "o")
    assert res.exit_code != 0 and "schema_version 999" in res.output and not (tmp_path / "o").exists()
    (sorted(edited.glob("part-*.parquet"))[0]).write_bytes(b"not parquet")
    res = CliRunner().invoke(main, ["inspect", str(edited)])
    assert res.exit_code != 0 and "not a readable Parquet part" in res.output


def _with_column(table, name: str, values: list) -> object:
    i = table.schema.get_field_index(name)
    import pyarrow as pa

    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


def test_maps_whose_size_or_values_disagree_with_the_table_are_refused(scored: tuple[Path, Path], tmp_path: Path):
    src, scores = scored
    n = pq.read_table(sorted(scores.glob("part-*.parquet"))[0]).num_rows
    big = _edit_table(scores, tmp_path / "a", lambda t: _with_column(t, "importance_h", [30000] * n))
    res = _shard(src, big, tmp_path / "o1")
    assert res.exit_code != 0 and "not a patch grid" in res.output
    nan = importance_to_bytes(np.full((8, 8), np.nan, np.float16))
    bad = _edit_table(scores, tmp_path / "b", lambda t: _with_column(t, "importance", [nan] * n))
    res = _shard(src, bad, tmp_path / "o2")
    assert res.exit_code != 0 and "NaN" in res.output


def test_an_image_replaced_after_scoring_is_not_shipped_with_old_scores(scored: tuple[Path, Path], tmp_path: Path):
    src, scores = scored
    copy, edited = tmp_path / "src", tmp_path / "scores"
    shutil.copytree(src, copy)
    shutil.copytree(scores, edited)
    manifest = json.loads((scores / "manifest.json").read_text())
    manifest["index_sha256"] = index_sha256(open_source(copy))  # as if the copy had been scored
    (edited / "manifest.json").write_text(json.dumps(manifest))
    (copy / "a" / "0.jpg").write_bytes(_jpeg((0, 255, 0), 40))  # replaced after scoring
    res = _shard(copy, edited, tmp_path / "o")
    assert res.exit_code != 0 and "changed since it was scored" in res.output


def test_shards_whose_index_points_outside_the_folder_are_refused(tmp_path: Path):
    shards = write_shards(tmp_path / "toy")
    (tmp_path / "x.tar").write_bytes((shards / "train-000000.tar").read_bytes())
    manifest = json.loads((shards / "manifest.json").read_text())
    for name in ("../x.tar", str(tmp_path / "x.tar")):
        manifest["splits"]["train"]["shards"][0]["filename"] = name
        (shards / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(FormatError, match="not a plain .tar file name"):
            read_split(shards, "train")
        assert any("not a plain .tar file name" in f for f in verify(shards))
        res = CliRunner().invoke(main, ["train", str(shards), "--out", str(tmp_path / "run"), "--quiet"])
        assert res.exit_code != 0 and "not a plain .tar file name" in res.output


def test_damaged_indexes_are_messages_not_tracebacks(tmp_path: Path):
    shards = write_shards(tmp_path / "toy")
    manifest = json.loads((shards / "manifest.json").read_text())
    info = json.loads((shards / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"] = [str(n) for n in info["splits"]["train"]["shard_lengths"]]
    (shards / "_info.json").write_text(json.dumps(info))
    assert any("must be integers" in f for f in verify(shards))
    for text, match in (("", "not valid JSON"), ("[1, 2]", "not a JSON object"),
                        (json.dumps({**manifest, "format_version": 999}), "format_version 999")):
        (shards / "manifest.json").write_text(text)
        res = CliRunner().invoke(main, ["train", str(shards), "--out", str(tmp_path / "run"), "--quiet"])
        assert res.exit_code != 0 and match in res.output and "Traceback" not in res.output, res.output


def test_a_pickle_in_a_checkpoint_is_refused_with_a_message_and_never_runs(tmp_path: Path, scored):
    src, _ = scored
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    res = CliRunner().invoke(main, ["score", str(src), "--out", str(tmp_path / "s"), "--checkpoint",
                                    str(tmp_path / "evil.pt"), "--quiet"])
    assert res.exit_code != 0 and "not a weights-only checkpoint" in res.output and not marker.exists()
    assert not (tmp_path / "s").exists()


# --- full disks and small datasets ------------------------------------------------------------


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_part_behind(scored, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    src, _ = scored
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=2)

    def full(table, where, **kw):
        raise OSError(28, "No space left on device", str(where))

    monkeypatch.setattr(pq, "write_table", full)
    res = CliRunner().invoke(main, ["score", str(src), "--out", str(tmp_path / "s"), "--checkpoint", str(ckpt),
                                    "--workers", "0", "--quiet"])
    assert res.exit_code != 0 and "No space left on device" in res.output and ".part-000000.parquet.tmp" in res.output
    assert "Traceback" not in res.output and not list((tmp_path / "s").glob("*part*"))


def test_fewer_samples_than_one_batch_is_refused_before_training(tmp_path: Path):
    shards = write_shards(tmp_path / "toy", per_class=2, multiple=1, per_shard=8)
    res = CliRunner().invoke(main, ["train", str(shards), "--out", str(tmp_path / "run"), "--batch-size", "64",
                                    "--workers", "0", "--quiet"])
    assert res.exit_code != 0 and "no full batch" in res.output and not (tmp_path / "run").exists()


def test_max_pixels_is_a_score_option(scored, tmp_path: Path):
    src, _ = scored
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=2)
    assert _score(src, tmp_path / "s", ckpt, "--max-pixels", "1000").returncode == 0
    df = _table(tmp_path / "s")
    assert df.filter(pl.col("status") == "error")["error"].str.starts_with("image too large").all()
    assert len(df.filter(pl.col("status") == "error")) == 12  # 32..37 px squares: all above 1000 pixels


# --- shards say where images came from without the machine's paths --------------------------


def test_shard_json_sources_are_relative_and_split_keys_do_not_collide(scored, tmp_path: Path):
    src, scores = scored
    ckpt = random_checkpoint(tmp_path / "w.pt", classes=2)
    assert _score(src, tmp_path / "val-scores", ckpt).returncode == 0
    res = CliRunner().invoke(main, ["shard", str(src), "--scores", str(scores), "--out", str(tmp_path / "o"),
                                    "--keep", "1.0", "--val", str(src), "--val-scores", str(tmp_path / "val-scores"),
                                    "--no-dedup", "--quiet", "--samples-per-shard", "4"])
    assert res.exit_code == 0, res.output
    from curate.shard.format import read_samples

    keys = {}
    for tar in sorted((tmp_path / "o").glob("*.tar")):
        for sample in read_samples(tar):
            meta = json.loads(sample["json"])
            assert not meta["source"].startswith("/") and meta["source"].startswith(("a/", "b/")), meta["source"]
            keys.setdefault(tar.name.split("-")[0], set()).add(sample["__key__"])
    assert len(keys["train"]) == len(keys["validation"]) == 12 and not keys["train"] & keys["validation"]
    assert verify(tmp_path / "o") == []


# --- a killed job leaves no worker behind -----------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{pid}\n" in status.read_text():
                found.append(int(status.parent.name))
        except OSError:
            pass  # the process ended while we looked
    return found


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_decode_workers_die_with_a_killed_score_job(small_demo: Path, tmp_path: Path):
    import signal
    import time

    cmd = [sys.executable, str(ROOT / "cli.py"), "score", str(small_demo / "train"), "--out", str(tmp_path / "s"),
           "--train-epochs", "20", "--batch-size", "2", "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while len(workers) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "no decode workers appeared"
        workers = _children(proc.pid)
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # torch's own watchdog ends an orphaned worker within its 5 s status interval; the request to
    # the kernel (PR_SET_PDEATHSIG) ends it at once
    deadline = time.monotonic() + 2
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "decode workers outlived the killed job"
    RunFolder.open(tmp_path / "s", "score", "resume").close()  # and its lock went with it
