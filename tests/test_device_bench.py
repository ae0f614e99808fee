"""bench/throughput/device.py's code paths on the CPU, at the smallest size: every measurement runs and the
tables hold a figure for each (the GPU figures come from a GPU machine, docs/benchmarks.md)."""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def _bench():
    sys.path.insert(0, str(ROOT / "bench" / "throughput"))
    spec = importlib.util.spec_from_file_location("device_bench", ROOT / "bench" / "throughput" / "device.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_measurement_runs_and_is_tabled(tmp_path: Path):
    bench = _bench()
    plan = replace(bench.plan_for("cpu", quick=True), images=32, score_images=8, steps=1, warmup=0, batch=8,
                   workers=1, model_kwargs={"depth": 1}, compile_keeps=())
    lines: list[str] = []
    res = bench.measure(plan, tmp_path, lines.append)
    assert len(res["model_only"]) == len(bench.KEEPS)
    assert {r["loader"] for r in res["loader"]} == set(bench.LOADERS)
    assert len(res["end_to_end"]) == len(bench.LOADERS) * len(bench.KEEPS)
    assert all(r["img_s"] > 0 for part in ("model_only", "loader", "end_to_end") for r in res[part])
    assert res["score"]["bare_img_s"] > 0 and res["score"]["score_img_s"] > 0
    assert set(res["predict"]["deit_tiny_patch16_224"]) == {"dense", "keep 0.7", "keep 0.5"}
    assert all(v > 0 for v in res["predict"]["deit_tiny_patch16_224"].values())
    text = bench.table(plan, res, "# header")
    assert text.count("| deit_tiny_patch16_224 |") == len(bench.KEEPS) + len(bench.LOADERS) + 1  # + predict
    assert "| --decode gpu |" in text
    measured = sum(len(res[part]) for part in ("model_only", "loader", "end_to_end"))
    assert lines[0].startswith("setup: ") and len(lines) == 1 + measured + 2  # + setup, score, predict
    json.dumps(res)  # device.json must hold it
