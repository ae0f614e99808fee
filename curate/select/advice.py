"""What the equal-budget benchmark found about a selection recipe at the user's setting, said when
`curate shard` runs one it found losing (docs/benchmarks.md, "The value where users prune").

The setting is read from the lead score table: the share of inputs it flags as label issues, when
those come from out-of-sample probabilities (`--folds K` or `--probe`). In-sample flags come from a
proxy that learned its labels and understate the noise (issue 24: cleanlab recall 0.17 at 10% flips),
so from them nothing is claimed.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from curate.select.policies import SelectConfig
from curate.select.weighing import MIN_SKILL, chance, held_out_accuracy, skill

# Flagged share from which the benchmark's noisy setting applies: at 20% uniform flips the probe flagged
# 21.5% of CIFAR-10, at 0% flips 7.9% (its hard, ambiguous images)
NOISY_SHARE = 0.15
SECTION = 'docs/benchmarks.md, "The value where users prune"'


def flagged_share(manifest: dict[str, Any]) -> float | None:
    """The share of scored inputs flagged as label issues out of sample; None when the table's flags
    are in sample or absent."""
    found = manifest.get("proxy", {}).get("label_issues") or {}
    rows, flagged = found.get("rows"), found.get("label_issues")
    if held_out_accuracy(manifest) is None or not rows or flagged is None:
        return None
    return flagged / rows


def recipe_warnings(select: SelectConfig, lead_manifest: dict[str, Any]) -> list[str]:
    """One line per finding against the recipe at this data's setting; empty when none applies."""
    share = flagged_share(lead_manifest)
    if share is None:
        return in_sample_note(select, lead_manifest)
    if share < NOISY_SHARE:
        return quiet_pruning_note(select, share, lead_manifest)
    if select.drop_label_issues or select.relabel_min_prob is not None:
        return []
    return [f"{share:.0%} of the inputs are label issues (out-of-sample probabilities) and this recipe keeps "
            "them: at 20% label noise the benchmark found dropping them ahead of full data at every budget, "
            f"and pruning that keeps them behind full data ({SECTION}); drop them (the default, without "
            "--keep-label-issues), with --keep 1.0 to prune nothing else"]


def prunes(select: SelectConfig, rows: int | None) -> bool:
    """Whether the recipe keeps fewer than all of what the label issues and duplicates leave."""
    if isinstance(select.keep, float):
        return select.keep < 1.0
    return rows is None or select.keep < rows


def quiet_pruning_note(select: SelectConfig, share: float, lead_manifest: dict[str, Any]) -> list[str]:
    """Quiet data (few out-of-sample label issues) and a recipe that prunes past them: on CIFAR-10
    without flips the benchmark found 70% by CCS after cleaning behind clean at 0.5x, 0.7x and 1.0x
    of full's schedule (-0.6 / -0.6 / -1.0 points), and ahead of full data only at 1.0x."""
    rows = (lead_manifest.get("proxy", {}).get("label_issues") or {}).get("rows")
    if not prunes(select, rows):
        return []
    return [f"only {share:.0%} of the inputs are label issues (out-of-sample probabilities) and this recipe prunes "
            f"further (--keep {select.keep}): on such data the benchmark found pruning past the label issues "
            f"behind keeping the rest at every budget, and no better than full data below its complete schedule "
            f"({SECTION}); --keep 1.0 (the default) keeps the rest"]


def in_sample_note(select: SelectConfig, lead_manifest: dict[str, Any]) -> list[str]:
    """Label issues dropped from in-sample probabilities: say they are few of the wrong labels."""
    found = lead_manifest.get("proxy", {}).get("label_issues") or {}
    if not select.drop_label_issues or not found.get("label_issues"):
        return []
    return [f"the {found['label_issues']} label issues dropped come from in-sample probabilities (the proxy "
            "learned these labels), which find few of the wrong ones (cleanlab recall 0.17 at 10% flips on "
            "CIFAR-10); score with --folds 5, or --probe with a model that never saw these labels, to find most"]


def resolve_label_issues(select: SelectConfig, lead_manifest: dict[str, Any]) -> tuple[SelectConfig, list[str]]:
    """`drop_label_issues=None` (the default) made a decision: drop the lead table's label issues
    unless it has none on record or the proxy that flagged them is near chance (its agreement with the
    given labels, in sample or not, below MIN_SKILL: a random or untrained model flags most of the
    data). Returns the config with a bool, and a line saying why when they are kept."""
    if select.drop_label_issues is not None:
        return select, []
    found = lead_manifest.get("proxy", {}).get("label_issues") or {}
    agreement = found.get("agreement")
    if agreement is None:  # no label issues on record: nothing to drop
        return replace(select, drop_label_issues=False), []
    flagger = skill(agreement, chance(lead_manifest))
    if flagger >= MIN_SKILL:
        return replace(select, drop_label_issues=True), []
    return replace(select, drop_label_issues=False), [
        f"label issues kept: the proxy that flagged them ({found.get('label_issues')} of {found.get('rows')}) agrees "
        f"with {agreement:.0%} of the given labels (skill {flagger:.2f} < {MIN_SKILL}: near chance), so its flags "
        "say little; train a stronger proxy, or pass --drop-label-issues to drop them anyway"]
