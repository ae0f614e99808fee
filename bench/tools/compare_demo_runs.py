"""Are two `curate demo` runs the same where they must be? For a refactor: run the demo before and
after on fresh clones (same seed), then compare the deterministic outputs here.

Compared: the demo report's label-noise AUCs, proxy accuracies, localisation, selection counts,
duplicate figures and shard counts; every row of every scores table; every selection.parquet; and
every member of every shard, sample by sample. The runs live in different folders, so absolute
paths inside the outputs are compared after replacing A's folder with B's. `--ignore` names json
fields of shard samples to leave out (say why in the note that uses it).

    python bench/tools/compare_demo_runs.py /tmp/before/demo-run /tmp/after/demo-run [--ignore checkpoint_sha256]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.shard.format import read_samples  # noqa: E402

SCORES = ("scores-cnn", "scores-vit", "scores-val")
SHARDS = ("shards", "shards-full", "shards-random")
REPORT_KEYS = {"proxies": ("label_noise_auc", "accuracy_vs_true_label", "localisation"),
               "shard": ("inputs", "kept", "reasons", "flipped_removed", "clean_removed", "duplicates", "shards",
                         "train_samples", "verify_faults")}


def _report(run: Path) -> dict[str, Any]:
    m = json.loads((run / "report.json").read_text())["metrics"]
    return {"proxies": {p: {k: v[k] for k in REPORT_KEYS["proxies"]} for p, v in m["proxies"].items()},
            "shard": {k: m["shard"][k] for k in REPORT_KEYS["shard"]}}


def _json_without(raw: bytes, prefix: tuple[str, str], ignore: set[str]) -> Any:
    obj = json.loads(raw.decode().replace(*prefix))
    return _drop(obj, ignore)


def _drop(obj: Any, ignore: set[str]) -> Any:
    if isinstance(obj, dict):
        return {k: _drop(v, ignore) for k, v in obj.items() if k not in ignore}
    if isinstance(obj, list):
        return [_drop(v, ignore) for v in obj]
    return obj


def compare_tables(a: Path, b: Path, prefix: tuple[str, str]) -> list[str]:
    diffs = []
    for name in SCORES:
        ta = pl.read_parquet(sorted((a / name).glob("part-*.parquet")))
        ta = ta.with_columns(pl.col("source").str.replace(prefix[0], prefix[1], literal=True))
        tb = pl.read_parquet(sorted((b / name).glob("part-*.parquet")))
        print(f"{name}: {len(tb)} rows, identical: {ta.equals(tb)}")
        diffs += [] if ta.equals(tb) else [name]
    return diffs


def compare_shards(a: Path, b: Path, prefix: tuple[str, str], ignore: set[str]) -> list[str]:
    diffs = []
    for name in SHARDS:
        tars_a, tars_b = sorted((a / name).glob("*.tar")), sorted((b / name).glob("*.tar"))
        if [t.name for t in tars_a] != [t.name for t in tars_b]:
            diffs.append(f"{name}: shard files differ")
            continue
        n = 0
        for ta, tb in zip(tars_a, tars_b):
            for sa, sb in zip(read_samples(ta), read_samples(tb), strict=True):
                n += 1
                for field in sorted((set(sa) | set(sb)) - {"__url__", "__local_path__"}):
                    va, vb = sa.get(field), sb.get(field)
                    if field == "json":
                        va, vb = _json_without(va, prefix, ignore), _json_without(vb, ("", ""), ignore)
                    if va != vb:
                        diffs.append(f"{name}/{ta.name}: {sa.get('__key__')} / {sb.get('__key__')}: {field}")
        sel_a, sel_b = (pl.read_parquet(r / name / "selection.parquet") for r in (a, b))
        print(f"{name}: {len(tars_b)} shards, {n} samples compared; selection.parquet identical: "
              f"{sel_a.equals(sel_b)}")
        diffs += [] if sel_a.equals(sel_b) else [f"{name}/selection.parquet"]
    return diffs


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--ignore", action="append", default=[], help="json field of shard samples to leave out")
    args = ap.parse_args()
    prefix = (str(args.a.resolve().parent) + "/", str(args.b.resolve().parent) + "/")
    report_a, report_b = _report(args.a), _report(args.b)
    print(json.dumps(report_b, indent=1, sort_keys=True))
    diffs = [] if report_a == report_b else ["report.json figures"]
    print(f"report figures identical: {report_a == report_b}")
    diffs += compare_tables(args.a, args.b, prefix)
    diffs += compare_shards(args.a, args.b, prefix, set(args.ignore))
    print(f"{len(diffs)} difference(s)" + (f", e.g. {diffs[:5]}" if diffs else ""))
    raise SystemExit(1 if diffs else 0)


if __name__ == "__main__":
    main()
