"""sparsevit follows timm instead of copying it: a call that changes nothing is timm's own
forward, the sparse path agrees with it, timm options it cannot honour are refused, gradient
checkpointing is honoured, and inputs are normalised with the model's own mean and std. Also the
training settings no other test reaches, each shown to take effect."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cli import main
from curate.shard.format import read_split
from sparsevit import data
from sparsevit.model import SparseConfig, SparseViT, create_sparse
from sparsevit.schedule import KEEP_SCHEDULES
from sparsevit.train import TrainConfig, build, restore, train_loader, train_step

from .sparse_fixtures import write_shards

TINY = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=2", "--img-size", "64", "--patch-size", "8",
        "--batch-size", "8", "--num-classes", "4", "--quiet", "--workers", "0"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("toy"))


def _tiny(cfg: SparseConfig | None = None, name: str = "vit_tiny_patch16_224", **kw) -> SparseViT:
    torch.manual_seed(0)
    return create_sparse(name, cfg or SparseConfig(), 4, 64, 8, depth=3, **kw)


def test_a_dense_call_is_timms_forward_and_the_sparse_path_agrees_with_it():
    core = _tiny().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        timm_out = core.vit(x)
        assert torch.equal(core(x), timm_out)  # delegated: bit for bit
        ours = core.vit.forward_head(core.forward_features(x, None, 1.0, 1.0))  # sparsevit's own block loop
    torch.testing.assert_close(ours, timm_out, rtol=1e-5, atol=1e-5)


def test_patch_drop_rate_is_refused_not_ignored():
    with pytest.raises(ValueError, match="patch_drop_rate is not supported.*--drop-by random"):
        _tiny(patch_drop_rate=0.5)


def test_curate_train_refuses_patch_drop_rate_before_writing(toy: Path, tmp_path: Path):
    res = CliRunner().invoke(main, ["train", str(toy), "--out", str(tmp_path / "run"), *TINY,
                                    "--model-arg", "patch_drop_rate=0.5"])
    assert res.exit_code != 0 and "patch_drop_rate is not supported" in res.output
    assert not (tmp_path / "run").exists()


def test_gradient_checkpointing_is_honoured_and_changes_no_gradient():
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    imp = torch.rand(4, 64)
    grads = []
    for checkpointing in (False, True):
        core = _tiny().train()
        core.vit.set_grad_checkpointing(checkpointing)
        F.cross_entropy(core(x, imp, keep=0.5), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in core.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])
    core = _tiny().train()
    core.vit.set_grad_checkpointing(True)
    seen = []
    core.vit.blocks[1].mlp.fc1.register_forward_hook(lambda *_: seen.append(1))
    core(x, imp, keep=0.5).sum().backward()
    assert len(seen) == 2  # run forward, and again in backward: checkpointed


@pytest.mark.parametrize("model, bound", [("vit_tiny_patch16_224", 1.0), ("deit_tiny_patch16_224", 2.7)])
def test_the_loader_normalises_with_the_models_own_mean_and_std(toy: Path, tmp_path: Path, model: str,
                                                                bound: float):
    """vit_tiny (augreg) was configured with mean = std = 0.5: pixels land in [-1, 1]; deit_tiny
    with ImageNet's: the fixtures' saturated colours reach beyond 2."""
    cfg = TrainConfig(shards=toy, out=tmp_path / "run", model=model, img_size=64, patch_size=8,
                      model_kwargs={"depth": 1}, num_classes=4, batch_size=16, workers=0, progress=False)
    run = build(cfg, device=torch.device("cpu"))
    assert data.Normalize.of(run.core.vit) == data.Normalize(*[run.core.vit.pretrained_cfg[k] for k in ("mean", "std")])
    batch = next(train_loader(run, read_split(toy, "train"), 0)[0])
    assert isinstance(batch, data.Batch) and len(batch) == 16
    top = float(batch.image.abs().max())
    assert top <= bound + 1e-5 and (model.startswith("vit") or top > 2.0)


def _step_loss(cfg: TrainConfig) -> tuple[float, float]:
    """train_step's reported loss for one fixed batch, and the loss computed here from the
    model's logits before the step with the config's label smoothing."""
    run = build(cfg, device=torch.device("cpu"))
    batch = next(train_loader(run, read_split(cfg.shards, "train"), 0)[0])
    with torch.no_grad():
        logits = run.core(batch.image, batch.importance, cfg.keep)
    expected = F.cross_entropy(logits, batch.label, label_smoothing=cfg.smoothing, reduction="sum")
    stats = train_step(run, batch, 0.0, 0, 0.1)
    return stats["loss"], float(expected)


def test_label_smoothing_reaches_the_loss(toy: Path, tmp_path: Path):
    cfg = TrainConfig(shards=toy, out=tmp_path / "run", model="vit_tiny_patch16_224", img_size=64, patch_size=8,
                      model_kwargs={"depth": 1}, num_classes=4, batch_size=16, workers=0, progress=False)
    for smoothing in (0.0, 0.4):
        got, expected = _step_loss(replace(cfg, smoothing=smoothing))
        assert got == pytest.approx(expected, rel=1e-4)


def test_the_selector_loss_weights_scale_their_losses(toy: Path, tmp_path: Path):
    """The step's loss is task + distill_weight x distill + ratio_weight x ratio: on one batch
    from the same initial weights, the selector's gradient is linear in the two weights, and
    each weight moves it."""
    cfg = TrainConfig(shards=toy, out=tmp_path / "run", model="vit_tiny_patch16_224", img_size=64, patch_size=8,
                      model_kwargs={"depth": 2}, num_classes=4, batch_size=16, workers=0, progress=False,
                      keep=0.5, sparse=SparseConfig(selector_blocks=(1,)))
    batch = next(train_loader(build(cfg, device=torch.device("cpu")), read_split(toy, "train"), 0)[0])

    def selector_grad(distill_weight: float, ratio_weight: float) -> torch.Tensor:
        run = build(replace(cfg, distill_weight=distill_weight, ratio_weight=ratio_weight), device=torch.device("cpu"))
        train_step(run, batch, 0.0, 0, 0.1)  # the gradients stay on the parameters until the next step
        return torch.cat([p.grad.flatten() for p in run.core.selectors.parameters()])

    task, distill, ratio = selector_grad(0, 0), selector_grad(1, 0), selector_grad(0, 1)
    assert (distill - task).abs().sum() > 0 and (ratio - task).abs().sum() > 0
    torch.testing.assert_close(selector_grad(2, 3) - task, 2 * (distill - task) + 3 * (ratio - task),
                               rtol=1e-3, atol=1e-6)


def test_keep_schedule_weight_decay_and_drop_path_take_effect_through_the_cli(toy: Path, tmp_path: Path):
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", str(toy), "--out", str(run), *TINY, "--epochs", "3", "--keep", "0.5",
                                    "--keep-schedule", "toe", "--weight-decay", "0.2", "--drop-path", "0.1",
                                    "--smoothing", "0.3", "--log-every", "1", "--warmup-epochs", "0"])
    assert res.exit_code == 0, res.output
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keeps = {r["epoch"]: r["keep"] for r in steps if r["kind"] == "step"}
    assert keeps == {e: KEEP_SCHEDULES["toe"](e, 3, 0.5) for e in range(3)} == {0: 0.5, 1: 0.75, 2: 1.0}
    saved = json.loads((run / "config.json").read_text())
    assert (saved["weight_decay"], saved["drop_path"], saved["smoothing"]) == (0.2, 0.1, 0.3)
    trained = restore(run)
    decays = sorted({g["weight_decay"] for g in trained.opt.param_groups})
    assert decays == [0.0, 0.2]  # norms, biases and embeddings undecayed; the rest at --weight-decay
    assert trained.core.vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
