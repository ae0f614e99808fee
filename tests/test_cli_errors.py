"""One error policy for every command (cli.py): an expected error (bad input or settings, files, a
usage error) is one line `error: ...` on stderr and exit code 2; a bug keeps its traceback, and
`--debug` shows the traceback of an expected error too."""
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from cli import main

from .conftest import ROOT

# command -> its arguments for an expected failure, made from a folder with `empty/` (nothing in
# it) and `foreign/` (a file curate did not write); `missing` does not exist.
CASES: dict[str, Callable[[Path], list[str]]] = {
    "score": lambda t: ["score", t / "missing", "--out", t / "o", "--train-epochs", "1", "--quiet"],
    "inspect": lambda t: ["inspect", t / "empty"],
    "shard": lambda t: ["shard", t / "missing", "--scores", t / "empty", "--out", t / "o", "--quiet"],
    "verify": lambda t: ["verify", t / "missing"],
    "train": lambda t: ["train", t / "empty", "--out", t / "o", "--quiet"],
    "predict": lambda t: ["predict", t / "empty", t / "empty", "--out", t / "p.parquet"],
    "proxies": lambda t: ["proxies", "extra"],
    "demo": lambda t: ["demo", "--out", t / "foreign", "--quiet"],
}


@pytest.fixture
def where(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("not curate's")
    return tmp_path


def _refused(res: object) -> str:
    """Exit code 2 with exactly one line on stderr, `error: ...`, and no traceback anywhere."""
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), res.exc_info
    assert "Traceback" not in res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_every_command_has_a_case():
    assert set(CASES) == set(main.commands)


@pytest.mark.parametrize("command", sorted(CASES))
def test_an_expected_error_is_one_line_and_exit_code_2(command: str, where: Path):
    res = CliRunner().invoke(main, [str(a) for a in CASES[command](where)])
    line = _refused(res)
    assert str(where) in line or "extra" in line  # it says what was wrong


def test_a_usage_error_of_the_group_is_one_line_too():
    for args in (["--bogus"], ["no-such-command"]):
        assert "--help" in _refused(CliRunner().invoke(main, args))


def test_verify_faults_are_listed_then_refused_with_code_2(where: Path):
    res = CliRunner().invoke(main, ["verify", str(where / "empty")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.splitlines()[-1] == f"error: 2 fault(s) in {where / 'empty'}"


def _run(*args: object, code: str | None = None) -> subprocess.CompletedProcess:
    """The real entry point (`python cli.py ...`), or `code` run before calling it."""
    cmd = [sys.executable, str(ROOT / "cli.py"), *map(str, args)] if code is None else \
        [sys.executable, "-c",
         f"import sys, cli\n{code}\nsys.exit(cli.main([{', '.join(repr(str(a)) for a in args)}]))"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_entry_point_refuses_in_one_line_and_debug_shows_the_traceback(where: Path):
    plain = _run("inspect", where / "empty")
    assert plain.returncode == 2 and plain.stderr.startswith("error: no part-") and plain.stderr.count("\n") == 1
    debug = _run("--debug", "inspect", where / "empty")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_a_bug_ends_in_its_traceback(where: Path, monkeypatch: pytest.MonkeyPatch):
    from curate.score import inspect as inspect_table

    def planted(*_args: object) -> str:
        raise TypeError("a planted bug")

    monkeypatch.setattr(inspect_table, "summary_text", planted)
    res = CliRunner().invoke(main, ["inspect", str(where / "empty")])
    assert isinstance(res.exception, TypeError) and "error:" not in res.output  # click passes it on, untouched
    plant = "import curate.score.inspect as i\ndef bug(*a):\n    raise TypeError('a planted bug')\ni.summary_text = bug"
    proc = _run("inspect", where / "empty", code=plant)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "TypeError: a planted bug" in proc.stderr
