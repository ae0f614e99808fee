import pytest
import timm
import torch

from curate.score import cam
from curate.score import metrics as scoring
from curate.score.proxies import ProxyModel, default_importance_blocks, resolve_blocks, resolve_recipe


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3,
                             num_heads=2, reg_tokens=2, num_classes=5).eval()


def reference_cls_attention(model: torch.nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """timm's own non-fused attention matrix of one block, CLS row, heads averaged."""
    captured = []
    attn = model.blocks[block].attn
    attn.fused_attn = False  # the path that materialises softmax(q k^T) before attn_drop
    handle = attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.inference_mode():
        model(x)
    handle.remove()
    return captured[0][:, :, 0, model.num_prefix_tokens:].mean(1)  # (B, patches)


def test_hooked_cls_attention_equals_timms_attention_matrix():
    model = tiny_vit()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    proxy = ProxyModel(model, "cls", blocks=(1,))
    out = proxy.score_batch(images)
    assert out.importance.shape == (3, 4, 4) and out.importance.dtype == torch.float16
    expected = scoring.to_grid(reference_cls_attention(model, proxy.prepare(images), 1), (4, 4))
    torch.testing.assert_close(out.importance.float(), expected.float(), atol=2e-3, rtol=0)
    # the logits are the model's own forward: capturing attention changes nothing
    torch.testing.assert_close(out.logits, model(proxy.prepare(images)), atol=1e-5, rtol=0)


def test_rollout_and_models_without_attention():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = ProxyModel(tiny_vit(), "rollout").score_batch(images)
    assert out.importance.shape == (2, 4, 4)
    assert out.importance.float().sum((1, 2)).sub(1).abs().max() < 1e-2
    cnn = timm.create_model("resnet10t", num_classes=5)
    with pytest.raises(ValueError, match="use --importance cam"):
        ProxyModel(cnn, "cls", img_size=32)
    with pytest.raises(ValueError, match="for a ViT use cls"):
        ProxyModel(tiny_vit(), "cam", img_size=32)
    proxy = ProxyModel(cnn, "none", img_size=32)
    assert proxy.importance == "none" and proxy.score_batch(images).importance is None
    assert ProxyModel(cnn, "auto", img_size=32).importance == "cam"
    assert ProxyModel(tiny_vit(), "auto", img_size=32).importance == "cls"


def test_cam_of_a_linear_head_is_the_classifier_row_times_the_feature_map():
    """Grad-CAM through the head equals CAM (Zhou et al.) for timm's average-pool -> fc head,
    computed here by hand from the classifier's weights."""
    torch.manual_seed(0)
    cnn = timm.create_model("resnet10t", num_classes=5).eval()
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    proxy = ProxyModel(cnn, "cam", img_size=64)
    labels = torch.tensor([0, 3, -1])
    out = proxy.score_batch(images, labels)
    feats = cnn.forward_features(proxy.prepare(images))  # (3, C, 2, 2)
    target = torch.tensor([0, 3, int(out.logits[2].argmax())])  # an unknown label: the predicted class
    by_hand = torch.einsum("bc,bchw->bhw", cnn.get_classifier().weight[target], feats).clamp(min=0)
    expected = cam.to_stored_grid(by_hand, proxy.grid[0])
    assert proxy.grid == (16, 16) and out.importance.shape == (3, 16, 16)
    torch.testing.assert_close(out.importance.float(), expected.float(), atol=1e-3, rtol=0)
    assert out.importance.float().sum((1, 2)).sub(1).abs().max() < 1e-2


def test_cam_follows_the_evidence_and_the_mirror():
    """A CNN whose class-1 evidence is the bright patch puts the map there, and with flip_tta the
    map of a mirrored image is the mirror of the map."""
    torch.manual_seed(0)
    cnn = timm.create_model("airbench_net", num_classes=2).eval()
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    images[..., 2:10, 22:30] = 255  # top right
    plain = ProxyModel(cnn, "cam", img_size=32).score_batch(images, torch.tensor([1]))
    tta = ProxyModel(cnn, "cam", img_size=32, flip_tta=True)
    a, b = tta.score_batch(images, torch.tensor([1])), tta.score_batch(images.flip(-1), torch.tensor([1]))
    torch.testing.assert_close(a.importance.float(), b.importance.float().flip(-1), atol=1e-3, rtol=0)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    assert plain.importance.shape == (1, 8, 8)


def test_airbench_whitening_makes_patches_white():
    torch.manual_seed(0)
    net = timm.create_model("airbench_net", num_classes=3)
    x = torch.randn(64, 3, 16, 16) @ torch.eye(16) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1, 1)
    net.init_whitening(x)
    out = torch.nn.functional.conv2d(x, net.whiten.weight[:12])  # the positive half
    cov = torch.cov(out.permute(1, 0, 2, 3).flatten(1))
    torch.testing.assert_close(cov, torch.eye(12), atol=0.05, rtol=0.05)
    assert not net.whiten.weight.requires_grad


def test_block_rules():
    assert default_importance_blocks(12) == (3, 6, 9)  # Tri-Level / EViT
    assert default_importance_blocks(4) == (1, 2)  # never the last block
    assert resolve_blocks((-1, 0), 4) == (0, 3)
    with pytest.raises(ValueError, match="out of range"):
        resolve_blocks((7,), 4)
    with pytest.raises(ValueError, match="unknown proxy"):
        resolve_recipe("no-such-model-anywhere")
    assert resolve_recipe("demo-vit", img_size=96).model_kwargs["img_size"] == 96
