"""cli.py against the library: choices come from the registries, `curate shard`'s defaults are
SelectConfig's, and `curate proxies` and `curate demo` run through click."""
from dataclasses import fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import cli
from cli import RegistryChoice, main
from curate.score.proxies import RECIPES
from curate.select.policies import POLICIES, SelectConfig
from curate.shard.job import ShardConfig
from sparsevit.prune import PRUNERS

from sparsevit import attention, names, schedule

# sparsevit's choices are declared torch-free (`curate train --help` imports no torch); each
# registry holds exactly its declared names.
DECLARED = {"KEEP_SCHEDULES": schedule.KEEP_SCHEDULES, "ATTENTION_MODES": attention.MODES,
            "EXAMPLE_PRUNERS": PRUNERS}


def _options() -> list[tuple[str, click.Option]]:
    return [(name, p) for name, cmd in main.commands.items() for p in cmd.params if isinstance(p, click.Option)]


def test_choices_are_the_registries_and_every_default_is_one_of_them():
    registry = {(name, p.name): p for name, p in _options() if isinstance(p.type, RegistryChoice)}
    assert len(registry) == 11
    for where, option in registry.items():
        assert option.type.choices and option.default in option.type.choices, where
    registry = {where: option.type for where, option in registry.items()}
    assert set(registry["shard", "policy"].choices) == set(POLICIES)
    assert set(registry["train", "example_pruning"].choices) == set(PRUNERS)
    plain = {(name, p.name) for name, p in _options()
             if isinstance(p.type, click.Choice) and not isinstance(p.type, RegistryChoice)}
    assert plain == set()  # no choice list is copied into cli.py


def test_each_registry_holds_exactly_its_declared_names():
    for attribute, registry in DECLARED.items():
        assert tuple(registry) == getattr(names, attribute) == registry.declared, attribute


def test_curate_shard_defaults_are_select_configs():
    """What `curate shard` with no options selects ("clean": everything but label issues and phash
    near-duplicates) is SelectConfig's and ShardConfig's default."""
    options = main.commands["shard"].make_context("shard", [], resilient_parsing=True).params  # the defaults
    default = SelectConfig()
    assert cli.parse_keep(options["keep"]) == default.keep == 1.0 and default.drop_label_issues is None  # decided
    dedup = cli.dedup_threshold(options["dedup"], options["no_dedup"], options["dedup_on"])
    assert dedup == ShardConfig("src", (Path("s"),), Path("o")).dedup == 0.75
    assert options["dedup_on"] == ShardConfig("src", (Path("s"),), Path("o")).dedup_on
    assert tuple(options["by"]) == default.by and options["relabel"] == default.relabel_min_prob
    for name in cli.SELECT_OPTIONS:
        assert options[name] == getattr(default, name), name
    assert set(cli.SELECT_OPTIONS) | {"keep", "by", "relabel_min_prob", "strata", "dedup"} == \
        {f.name for f in fields(SelectConfig)}


def test_proxies_lists_every_recipe():
    res = CliRunner().invoke(main, ["proxies"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(RECIPES)
    assert all(RECIPES[line.split()[0]].model in line for line in lines)


def test_demo_passes_its_options_and_prints_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The demo has no small mode through click (minutes on 2 cores; tests/test_demo_run.py runs it
    small as a library call): here the command with the real run replaced, and its early refusal in
    tests/test_cli_errors.py."""
    from curate.demo import run

    calls = []
    monkeypatch.setattr(run, "run_demo", lambda out, **kw: calls.append((out, kw)) or "the report")
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--seed", "3", "--workers", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    assert calls == [(tmp_path / "d", {"seed": 3, "workers": 0, "progress": False})]
    assert res.stdout == "the report\n" and "report in" in res.stderr


def test_shard_dedup_options_that_contradict_or_lack_a_threshold_are_refused(tmp_path: Path):
    scores = tmp_path / "scores"
    scores.mkdir()
    base = ["shard", str(tmp_path), "--scores", str(scores), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(main, [*base, "--dedup", "0.8", "--no-dedup"])
    assert res.exit_code == 2 and "--dedup and --no-dedup contradict each other" in res.output
    res = CliRunner().invoke(main, [*base, "--dedup-on", "embedding"])
    assert res.exit_code == 2 and "--dedup-on embedding has no default threshold" in res.output
    assert not (tmp_path / "o").exists()
    assert cli.dedup_threshold(None, False, "thumbnail") == 0.93 and cli.dedup_threshold(0.9, False, "phash") == 0.9
