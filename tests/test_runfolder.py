"""The run folder: fresh, resumed and overwritten runs follow one set of rules, and nothing the
tool did not write is ever deleted."""
import json
import os
import signal
from pathlib import Path

import pytest

from curate.common.runfolder import LOCK, MARKER, RunFolder, RunFolderError, foreign_files


def _open(root: Path, mode: str = "fresh", command: str = "score", **kw: object) -> RunFolder:
    return RunFolder.open(root, command, mode, config=kw.pop("config", {"seed": 0}), **kw)  # type: ignore[arg-type]


def _write(folder: RunFolder, *names: str) -> None:
    folder.claim(*names)
    for name in names:
        path = folder.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)


def test_fresh_run_records_what_it_owns_and_config(tmp_path: Path):
    with _open(tmp_path / "out") as folder:
        _write(folder, "part-000000.parquet", "proxy/model.pt")
    marker = json.loads((tmp_path / "out" / MARKER).read_text())
    assert marker["command"] == "score"
    assert marker["owned"] == ["config.json", "part-000000.parquet", "proxy/model.pt"]
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"seed": 0}


def test_a_folder_of_someone_elses_files_is_refused_in_every_mode_and_left_alone(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "manifest.json").write_text("{}")  # named like an output, still the user's
    for mode in ("fresh", "resume", "overwrite"):
        with pytest.raises(RunFolderError, match="holds no curate run"):
            _open(out, mode)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "manifest.json"]  # not even a lock file


def test_overwrite_removes_exactly_what_the_previous_run_wrote(tmp_path: Path):
    out = tmp_path / "out"
    with _open(out) as folder:
        _write(folder, "part-000000.parquet", "part-000001.parquet", "proxy/model.pt")
    (out / ".part-000002.parquet.tmp").write_text("cut")  # left by a kill: a tmp of an unclaimed name
    (out / ".proxy").mkdir()
    with pytest.raises(RunFolderError, match="did not write, e.g. .part-000002.parquet.tmp"):
        _open(out, "overwrite")
    (out / ".part-000002.parquet.tmp").unlink()
    (out / "proxy" / ".model.pt.tmp").write_text("cut")  # a tmp of a claimed name is the run's own
    with _open(out, "overwrite", config={"seed": 1}) as folder:
        assert folder.owned == {"config.json"}
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, LOCK, "config.json", ".proxy"])
    assert json.loads((out / "config.json").read_text()) == {"seed": 1}


def test_overwrite_refuses_when_a_user_file_sits_among_the_outputs(tmp_path: Path):
    out = tmp_path / "out"
    with _open(out) as folder:
        _write(folder, "train-000000.tar")
    (out / "old-dataset.tar").write_text("the user's")
    (out / "notes").mkdir()
    (out / "notes" / "main.py").write_text("the user's")
    with pytest.raises(RunFolderError, match="2 file\\(s\\) the previous run did not write"):
        _open(out, "overwrite", command="score")
    assert (out / "old-dataset.tar").exists() and (out / "notes" / "main.py").exists()
    assert (out / "train-000000.tar").exists()  # refused means nothing was deleted
    assert foreign_files(out) == [out / "notes" / "main.py", out / "old-dataset.tar"]


def test_non_empty_needs_resume_or_overwrite_and_the_same_command(tmp_path: Path):
    out = tmp_path / "out"
    _open(out).close()
    with pytest.raises(RunFolderError, match="pass --resume .* or --overwrite"):
        _open(out)
    with pytest.raises(RunFolderError, match="holds a `curate score` run, not `curate shard`"):
        _open(out, "overwrite", command="shard")


