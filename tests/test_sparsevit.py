"""sparsevit pieces: loader plans, maps through augmentation, token dropping, attention modes,
example pruning. CPU, small models, data written by the test."""
import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from curate.common.vit import cls_attention, qkv_heads
from curate.shard import format as fmt
from sparsevit import attention, data, prune, schedule
from sparsevit.model import SparseConfig, SparseViT, create_sparse, drop_tokens, num_keep

from .sparse_fixtures import COLOURS, GRID, SIZE, object_image, write_shards


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("toy"))


def tiny(cfg: SparseConfig | None = None, name: str = "vit_tiny_patch16_224", **kw) -> SparseViT:
    torch.manual_seed(0)
    return create_sparse(name, cfg or SparseConfig(), num_classes=4, img_size=64, patch_size=8, depth=4, **kw).eval()


# --- loader -------------------------------------------------------------------------------

def rank_keys(toy: Path, rank: int, world: int, epoch: int, monkeypatch: pytest.MonkeyPatch,
              batch: int = 4) -> list[str]:
    split = fmt.read_split(toy, "train")
    plan = data.plan_epoch(split, epoch, seed=0, world=world, workers=2, batch_size=batch)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    aug = data.Augment(data.TrainTransform(data.Geometry(64, 8)), need_maps=True)
    pipe = data.make_pipeline(plan, aug, batch, shuffle_buffer=8, seed=0, epoch=epoch)
    batches = list(data.iterate(data.make_loader(pipe, 2), plan.steps, batch))
    assert len(batches) == plan.steps and all(len(b) == batch for b in batches)
    assert batches[0].importance.shape == (batch, 64)
    return [k for b in batches for k in b.keys]


def test_ranks_take_equal_steps_over_disjoint_samples(toy: Path, monkeypatch: pytest.MonkeyPatch):
    seen = [rank_keys(toy, r, 2, epoch=0, monkeypatch=monkeypatch) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) > 0
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0])) == len(seen[0])
    split = fmt.read_split(toy, "train")
    plan = data.plan_epoch(split, 0, 0, 2, 2, 4)
    assert len(seen[0]) + len(seen[1]) + plan.unused == split.num_samples == 64


def test_epochs_reshuffle_shards_the_same_on_every_rank(toy: Path):
    split = fmt.read_split(toy, "train")
    a, b = (data.plan_epoch(split, e, seed=0, world=2, workers=2, batch_size=4) for e in (0, 1))
    assert sorted(a.urls) == sorted(b.urls) == sorted(split.urls) and a.urls != b.urls
    assert data.plan_epoch(split, 0, 0, 2, 2, 4) == a  # a function of (seed, epoch) only


def test_too_few_shards_for_ranks_and_workers_is_a_clear_error(toy: Path):
    split = fmt.read_split(toy, "train")
    with pytest.raises(ValueError, match="every worker needs a shard"):
        data.plan_epoch(split, 0, 0, world=4, workers=4, batch_size=4)


