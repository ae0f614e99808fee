import pytest
import timm
import torch

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
    proxy = ProxyModel(cnn, "cls")
    assert proxy.importance == "none" and proxy.score_batch(images).importance is None


def test_block_rules():
    assert default_importance_blocks(12) == (3, 6, 9)  # Tri-Level / EViT
    assert default_importance_blocks(4) == (1, 2)  # never the last block
    assert resolve_blocks((-1, 0), 4) == (0, 3)
    with pytest.raises(ValueError, match="out of range"):
        resolve_blocks((7,), 4)
    with pytest.raises(ValueError, match="unknown proxy"):
        resolve_recipe("no-such-model-anywhere")
    assert resolve_recipe("demo-vit", img_size=96).model_kwargs["img_size"] == 96
