"""The benchmark's findings said where they apply (curate/select/advice.py): `curate shard` warns when
out-of-sample label issues say the data is noisy and the recipe keeps them; in-sample flags, quiet
data and recipes that drop or relabel the issues get no warning."""
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from curate.score.job import ScoreConfig, run_score
from curate.select.advice import NOISY_SHARE, flagged_share, recipe_warnings, resolve_label_issues
from curate.select.policies import SelectConfig


def manifest(flagged: int, rows: int = 10_000, folds: int = 5, probe: bool = False) -> dict:
    """The parts of a `curate score` manifest that advice reads (a real one: tests below)."""
    proxy = {"label_issues": {"agreement": 0.63, "label_issues": flagged, "rows": rows}}
    return {"config": {"folds": folds}, "proxy": proxy | ({"probe": {"held_out_accuracy": 0.63}} if probe else {})}


def test_flagged_share_only_out_of_sample():
    assert flagged_share(manifest(2151)) == pytest.approx(0.2151)
    assert flagged_share(manifest(2151, folds=1, probe=True)) == pytest.approx(0.2151)
    assert flagged_share(manifest(2151, folds=1)) is None, "in sample: the proxy learned its labels"
    assert flagged_share({"config": {"folds": 5}, "proxy": {"label_issues": None}}) is None


def test_the_warning_applies_to_noisy_data_and_recipes_that_keep_the_issues():
    noisy, quiet = manifest(2151), manifest(785)  # the probe at 20% and at 0% flips on CIFAR-10
    curated = SelectConfig(keep=0.7, drop_label_issues=False)  # the defaults until issue 25
    (line,) = recipe_warnings(curated, noisy)
    assert line.startswith("22% of the inputs are label issues") and "--keep-label-issues" in line
    assert "The value where users prune" in line
    assert recipe_warnings(SelectConfig(policy="random", drop_label_issues=False), noisy), "full data keeps them"
    assert recipe_warnings(SelectConfig(drop_label_issues=True), noisy) == [], "what the default resolves to"
    assert recipe_warnings(SelectConfig(drop_label_issues=False, relabel_min_prob=0.7), noisy) == []
    assert 785 / 10_000 < NOISY_SHARE
    assert recipe_warnings(SelectConfig(drop_label_issues=False), quiet) == [], "full data on quiet data"
    assert recipe_warnings(curated, manifest(2151, folds=1)) == []


def test_pruning_past_the_label_issues_of_quiet_data_is_said_to_lose():
    quiet = manifest(785)  # the probe on CIFAR-10 without flips
    (line,) = recipe_warnings(SelectConfig(keep=0.7, drop_label_issues=True), quiet)
    assert line.startswith("only 8% of the inputs are label issues") and "--keep 0.7" in line
    assert "--keep 1.0" in line and "The value where users prune" in line
    assert recipe_warnings(SelectConfig(keep=7000, drop_label_issues=True), quiet), "a count below the rows prunes"
    assert recipe_warnings(SelectConfig(keep=10_000, drop_label_issues=True), quiet) == [], "a count of all: none"
    assert recipe_warnings(SelectConfig(drop_label_issues=True), quiet) == [], "the default prunes nothing more"
    in_sample = recipe_warnings(SelectConfig(keep=0.7, drop_label_issues=True), manifest(785, folds=1))
    assert not any(line.startswith("only") for line in in_sample), "in sample: nothing claimed"


def test_in_sample_label_issues_dropped_are_said_to_be_few():
    drop = SelectConfig(drop_label_issues=True)
    (line,) = recipe_warnings(drop, manifest(120, folds=1))
    assert line.startswith("the 120 label issues dropped come from in-sample probabilities") and "--probe" in line
    assert recipe_warnings(SelectConfig(drop_label_issues=False), manifest(120, folds=1)) == []
    assert recipe_warnings(drop, manifest(0, folds=1)) == []


def test_the_default_drops_label_issues_unless_their_proxy_is_near_chance():
    trained = manifest(2151) | {"counts": {"classes": 10}}  # agreement 0.63 at 10 classes: skill 0.59
    chosen, notes = resolve_label_issues(SelectConfig(), trained)
    assert chosen.drop_label_issues is True and notes == []
    random = {"counts": {"classes": 4}, "proxy": {"label_issues": {"agreement": 0.26, "label_issues": 73, "rows": 96}}}
    chosen, (note,) = resolve_label_issues(SelectConfig(), random)  # skill 0.01: a random model flags most
    assert chosen.drop_label_issues is False and note.startswith("label issues kept") and "near chance" in note
    assert resolve_label_issues(SelectConfig(), {"proxy": {}})[0].drop_label_issues is False, "none on record"
    for given in (True, False):  # the user's choice stands
        assert resolve_label_issues(SelectConfig(drop_label_issues=given), random) == (
            SelectConfig(drop_label_issues=given), [])


@pytest.fixture(scope="module")
def noisy_and_quiet(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real 2-fold table over the small demo, and two copies whose manifest records a noisy (30%)
    and a quiet (5%) share of label issues (only the record differs)."""
    root = tmp_path_factory.mktemp("advice")
    real = root / "real"
    run_score(ScoreConfig(str(small_demo / "train"), real, proxy="demo-cnn", train_epochs=1, folds=2, workers=0,
                          progress=False))
    out = {"real": real}
    for name, share in (("noisy", 0.3), ("quiet", 0.05)):
        out[name] = root / name
        shutil.copytree(real, out[name])
        m = json.loads((out[name] / "manifest.json").read_text())
        m["proxy"]["label_issues"]["label_issues"] = round(share * m["proxy"]["label_issues"]["rows"])
        (out[name] / "manifest.json").write_text(json.dumps(m))
    return out


def shard(small_demo: Path, scores: Path, out: Path, *extra: str) -> str:
    res = CliRunner().invoke(main, ["shard", str(small_demo / "train"), "--scores", str(scores), "--out", str(out),
                                    "--quiet", *extra])
    assert res.exit_code == 0, res.output
    return res.output


def test_curate_shard_warns_on_noisy_data_only_when_the_issues_stay(small_demo: Path,
                                                                  noisy_and_quiet: dict[str, Path], tmp_path: Path):
    real = json.loads((noisy_and_quiet["real"] / "manifest.json").read_text())
    assert flagged_share(real) is not None, "a 2-fold table's flags are out of sample"
    out = shard(small_demo, noisy_and_quiet["noisy"], tmp_path / "a", "--keep-label-issues")
    assert "warning: 30% of the inputs are label issues" in out
    assert "warning:" not in shard(small_demo, noisy_and_quiet["noisy"], tmp_path / "b"), "the default drops them"
    assert "warning:" not in shard(small_demo, noisy_and_quiet["quiet"], tmp_path / "c", "--keep-label-issues")
    assert "warning: only 5% of the inputs are label issues" in shard(small_demo, noisy_and_quiet["quiet"],
                                                                     tmp_path / "e", "--keep", "0.7")
    assert "warning: 30%" in shard(small_demo, noisy_and_quiet["noisy"], tmp_path / "d", "--dry-run", "--keep", "0.7",
                                   "--keep-label-issues")
    assert not (tmp_path / "d").exists()