def test_missing_index_and_split_are_clear_errors(toy: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        fmt.read_split(tmp_path, "train")
    with pytest.raises(KeyError, match="no split 'test'"):
        fmt.read_split(toy, "test")


def _object_share(img: torch.Tensor, colour: tuple[int, int, int], patches: torch.Tensor, p: int) -> float:
    """Share of the pixels in the given patches that have the object's colour."""
    pix = (img * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) +
           torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) * 255
    on = ((pix - torch.tensor(colour, dtype=torch.float32).view(3, 1, 1)).abs().amax(0) < 40).float()
    cells = on.reshape(img.shape[1] // p, p, img.shape[2] // p, p).mean((1, 3)).flatten()
    return float(cells[patches].mean())


@pytest.mark.parametrize("seed", range(6))
def test_map_follows_crop_and_flip_onto_the_object(seed: int):
    rng = random.Random(seed)
    raw, grid, _ = object_image(rng, label=2, side=28)
    image = Image.open(__import__("io").BytesIO(raw)).convert("RGB")
    random.seed(seed)
    tf = data.TrainTransform(data.Geometry(96, 12), scale=(0.35, 1.0), hflip=0.5)  # other size, other patch
    x, pooled = tf(image, grid)
    assert pooled.shape == (8, 8)
    top = pooled.flatten().topk(4).indices
    bottom = pooled.flatten().topk(16, largest=False).indices
    assert _object_share(x, COLOURS[2], top, 12) > 0.8  # the top patches lie on the square
    assert _object_share(x, COLOURS[2], bottom, 12) < 0.05


def test_eval_transform_map_matches_a_plain_resize():
    raw, grid, _ = object_image(random.Random(0), label=0)
    image = Image.open(__import__("io").BytesIO(raw)).convert("RGB")
    _, pooled = data.EvalTransform(data.Geometry(SIZE, SIZE // GRID), crop_pct=1.0)(image, grid)
    assert torch.allclose(pooled, torch.from_numpy(grid).float(), atol=1e-6)  # identity crop -> same map


def test_map_of_another_resolution_is_resampled():
    grid = np.zeros((4, 4), np.float32)
    grid[0, 3] = 1.0  # top-right quarter-cell
    pooled = data.crop_map(grid, (0, 0, 100, 100), (100, 100), out=8, flip=False)
    assert pooled.shape == (8, 8) and pooled.flatten().argmax().item() in {6, 7}
    flipped = data.crop_map(grid, (0, 0, 100, 100), (100, 100), out=8, flip=True)
    assert flipped.flatten().argmax().item() in {0, 1}


@pytest.mark.parametrize("array", [np.random.rand(8, 8).astype("<f2"), np.random.rand(1, 1).astype("<f2"),
                                   np.asfortranarray(np.random.rand(4, 6).astype("<f2"))])
def test_load_npy_equals_np_load_also_from_its_header_cache(array: np.ndarray):
    raw = io.BytesIO()
    np.save(raw, array)
    for _ in range(2):  # the second read takes the cached header
        got = fmt.load_npy(raw.getvalue())
        assert got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array)


def _npy(array: np.ndarray, **kw: object) -> bytes:
    raw = io.BytesIO()
    np.save(raw, array, **kw)
    return raw.getvalue()


def test_load_npy_refuses_what_is_not_a_map_before_allocating_it():
    with pytest.raises(ValueError, match="not a .npy"):
        fmt.load_npy(b"\xff\xd8\xff\xe0 a jpeg")
    with pytest.raises(ValueError, match="objects"):
        fmt.load_npy(_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True))
    for wrong in (np.zeros((3, 5), np.float32), np.zeros((2, 3, 4), np.float16), np.zeros(7, np.float16)):
        with pytest.raises(ValueError, match="float16 2-D"):
            fmt.load_npy(_npy(wrong))
    # a header that claims 100000 x 100000 (18.6 GiB as float16) is refused from the header alone
    header = _npy(np.zeros((2, 2), np.float16)).replace(b"(2, 2)", b"(100000, 100000)")
    with pytest.raises(ValueError, match="sides"):
        fmt.load_npy(header)
    with pytest.raises(ValueError, match="bytes for shape"):
        fmt.load_npy(_npy(np.zeros((4, 4), np.float16))[:-2])


def test_the_loader_skips_a_sample_whose_map_is_damaged_and_says_why():
    rng = random.Random(0)
    jpg, grid, _ = object_image(rng, 1)
    augment = data.Augment(data.TrainTransform(data.Geometry(SIZE, SIZE // GRID)), need_maps=True)
    good = {"__key__": "k", "jpg": jpg, "cls": b"1", "importance.npy": _npy(grid.astype(np.float16))}
    assert augment(good)["importance"].shape == (GRID, GRID)
    damaged = {
        "NaN": _npy(np.full((GRID, GRID), np.nan, np.float16)),
        "sides": _npy(np.zeros((2, 2), np.float16)).replace(b"(2, 2)", b"(100000, 100000)"),
        "float16 2-D": _npy(np.zeros((2, 3, 4), np.float16)),
    }
    for why, raw in damaged.items():
        out = augment({**good, "importance.npy": raw})
        assert out["key"] == "k" and why in out["error"], out
    with pytest.raises(ValueError, match="NaN"):  # the error policy is a parameter
        data.Augment(augment.transform, True, on_error="raise")({**good, "importance.npy": damaged["NaN"]})


def test_random_resized_box_draws_torchvisions_distribution_inside_the_image():
    random.seed(0)
    torch.manual_seed(0)
    ours = np.array([data.random_resized_box(48, 80, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(4000)])
    image = Image.new("RGB", (80, 48))
    ref = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)])
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 48).all() and (left + w <= 80).all()
    for col in range(4):  # top, left, height, width: the same quartiles as torchvision's draws
        q_ours, q_ref = (np.quantile(b[:, col], [0.25, 0.5, 0.75]) for b in (ours, ref))
        assert np.abs(q_ours - q_ref).max() <= 2, (col, q_ours, q_ref)
    # impossible draws fall back to the largest centred box within the ratio range, as torchvision's
    assert data.random_resized_box(10, 100, (0.9, 1.0), (1.0, 1.0)) == (0, 45, 10, 10)


def test_mixup_and_cutmix_mix_maps_with_the_images_weights_and_box():
    torch.manual_seed(0)
    x = torch.zeros(2, 3, 32, 32)
    x[1] = 1.0
    maps = torch.stack([torch.zeros(16), torch.ones(16)])
    mixup = data.MapMixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=2)
    np.random.seed(1)
    mx, target, mm = mixup.mix(x.clone(), torch.tensor([0, 1]), maps.clone(), grid=4)
    lam = float(target[0, 0])
    assert torch.allclose(mx[0], torch.full_like(mx[0], 1 - lam), atol=1e-6)
    assert torch.allclose(mm[0], torch.full((16,), 1 - lam), atol=1e-6)
    cutmix = data.MapMixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=2)
    np.random.seed(3)
    cx, target, cm = cutmix.mix(x.clone(), torch.tensor([0, 1]), maps.clone(), grid=4)
    pasted = cx[0, 0].reshape(4, 8, 4, 8).mean((1, 3)).flatten()  # share of each patch from image 1
    assert torch.allclose(cm[0], pasted, atol=1e-6)
    assert math.isclose(float(target[0, 1]), float(pasted.mean()), abs_tol=1e-6)  # label weight = pasted area


