"""`curate train` end to end on shards written by the test: metrics, checkpoints that timm loads,
SIGKILL + resume equal to an uninterrupted run, and DDP under torchrun with 2 CPU ranks."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

from cli import main
from sparsevit.train import trim_metrics

from .conftest import ROOT
from .sparse_fixtures import write_shards

TINY = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=2", "--img-size", "64", "--patch-size", "8",
        "--batch-size", "8", "--lr", "0.05", "--num-classes", "4", "--quiet"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("toy"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_metrics_and_a_checkpoint_timm_loads(toy: Path, tmp_path: Path):
    run = tmp_path / "run"
    args = ["train", str(toy), "--out", str(run), *TINY, "--epochs", "2", "--keep", "0.5", "--package-token",
            "--mixup", "0.8", "--cutmix", "1.0", "--ema", "0.9", "--example-pruning", "infobatch",
            "--online-blocks", "0", "--online-keep", "0.7", "--log-every", "2", "--crop-scale", "0.35", "1.0"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    recs = records(run)
    start, steps, epochs = recs[0], [r for r in recs if r["kind"] == "step"], [r for r in recs if r["kind"] == "epoch"]
    assert start["tokens_per_block"] == [1 + 32 + 1, 1 + 24 + 1]  # keep 0.5 (+ package), then 0.7 at block 0
    assert start["est_train_gflops_per_image"] < 0.6 * start["dense_train_gflops_per_image"]
    assert [e["epoch"] for e in epochs] == [0, 1] and len(steps) >= 4
    for e in epochs:
        assert 0 <= e["val_acc"] <= 1 and 0 <= e["val_acc_dropped"] <= 1 and e["val_images"] == 16
        assert e["images"] + e["unused"] == 64 and e["images_per_s"] > 0
    assert epochs[1]["trained"] < epochs[1]["images"]  # InfoBatch sat some low-loss examples out
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=64, patch_size=8, depth=2)
    vit.load_state_dict(state["model"])  # timm's own names: usable without sparsevit
    assert state["epoch"] == 2 and json.loads((run / "summary.json").read_text())["epochs"] == 2
    assert json.loads((run / "config.json").read_text())["crop_scale"] == [0.35, 1.0]


def test_non_empty_out_and_missing_maps_are_clear_errors(toy: Path, tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "x").write_text("")
    for extra in ((), ("--overwrite",), ("--resume",)):
        res = CliRunner().invoke(main, ["train", str(toy), "--out", str(run), *TINY, *extra])
        assert res.exit_code != 0 and "holds no curate run" in res.output and (run / "x").exists()
    res = CliRunner().invoke(main, ["train", str(toy), "--out", str(toy), *TINY, "--overwrite"])
    assert res.exit_code != 0 and "input folder" in res.output
    res = CliRunner().invoke(main, ["train", str(toy), "--out", str(tmp_path / "r0"), *TINY, "--model", "resnet18"])
    assert res.exit_code != 0 and "VisionTransformer" in res.output and not (tmp_path / "r0").exists()
    res = CliRunner().invoke(main, ["train", str(toy), "--out", str(tmp_path / "r1"), *TINY, "--crop-scale", "0.5", "0.2"])
    assert res.exit_code != 0 and "crop_scale" in res.output
    bare = write_shards(tmp_path / "no-maps", maps_on_val=False)
    res = CliRunner().invoke(main, ["train", str(bare), "--out", str(tmp_path / "r2"), *TINY, "--epochs", "1",
                                    "--keep", "0.5"])
    assert res.exit_code == 0, res.output
    last = records(tmp_path / "r2")[-1]
    assert last["val_acc_dropped"] is None  # the validation split has no maps to drop by


def test_undecodable_samples_are_skipped_and_listed_and_a_run_of_nothing_but_them_stops(tmp_path: Path):
    broken = {"train-1-0003", "train-2-0007", "validation-0-0001"}
    shards = write_shards(tmp_path / "some", corrupt=lambda key: key in broken)
    res = CliRunner().invoke(main, ["train", str(shards), "--out", str(tmp_path / "r1"), *TINY, "--epochs", "2"])
    assert res.exit_code == 0, res.output
    epochs = [r for r in records(tmp_path / "r1") if r["kind"] == "epoch"]
    for e in epochs:  # 64 samples, 8 full batches: no sample is left unused, so both broken ones come up
        assert e["unused"] == 0 and e["images"] == 62 and e["skipped"] == 2
        assert sorted(s["key"] for s in e["skipped_keys"]) == ["train-1-0003", "train-2-0007"]
        assert all("truncated image" in s["error"] for s in e["skipped_keys"])
        assert e["val_images"] == 15 and e["val_skipped"] == 1
    dead = write_shards(tmp_path / "dead", corrupt=lambda key: key.startswith("train"))
    res = CliRunner().invoke(main, ["train", str(dead), "--out", str(tmp_path / "r2"), *TINY, "--epochs", "1"])
    assert res.exit_code != 0 and "every training sample failed to decode" in res.output


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *args]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    return state["model"] | {f"selectors.{k}": v for k, v in state["selectors"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--selector-blocks", "0", "--select-by", "mix")], ids=["maps", "selector"])
def test_sigkill_after_an_epoch_then_resume_equals_an_uninterrupted_run(toy: Path, tmp_path: Path,
                                                                        extra: tuple[str, ...]):
    args = ["train", str(toy), *TINY, "--epochs", "3", "--keep", "0.5", "--workers", "1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = tmp_path / "clean"
    subprocess.run(_cli(*args, "--out", str(clean)), check=True, env=env, cwd=ROOT)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", str(killed)), env=env, cwd=ROOT)
    ckpt = killed / "checkpoint.pt"
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = torch.load(ckpt, weights_only=True)["epoch"]
    assert at_kill < 3, "the run finished before it could be killed"
    subprocess.run(_cli(*args, "--out", str(killed), "--resume"), check=True, env=env, cwd=ROOT)
    a, b = _final_weights(clean), _final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [r["epoch"] for r in records(killed) if r["kind"] == "epoch"]
    assert epochs == list(range(3)), epochs  # each epoch logged once: none lost, none repeated
    steps = [(r["epoch"], r["step"]) for r in records(killed) if r["kind"] == "step"]
    assert steps == [(r["epoch"], r["step"]) for r in records(clean) if r["kind"] == "step"]


def test_trim_metrics_drops_what_a_resume_trains_again_and_a_cut_line(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "start", "resumed_at_epoch": 0}, {"kind": "step", "epoch": 0, "step": 1},
             {"kind": "epoch", "epoch": 0, "step": 2}, {"kind": "step", "epoch": 1, "step": 3},
             {"kind": "epoch", "epoch": 1, "step": 4}, {"kind": "step", "epoch": 2, "step": 5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "step", "epo')
    trim_metrics(path, 1)  # the checkpoint says one epoch is done; epoch 1 is trained again
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:3]
    assert path.read_text().endswith("\n")
    trim_metrics(tmp_path / "absent.jsonl", 0)  # nothing logged yet: nothing to do


def test_resume_with_other_settings_is_refused(toy: Path, tmp_path: Path):
    run = tmp_path / "run"
    assert CliRunner().invoke(main, ["train", str(toy), "--out", str(run), *TINY, "--epochs", "1"]).exit_code == 0
    res = CliRunner().invoke(main, ["train", str(toy), "--out", str(run), *TINY, "--epochs", "1", "--keep", "0.5",
                                    "--resume"])
    assert res.exit_code != 0 and "keep" in res.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_train_disjoint_samples_in_equal_steps(toy: Path, tmp_path: Path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(ROOT / "cli.py"), "train", str(toy), "--out", str(run), *TINY,
           "--epochs", "2", "--keep", "0.5", "--workers", "2", "--record-keys", "--example-pruning", "infobatch",
           "--selector-blocks", "0", "--select-by", "mix"]  # the selector's parameters under DDP too
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300)
    for epoch in (0, 1):
        per_rank = [(run / f"keys-rank{r}-epoch{epoch}.txt").read_text().split() for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) > 0  # equal steps on both ranks
        assert not set(per_rank[0]) & set(per_rank[1])  # disjoint
        assert len(set(per_rank[0])) == len(per_rank[0])  # no duplicates within a rank
    recs = records(run)
    assert recs[0]["world_size"] == 2
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert all(e["images"] + e["unused"] == 64 and e["val_images"] == 16 for e in epochs)
    assert all(0 <= e["val_acc_selected"] <= 1 and e["val_selector_overlap"] is not None for e in epochs)
