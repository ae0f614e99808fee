"""What the equal-budget benchmark found about a selection recipe at the user's setting, said when
`curate shard` runs one it found losing (docs/benchmarks.md, "The value where users prune").

The setting is read from the lead score table: the share of inputs it flags as label issues, when
those come from out-of-sample probabilities (`--folds K` or `--probe`). In-sample flags come from a
proxy that learned its labels and understate the noise (issue 24: cleanlab recall 0.17 at 10% flips),
so from them nothing is claimed.
"""
from __future__ import annotations

from typing import Any

from curate.select.policies import SelectConfig
from curate.select.weighing import held_out_accuracy

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
    if share is None or share < NOISY_SHARE or select.drop_label_issues or select.relabel_min_prob is not None:
        return []
    return [f"{share:.0%} of the inputs are label issues (out-of-sample probabilities) and this recipe keeps "
            "them: at 20% label noise the benchmark found dropping them ahead of full data at every budget, "
            f"and pruning that keeps them behind full data ({SECTION}); add --drop-label-issues, with "
            "--keep 1.0 to prune nothing else"]
