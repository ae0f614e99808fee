"""Proxies weighed by what they learned: with several scores tables, each proxy's vote in the
combined score is its skill on data it did not train on, and a proxy near chance has none.

A proxy's held-out accuracy is the agreement of its out-of-sample predictions with the given
labels, which `curate score` records whenever it has them: `--folds K` (each image predicted by
the proxy that did not train on it) or `--probe`. An in-sample proxy (K = 1) records only how
well it memorised its labels, which says nothing about its scores, so it has no held-out
accuracy. Skill is that accuracy rescaled so that chance is 0 and perfect is 1:
skill = (accuracy - chance) / (1 - chance), chance = 1 / classes.

Without any held-out accuracy every table votes equally (what `curate shard` always did); with
some tables recorded and others not, only the recorded ones vote (an unrecorded proxy cannot be
compared with them; its maps may still ship).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

# Below this skill a proxy is left out: at 10 classes, 19% accuracy where chance is 10%. Such a
# proxy's ranks are mostly noise (demo-vit: 30% on CIFAR-10, label-noise AUC 0.78), and averaged
# with a strong proxy's they blur its order rather than add to it.
MIN_SKILL = 0.1


@dataclass(frozen=True)
class ProxyWeight:
    """One scores table's part in the combined score."""

    index: int  # position in --scores
    scores: str  # the table's folder
    proxy: str  # the proxy's name
    accuracy: float | None  # held-out accuracy against the given labels; None: not recorded
    chance: float  # 1 / classes
    skill: float | None  # (accuracy - chance) / (1 - chance)
    weight: float  # share of the vote (the kept weights sum to 1); 0: left out
    why: str  # one line for people: why this weight

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_out_accuracy(manifest: dict[str, Any]) -> float | None:
    """The proxy's out-of-sample agreement with the given labels, when the table has one."""
    proxy = manifest.get("proxy", {})
    out_of_sample = "probe" in proxy or manifest.get("config", {}).get("folds", 1) > 1
    agreement = (proxy.get("label_issues") or {}).get("agreement")
    return float(agreement) if out_of_sample and agreement is not None else None


def chance(manifest: dict[str, Any]) -> float:
    """Accuracy by chance on the table's classes: 1 / classes (at least 2)."""
    return 1.0 / max(2, int(manifest.get("counts", {}).get("classes") or 2))


def skill(accuracy: float, by_chance: float) -> float:
    """Accuracy rescaled so that chance is 0 and perfect is 1."""
    return (accuracy - by_chance) / (1.0 - by_chance)


def weigh(dirs: Sequence[Path], manifests: Sequence[dict[str, Any]]) -> list[ProxyWeight]:
    """Each table's weight: skill-proportional over the tables with a held-out accuracy and a skill
    of at least MIN_SKILL; equal when no table records one. Raises when no table is left to vote."""
    accuracies = [held_out_accuracy(m) for m in manifests]
    chances = [chance(m) for m in manifests]
    names = [m.get("proxy", {}).get("name", "?") for m in manifests]
    recorded = [a is not None for a in accuracies]
    if not any(recorded):
        why = "no held-out accuracy recorded (score with --folds K or --probe to weigh): equal weights"
        return [ProxyWeight(i, str(d), names[i], None, chances[i], None, 1.0 / len(dirs), why)
                for i, d in enumerate(dirs)]
    skills = [skill(a, c) if a is not None else None for a, c in zip(accuracies, chances)]
    # a lone table decides: nothing to weigh it against; an unrecorded one cannot be compared
    kept = [s is not None and (s >= MIN_SKILL or len(dirs) == 1) for s in skills]
    if not any(kept):
        raise ValueError("every proxy with a held-out accuracy is near chance (skill < "
                         f"{MIN_SKILL}: {', '.join(f'{d} {s:.2f}' for d, s in zip(dirs, skills) if s is not None)}); "
                         "their scores are noise: train stronger proxies")
    total = sum(max(s, 1e-9) for s, k in zip(skills, kept) if k and s is not None)
    weights = [max(s, 1e-9) / total if k and s is not None else 0.0 for s, k in zip(skills, kept)]
    return [ProxyWeight(i, str(d), names[i], accuracies[i], chances[i], skills[i], weights[i],
                        _why(skills[i], kept[i], weights[i]))
            for i, d in enumerate(dirs)]


def _why(skill: float | None, kept: bool, weight: float) -> str:
    if skill is None:
        return ("no held-out accuracy (scored in sample; --folds K or --probe records one): not weighed, left out "
                "of the vote; its maps may still ship")
    if skill < MIN_SKILL:
        return (f"skill {skill:.2f} < {MIN_SKILL}: near chance, but the only table, so it decides: its scores are "
                "close to noise" if kept else f"skill {skill:.2f} < {MIN_SKILL}: near chance, left out")
    return f"skill {skill:.2f}: weight {weight:.2f}"


def lead(weights: Sequence[ProxyWeight]) -> int:
    """The table label issues and embeddings come from: the most accurate kept proxy (the first
    on ties, and the first when nothing is recorded)."""
    ranked = [w for w in weights if w.weight > 0]
    return max(ranked, key=lambda w: (w.accuracy if w.accuracy is not None else -1.0, -w.index)).index


def maps_order(weights: Sequence[ProxyWeight]) -> list[int]:
    """Where to look for importance maps, best first: voting proxies by held-out accuracy, then
    the unrecorded ones, then those near chance; in --scores order when nothing is recorded."""
    def tier(w: ProxyWeight) -> int:
        return 0 if w.weight > 0 else 1 if w.skill is None else 2

    return sorted(range(len(weights)), key=lambda i: (tier(weights[i]), -(weights[i].accuracy or 0.0), i))


def describe(w: ProxyWeight, lead_index: int, maps_index: int | None) -> str:
    """`proxy 1 (scores-vit, demo-vit): held-out accuracy 21.0% (chance 10.0%): skill 0.12 ...`."""
    acc = (f"held-out accuracy {w.accuracy:.1%} (chance {w.chance:.1%}): " if w.accuracy is not None else "")
    roles = [r for r, on in (("label issues and embeddings", w.index == lead_index),
                             ("maps", w.index == maps_index)) if on]
    tail = f"; {' and '.join(roles)} from here" if roles else ""
    return f"proxy {w.index} ({w.scores}, {w.proxy}): {acc}{w.why}{tail}"
