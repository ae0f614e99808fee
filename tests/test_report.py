"""The HTML report: self-contained, every image decodes, a real browser shows all of them, and
moved images are said, not fatal."""
import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from curate.score.job import ScoreConfig, run_score

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src") or "")
        if tag in ("link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src") or "")


def images_of(page: Path) -> _Images:
    parser = _Images()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def reported(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A copy of the small demo scored by a ViT (maps) and by a CNN with 2 folds (label issues),
    sharded with --report."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    shutil.copytree(small_demo, data)
    cnn, vit = root / "cnn", root / "vit"
    run_score(ScoreConfig(str(data / "train"), cnn, proxy="demo-cnn", train_epochs=1, folds=2, workers=0,
                          progress=False))
    run_score(ScoreConfig(str(data / "train"), vit, proxy="demo-vit", train_epochs=1, workers=0, progress=False))
    res = CliRunner().invoke(main, ["shard", str(data / "train"), "--scores", str(cnn), "--scores", str(vit),
                                    "--out", str(root / "shards"), "--keep", "0.6", "--dedup", "0.93",
                                    "--drop-label-issues", "--report", "--quiet"])
    assert res.exit_code == 0, res.output
    return root / "shards" / "report.html", cnn, data


@pytest.mark.slow
def test_the_report_is_self_contained_and_every_image_decodes(reported: tuple[Path, Path, Path]):
    page, _, _ = reported
    found = images_of(page)
    assert found.links == [], "nothing loaded from elsewhere"
    assert len(found.srcs) > 40
    for src in found.srcs:
        kind, _, payload = src.partition(";base64,")
        assert kind in ("data:image/jpeg", "data:image/png"), src[:40]
        Image.open(io.BytesIO(base64.b64decode(payload))).load()
    text = page.read_text(encoding="utf-8")
    for heading in ("Rows by reason", "Per class", "Likely label errors", "Near-duplicate groups",
                    "Hardest kept images", "Easiest kept images", "Patch importance"):
        assert heading in text, heading
    assert "demo-cnn" in text and "label_issue" in text
    assert text.count("alt='map of") >= 10, "importance overlays from the ViT table"


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt install chromium)")
def test_chromium_shows_every_image_of_the_report(reported: tuple[Path, Path, Path], tmp_path: Path):
    page, _, _ = reported
    dom = _chromium("--dump-dom", "--virtual-time-budget=10000", page.as_uri()).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load handler did not run"
    assert loaded.group(1) == loaded.group(2) == str(len(images_of(page).srcs))
    shot = tmp_path / "shot.png"
    _chromium("--window-size=1300,2400", f"--screenshot={shot}", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    not_white = (pixels < 235).any(-1).mean()
    assert not_white > 0.1 and pixels.std() > 30, f"blank-looking screenshot ({not_white:.1%} non-white)"


@pytest.mark.slow
def test_inspect_html_and_plots_when_the_images_have_moved(reported: tuple[Path, Path, Path], tmp_path: Path):
    _, cnn, data = reported
    moved = data.with_name("moved")
    data.rename(moved)
    try:
        res = CliRunner().invoke(main, ["inspect", str(cnn), "--html", str(tmp_path / "r.html"),
                                                        "--plots", str(tmp_path / "plots")])
    finally:
        moved.rename(data)
    assert res.exit_code == 0, res.output + res.stderr
    assert "could not be read from their source" in res.stderr
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "not readable" in text and "images could not be read" in text
    assert (tmp_path / "plots" / "score_histograms.png").exists()
    assert "skipped importance_overlay.png" in res.stderr  # the CNN table has no maps; said, not silent
    srcs = images_of(tmp_path / "r.html").srcs
    assert len(srcs) == 1, "only the histograms: no thumbnail could be made"