# --- token dropping -----------------------------------------------------------------------

def test_dense_wrapper_equals_timm_forward():
    m = tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), m.vit(x))


def test_drop_keeps_prefix_and_the_top_patches_in_order():
    x = torch.arange(2 * 7 * 1, dtype=torch.float32).reshape(2, 7, 1).expand(-1, -1, 3).contiguous()
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0, 0.7], [1, 2, 3, 4, 5, 6.0]])
    out, kept = drop_tokens(x, scores, keep=0.5, prefix=1, package=False)
    assert out[0, :, 0].tolist() == [0, 2, 4, 6]  # CLS, then patches 1, 3, 5 (scores .9, .8, .7)
    assert out[1, :, 0].tolist() == [7, 11, 12, 13]
    assert kept[0].tolist() == pytest.approx([0.9, 0.8, 0.7])
    pk, pk_scores = drop_tokens(x, scores, keep=0.5, prefix=1, package=True)
    w = torch.tensor([0.1, 0.2, 0.0]) / 0.3  # dropped patches 0, 2, 4 weighted by their scores
    assert pk.shape == (2, 5, 3) and pk[0, -1, 0].item() == pytest.approx(float((w * torch.tensor([1., 3, 5])).sum()))
    assert pk_scores[0, -1].item() == pytest.approx(0.1)


def test_importance_drop_picks_the_marked_patches_random_does_not():
    m = tiny(SparseConfig())
    seen = {}
    m.vit.blocks[0].norm1.register_forward_pre_hook(lambda _m, a: seen.__setitem__("n", a[0].shape[1]))
    imp = torch.zeros(2, 64)
    imp[:, :16] = 1.0
    with torch.no_grad():
        m(torch.randn(2, 3, 64, 64), imp, keep=0.25)
    assert seen["n"] == 1 + 16
    with pytest.raises(ValueError, match="needs the importance maps"):
        m(torch.randn(2, 3, 64, 64), None, keep=0.5)
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        m(torch.randn(2, 3, 64, 64), torch.zeros(2, 49), keep=0.5)


def test_distilled_deit_keeps_both_prefix_tokens_and_online_drops_shrink_later_blocks():
    m = tiny(SparseConfig(online_blocks=(1, 2), package=True), name="deit_tiny_distilled_patch16_224")
    assert m.prefix == 2
    counts = []
    for blk in m.vit.blocks:
        blk.norm1.register_forward_pre_hook(lambda _m, a: counts.append(a[0].shape[1]))
    with torch.no_grad():
        m(torch.randn(2, 3, 64, 64), torch.rand(2, 64), keep=0.5, online_keep=0.5)
    assert counts == m.tokens_per_block(0.5, 0.5) == [2 + 33, 2 + 33, 2 + 18, 2 + 10]


def test_flops_estimate_falls_with_keep():
    m = tiny()
    assert m.train_gflops(0.5) / m.train_gflops(1.0) == pytest.approx(0.5, abs=0.03)
    assert num_keep(196, 0.7) == 138 and num_keep(10, 0.01) == 1