def test_resume_compares_settings_except_the_free_ones(tmp_path: Path):
    out = tmp_path / "out"
    _open(out, config={"seed": 0, "workers": 2}).close()
    _open(out, "resume", config={"seed": 0, "workers": 8}, free=("workers",)).close()
    with pytest.raises(RunFolderError, match="settings differ .*: seed"):
        _open(out, "resume", config={"seed": 1, "workers": 2}, free=("workers",))
    assert json.loads((out / "config.json").read_text()) == {"seed": 0, "workers": 2}  # the run's own
    _open(tmp_path / "new", "resume").close()  # resuming nothing starts fresh


def test_out_may_not_be_the_input_or_inside_it_nor_a_file(tmp_path: Path):
    src = tmp_path / "images"
    (src / "cat").mkdir(parents=True)
    for out in (src, src / "scores", src / "cat" / "x"):
        with pytest.raises(RunFolderError, match="input folder"):
            _open(out, "overwrite", sources=[src])
    assert sorted(p.name for p in src.iterdir()) == ["cat"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        _open(tmp_path / "file")


def test_one_run_at_a_time_per_folder(tmp_path: Path):
    out = tmp_path / "out"
    first = _open(out)
    with pytest.raises(RunFolderError, match="in use by another curate run"):
        _open(out, "resume")
    first.close()
    _open(out, "resume").close()


def test_the_lock_dies_with_its_process(tmp_path: Path):
    out = tmp_path / "out"
    pid = os.fork()
    if pid == 0:  # the child takes the lock and is killed holding it
        try:
            _open(out)
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)  # never return into pytest: a failure above ends the child, not the test run
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the child failed before its kill"
    _open(out, "resume").close()


def test_a_parent_run_overwrites_its_child_runs_through_their_own_records(tmp_path: Path):
    out = tmp_path / "demo"
    with RunFolder.open(out, "demo", "overwrite") as demo:
        _write(demo, "data/train/a.JPEG", "report.txt")
        with _open(demo.claim_run("scores")) as child:
            _write(child, "part-000000.parquet")
    (out / "scores" / "mine.txt").write_text("the user's")
    with pytest.raises(RunFolderError, match="mine.txt"):
        RunFolder.open(out, "demo", "overwrite")
    (out / "scores" / "mine.txt").unlink()
    RunFolder.open(out, "demo", "overwrite").close()
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, LOCK])  # data/ and scores/ were ours


def test_a_forked_worker_does_not_keep_the_folder_locked(tmp_path: Path):
    """DataLoader and shard-writer workers are forked while the run holds its lock; when the run
    dies first (SIGKILL), a worker still alive must not block the --resume.

    No sleeps: the worker says it is running (its at-fork handlers have run) on one pipe, then
    stays alive until the test, its --resume done, closes the other."""
    out = tmp_path / "out"
    ready_r, ready_w = os.pipe()  # worker -> test: "I am running"
    go_r, go_w = os.pipe()  # test -> worker: exit now (a byte, or EOF when the test's end closes)
    holder = os.fork()
    if holder == 0:
        try:
            os.close(ready_r), os.close(go_w)
            _open(out)
            worker = os.fork()
            if worker == 0:  # the "worker" outlives its parent until the test lets it go
                try:
                    os.write(ready_w, b"r")
                    os.read(go_r, 1)
                    os._exit(0)
                finally:
                    os._exit(1)
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)  # never return into pytest
    os.close(ready_w), os.close(go_r)
    try:
        # b"" (EOF): the holder or the worker failed before the worker was running.
        assert os.read(ready_r, 1) == b"r", "the worker never started"
        _, status = os.waitpid(holder, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the holder failed before its kill"
        _open(out, "resume").close()  # the holder is dead, its worker still alive and blocked on go_r
    finally:
        os.close(go_w)  # the worker reads EOF and exits
        os.close(ready_r)


def test_empty_folders_count_as_empty(tmp_path: Path):
    (tmp_path / "out" / "proxy" / "deeper").mkdir(parents=True)
    _open(tmp_path / "out").close()  # nothing in it could be lost
    assert (tmp_path / "out" / "proxy" / "deeper").is_dir()  # and nothing of it is deleted
