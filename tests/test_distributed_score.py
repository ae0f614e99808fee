"""`curate score` under torchrun: two ranks write the table one process writes, and resume it."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from cli import main
from curate.common.dist import Dist

from .conftest import ROOT

NUMERIC = ["loss", "margin", "el2n", "entropy", "pred", "confidence", "forgetting", "el2n_mean", "margin_mean",
           "fold", "oos_loss", "oos_el2n", "label_quality", "suggested_label"]
# torchrun runs each rank with one thread unless told otherwise; the single-process reference gets
# the same, so both do the same float arithmetic (the tolerances below then only allow for noise).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def score_args(src: Path, out: Path, *extra: str) -> list[str]:
    # one training epoch keeps it short; 16-input parts give 6 parts, 3 per rank; 2 folds, one per rank
    return [str(ROOT / "cli.py"), "score", str(src), "--out", str(out), "--train-epochs", "1", "--folds", "2",
            "--chunk-size", "16", "--batch-size", "8", "--workers", "0", "--quiet", *extra]


def run(args: list[str], ranks: int = 1) -> None:
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.run(launcher + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def read(out: Path) -> pl.DataFrame:
    return pl.scan_parquet(out / "part-*.parquet").collect().sort("key")


def assert_same_table(a: pl.DataFrame, b: pl.DataFrame) -> float:
    """Same keys once each, scores within float tolerance, maps within a float16 step; max abs diff."""
    assert b["key"].n_unique() == len(b) == len(a) and a["key"].to_list() == b["key"].to_list()
    worst = 0.0
    for col in NUMERIC:
        x, y = a[col].cast(pl.Float64).to_numpy(), b[col].cast(pl.Float64).to_numpy()
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, err_msg=col)
        worst = max(worst, float(np.abs(x - y).max()))
    maps = [np.stack([np.frombuffer(m, "<f2") for m in df["importance"]]).astype(np.float32) for df in (a, b)]
    np.testing.assert_allclose(maps[0], maps[1], rtol=2**-10, atol=1e-6, err_msg="importance")
    assert a["label_issue"].to_list() == b["label_issue"].to_list()
    return max(worst, float(np.abs(maps[0] - maps[1]).max()))


@pytest.mark.slow
def test_two_ranks_score_like_one_process_and_resume(small_demo: Path, tmp_path: Path):
    src, single, ranked = small_demo / "train", tmp_path / "single", tmp_path / "ranked"
    run(score_args(src, single))
    run(score_args(src, ranked, "--distributed"), ranks=2)

    # the same part files as one process, so resume and scan_parquet do not care about the rank count
    assert sorted(p.name for p in ranked.glob("part-*")) == sorted(p.name for p in single.glob("part-*"))
    worst = assert_same_table(read(single), read(ranked))
    print(f"max abs diff, 1 vs 2 ranks: {worst:.3g}")
    manifest = json.loads((ranked / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 96, "ok": 96, "error": 0, "classes": 4}
    assert [(r["rank"], r["parts_written"], r["rows_written"]) for r in manifest["ranks"]] == [(0, 3, 48), (1, 3, 48)]
    assert manifest["proxy"]["checkpoint_sha256"] == json.loads((single / "manifest.json").read_text())[
        "proxy"]["checkpoint_sha256"], "rank 0 trains exactly as one process does"
    assert [f["checkpoint_sha256"] for f in manifest["proxy"]["folds"]["per_fold"]] == [
        f["checkpoint_sha256"] for f in json.loads((single / "manifest.json").read_text())["proxy"]["folds"][
            "per_fold"]], "each fold is trained by one rank exactly as one process trains it"

    # lose one part of each rank; a resumed 2-rank run rewrites just those, dealt one per rank
    for name in ("part-000001.parquet", "part-000004.parquet", "manifest.json"):
        (ranked / name).unlink()
    run(score_args(src, ranked, "--resume"), ranks=2)  # no --distributed: WORLD_SIZE > 1 is enough
    assert [r["parts_written"] for r in json.loads((ranked / "manifest.json").read_text())["ranks"]] == [1, 1]
    assert_same_table(read(single), read(ranked))


def test_distributed_without_torchrun_is_a_clear_error(small_demo: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    res = CliRunner().invoke(main, ["score", str(small_demo / "train"), "--out", str(tmp_path / "s"),
                                    "--train-epochs", "1", "--distributed"])
    assert res.exit_code != 0 and "torchrun" in res.output
    assert not (tmp_path / "s").exists()


def test_single_process_collectives_are_plain_calls():
    group = Dist()
    assert group.from_main(lambda: 3) == 3 and group.main_only(lambda: 4) == 4 and group.main_first(lambda: 5) == 5
    assert group.all_gather("x") == ["x"] and group.broadcast(7) == 7
    with pytest.raises(ValueError, match="boom"):
        group.main_only(lambda: (_ for _ in ()).throw(ValueError("boom")))