def _measured_block_flops(cfg: SparseConfig, keep: float, online_keep: float) -> tuple[float, float]:
    """(FLOPs torch counts for forward + backward of the blocks, the model's own estimate), for a
    batch of 3: the blocks' share is the full model's count minus that of the same model with no
    blocks (patch embedding, head and their gradients are the same in both)."""
    def run(depth: int) -> tuple[float, SparseViT]:
        torch.manual_seed(0)
        m = create_sparse("vit_tiny_patch16_224", cfg if depth else SparseConfig(drop_by=cfg.drop_by), 4, 64, 8,
                          depth=depth, embed_dim=64, num_heads=2)
        with FlopCounterMode(display=False) as counter:
            m(torch.randn(3, 3, 64, 64), torch.rand(3, 64), keep, online_keep).sum().backward()
        return counter.get_total_flops(), m

    (full, model), (bare, _) = run(2), run(0)
    return full - bare, 3 * model.train_gflops(keep, online_keep) * 1e9


@pytest.mark.parametrize("cfg, keep, online", [(SparseConfig(), 1.0, 1.0), (SparseConfig(), 0.5, 1.0),
                                               (SparseConfig(attention="gather"), 0.7, 1.0),
                                               (SparseConfig(online_blocks=(0,), package=True), 0.7, 0.5)])
def test_flop_estimate_in_metrics_matches_torchs_flop_counter(cfg: SparseConfig, keep: float, online: float):
    measured, estimated = _measured_block_flops(cfg, keep, online)
    assert estimated == pytest.approx(measured, rel=0.03)  # what it leaves out: softmax, norms, gathers


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="VisionTransformer"):
        SparseViT(timm.create_model("resnet10t", num_classes=2), SparseConfig())
    with pytest.raises(ValueError, match="drop_by"):
        SparseConfig(drop_by="magic")


# --- attention ----------------------------------------------------------------------------

def test_topk_connections_at_rho_1_match_dense_and_timm_reference():
    m = tiny()
    attn = m.vit.blocks[1].attn
    x = torch.randn(3, 65, m.vit.embed_dim)
    with torch.no_grad():
        ref = attention.reference_attention(attn, x)
        dense, _ = attention.dense(attn, x, 1, False)
        topk, _ = attention.topk_connections(attn, x, 1, False, rho=1.0)
        gather, _ = attention.gather_keys(attn, x, 1, False, scores=torch.rand(3, 64), key_keep=1.0)
    assert (topk - dense).abs().max() <= 1e-5 and (topk - ref).abs().max() <= 1e-5
    assert (gather - dense).abs().max() <= 1e-5


def test_topk_connections_keep_ceil_rho_n_keys_and_the_cls_row_and_column():
    avg = torch.rand(2, 10, 10).softmax(-1)
    keep = attention.connection_mask(avg, rho=0.3, prefix=1)
    assert keep[:, 0].all() and keep[:, :, 0].all()
    patch_rows = keep[:, 1:, 1:].sum(-1)  # top ceil(0.3*10)=3 keys, minus the CLS column when it is one of them
    assert (patch_rows >= 2).all() and (patch_rows <= 3).all()
    m = tiny(SparseConfig(attention="topk", rho=0.3))
    with torch.no_grad():
        assert m(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_gather_attends_only_to_the_top_keys():
    m = tiny()
    attn = m.vit.blocks[0].attn
    x = torch.randn(1, 9, m.vit.embed_dim)
    scores = torch.tensor([[0.0, 0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        out, _ = attention.gather_keys(attn, x, 1, False, scores=scores, key_keep=0.5)
        x2 = x.clone()
        x2[:, 1:5] = torch.randn(1, 4, m.vit.embed_dim)  # change only the keys that are not attended to
        qkv_same, _ = attention.gather_keys(attn, x2, 1, False, scores=scores, key_keep=0.5)
    assert torch.allclose(out[:, 5:], qkv_same[:, 5:], atol=1e-6)  # their queries are unchanged too


def test_cls_attention_matches_the_full_attention_row():
    m = tiny()
    attn = m.vit.blocks[0].attn
    x = torch.randn(2, 65, m.vit.embed_dim)
    with torch.no_grad():
        q, k, _ = qkv_heads(attn, x)
        full = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0, 1:]
        assert torch.allclose(cls_attention(q, k, 1), full, atol=1e-6)


# --- schedules and example pruning --------------------------------------------------------

def test_keep_schedules():
    assert schedule.trilevel(0, 300, 0.7) == 1.0 and schedule.trilevel(9.9, 300, 0.7) == 1.0
    assert schedule.trilevel(60, 300, 0.7) == pytest.approx(0.85) and schedule.trilevel(200, 300, 0.7) == 0.7
    assert schedule.trilevel(1, 30, 0.7) == 1.0 and schedule.trilevel(11, 30, 0.7) == pytest.approx(0.7)
    assert [schedule.toe(e, 9, 0.5) for e in (0, 3, 6, 8.9)] == [0.5, 0.75, 1.0, 1.0]


def test_infobatch_prunes_low_loss_examples_the_same_on_every_rank():
    keys = [f"k{i}" for i in range(400)]
    pruners = [prune.InfoBatch(epochs=10, seed=3) for _ in range(2)]
    records = [(k, float(i % 4), True) for i, k in enumerate(keys)]  # mean 1.5: losses 0 and 1 are low
    for p in pruners:
        p.update(records, 0)
    w = pruners[0].weights(keys, 1)
    assert torch.equal(w, pruners[1].weights(keys, 1))
    low = torch.tensor([i % 4 < 2 for i in range(400)])
    assert (w[~low] == 1).all()
    assert 0.35 < (w[low] == 0).float().mean() < 0.65 and set(w[low].tolist()) <= {0.0, 2.0}
    assert (pruners[0].weights(keys, 9) == 1).all()  # annealing: full data at the end
    assert not torch.equal(w, pruners[0].weights(keys, 2))  # another epoch, another subset


def test_holdout_swap_holds_out_a_fifth_and_swaps_the_most_unforgettable():
    keys = [f"k{i}" for i in range(1000)]
    p = prune.HoldOutSwap(epochs=20, seed=0, every=2)
    held0 = {k for k in keys if p.is_held(k)}
    assert 0.16 < len(held0) / 1000 < 0.24
    forgetful = set(keys[:500])
    for epoch in range(2):
        recs = [(k, float("nan") if k in held0 else 1.0, (epoch % 2 == 0) or k not in forgetful) for k in keys]
        p.update(recs, epoch)
    held1 = {k for k in keys if p.is_held(k)}
    left, back = held1 - held0, held0 - held1
    assert len(left) == len(back) == 50
    assert not left & forgetful  # the examples that were forgotten stay in training
    q = prune.HoldOutSwap(epochs=20, seed=0, every=2)
    q.load_state_dict(p.state_dict())
    assert {k for k in keys if q.is_held(k)} == held1


def test_rs2_trains_a_fresh_share_each_epoch_and_every_example_in_turn():
    keys = [f"k{i}" for i in range(2000)]
    p = prune.make_pruner("rs2", 10, 4, keep=0.7)
    subsets = [{k for k, w in zip(keys, p.weights(keys, e).tolist()) if w == 1.0} for e in range(10)]
    assert all(0.66 < len(s) / 2000 < 0.74 for s in subsets)
    assert subsets[0] != subsets[1] and subsets[0] == {k for k, w in zip(keys, p.weights(keys, 0)) if w}
    seen = {k: sum(k in s for s in subsets) for k in keys}
    assert set(seen.values()) == {7}  # without replacement: the 10 windows of 0.7 tile [0, 7), 7 visits each
    assert not p.tracks
    assert torch.equal(p.weights(keys, 3), prune.make_pruner("rs2", 10, 4, keep=0.7).weights(keys, 3))
    with pytest.raises(ValueError, match="rs2"):
        prune.make_pruner("rs2", 10, 0, keep=0.0)


def test_top_score_trains_the_highest_stored_scores_of_each_batch(tmp_path: Path):
    import polars as pl
    keys = [f"k{i}" for i in range(10)]
    pl.DataFrame({"key": keys + ["pruned"], "kept": [True] * 10 + [False],
                  "score": [float(i) for i in range(10)] + [99.0]}).write_parquet(tmp_path / fmt.SELECTION)
    p = prune.make_pruner("top-score", 5, 0, keep=0.7, shards=tmp_path)
    batch = ["k3", "k9", "k0", "k5", "pruned", "k7", "k1", "k8", "k2", "k4"]
    kept = {k for k, w in zip(batch, p.weights(batch, 0).tolist()) if w == 1.0}
    assert kept == {"k9", "k8", "k7", "k5", "k4", "k3", "k2"}  # 7 of 10; a row curate shard did not keep ranks last
    assert p.weights(["pruned", "k0"], 1).tolist() == [0.0, 1.0]
    assert p.admits(batch, 0).tolist() == [1.0] * 10  # chosen per batch: a whole-epoch plan leaves nothing out
    with pytest.raises(ValueError, match="selection.parquet"):
        prune.make_pruner("top-score", 5, 0, shards=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="top-score"):
        prune.make_pruner("top-score", 5, 0, keep=1.5, shards=tmp_path)
