"""Proxy models: a timm model by name or a named recipe, its weights, and one scoring forward.

A recipe names a timm model, its size overrides and how to train it here. Any other name is
taken as a timm model name with the default recipe. `ProxyModel.score_batch` returns logits,
the pre-logit embedding and, for ViT-family proxies, the patch-importance map.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
from torch import nn

from curate.common.atomic import file_sha256
from curate.common.registry import Registry
from curate.common.runtime import load_weights
from curate.common.vit import cls_attention, mean_std, qkv_heads
from curate.score import metrics


@dataclass(frozen=True)
class Recipe:
    model: str  # timm model name
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # size overrides (img_size, depth, ...)
    img_size: int = 224  # proxy input side: the whole image squash-resized to this
    epochs: int = 0  # default --train-epochs when training here
    lr: float = 1e-3  # AdamW peak learning rate for batch 128 (scaled linearly with batch)
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # linear warmup, then cosine to zero
    batch_size: int = 128  # training batch
    importance_blocks: tuple[int, ...] | None = None  # blocks whose CLS attention is averaged; None: Tri-Level's
    note: str = ""  # when to use it


RECIPES: Registry[Recipe] = Registry("proxy recipe")


def register_recipe(name: str) -> Callable[[Callable[[], Recipe]], Callable[[], Recipe]]:
    """A recipe is registered as the Recipe its function returns (the function documents it)."""
    def wrap(fn: Callable[[], Recipe]) -> Callable[[], Recipe]:
        RECIPES.add(name, fn())
        return fn
    return wrap


@register_recipe("demo-cnn")
def _demo_cnn() -> Recipe:
    return Recipe("resnet10t", {}, img_size=64, epochs=10, lr=2e-3,
                  note="example scores (EL2N, forgetting) on small images, ~90 s for the demo on 2 cores")


@register_recipe("demo-vit")
def _demo_vit() -> Recipe:
    # A plain ViT (patch 8, 8x8 grid): with a conv stem, every token already carries its
    # surroundings and the CLS attention of this small proxy lands on background (docs/benchmarks.md,
    # "Demo quality": conv stem against this recipe). Registers (Darcet et al. 2023) give global
    # information a place other than background patches; patch dropout (0.5) halves the cost.
    # Block 1 of 4 localised best in every trained model (seeds 0, 1; 10 and 15 epochs).
    kw = dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, reg_tokens=4,
              patch_drop_rate=0.5)
    return Recipe("vit_tiny_patch16_224", kw, img_size=64, epochs=10, lr=2e-3, importance_blocks=(1,),
                  note="patch importance (8x8 grid) and example scores on the demo data, ~80 s on 2 cores")


@register_recipe("imagenet-vit")
def _imagenet_vit() -> Recipe:
    kw = dict(img_size=112, patch_size=8, depth=6, reg_tokens=4, patch_drop_rate=0.5)
    return Recipe("vit_tiny_patch16_224", kw, img_size=112, epochs=10, lr=1e-3, batch_size=256,
                  note="ImageNet: 14x14 importance grid at 112 px; 10 epochs of early dynamics")


def resolve_recipe(name: str, img_size: int | None = None) -> Recipe:
    """A registered recipe, or any timm model name with default settings."""
    recipe = RECIPES.get(name)
    if recipe is None:
        if name not in timm.list_models(pretrained=False) and not timm.is_model(name):
            raise ValueError(f"unknown proxy {name!r}: not a recipe ({', '.join(sorted(RECIPES))}) "
                             "nor a timm model name")
        recipe = Recipe(name)
    if img_size is not None and img_size != recipe.img_size:
        kwargs = dict(recipe.model_kwargs)
        if "img_size" in kwargs or _is_vit_name(recipe.model):
            kwargs["img_size"] = img_size
        recipe = replace(recipe, img_size=img_size, model_kwargs=kwargs)
    return recipe


def _is_vit_name(name: str) -> bool:
    return name.startswith(("vit_", "deit", "test_vit"))


def create_model(recipe: Recipe, num_classes: int | None, pretrained: bool = False) -> nn.Module:
    """The recipe's timm model; num_classes None keeps the model's own head (hub weights)."""
    kwargs = dict(recipe.model_kwargs) | ({"num_classes": num_classes} if num_classes else {})
    return timm.create_model(recipe.model, pretrained=pretrained, **kwargs)


def load_checkpoint(model: nn.Module, path: Path) -> str:
    """Load a state dict saved with torch.save (weights only); returns the file's sha256."""
    state = load_weights(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint of ours or timm's
    model.load_state_dict(state)
    return file_sha256(path)


def check_input_size(model: nn.Module, recipe: Recipe) -> None:
    """One forward of two blank images at the proxy's input size, before anything is written: a
    size the model cannot take (a patch grid that does not divide it, a stem that shrinks it to
    nothing) fails here, not after the run folder exists."""
    size = recipe.img_size
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, 3, size, size))
    except (RuntimeError, ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--image-size {size}: the proxy {recipe.model} cannot take {size}x{size} inputs "
                         f"({first})") from None
    finally:
        model.train(training)


def normalizer(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (3, 1, 1) from the model's pretrained config."""
    mean, std = mean_std(model)
    return torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)


def to_model_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Pixels in 0..255 (B, 3, S, S), uint8 or float -> normalised float on mean's device."""
    x = images.to(mean.device, non_blocking=True).float() / 255  # never in place: may be the caller's tensor
    return (x - mean) / std


def supports_importance(model: nn.Module) -> bool:
    """ViT-family: prefix tokens, a patch grid and timm Attention blocks."""
    blocks = getattr(model, "blocks", None)
    return (hasattr(model, "num_prefix_tokens") and hasattr(getattr(model, "patch_embed", None), "grid_size")
            and blocks is not None and len(blocks) > 0 and hasattr(blocks[0], "attn")
            and hasattr(blocks[0].attn, "qkv"))


def default_importance_blocks(depth: int) -> tuple[int, ...]:
    """Tri-Level / EViT read CLS attention at blocks 3, 6, 9 of DeiT's 12: a quarter, half and
    three quarters of the depth. The last block is avoided on purpose: in small proxies trained
    briefly its CLS attention often rests on background tokens that hold global information
    (measured: docs/benchmarks.md, "Figures formerly quoted in code")."""
    last_allowed = max(0, depth - 2)
    return tuple(sorted({min(last_allowed, round(depth * f)) for f in (0.25, 0.5, 0.75)}))


def resolve_blocks(blocks: Sequence[int] | None, depth: int) -> tuple[int, ...]:
    """Block indices (negative = from the end), checked against the model's depth."""
    chosen = tuple(blocks) if blocks else default_importance_blocks(depth)
    bad = [b for b in chosen if not -depth <= b < depth]
    if bad:
        raise ValueError(f"importance blocks {bad} out of range for a model of depth {depth}")
    return tuple(sorted({b % depth for b in chosen}))


@dataclass
class ProxyOutput:
    logits: torch.Tensor  # (B, C)
    embedding: torch.Tensor  # (B, D) pre-logits
    importance: torch.Tensor | None  # (B, gh, gw) float16, each map sums to 1


class ProxyModel:
    """A model plus what scoring needs around it: normalisation and attention capture."""

    def __init__(self, model: nn.Module, importance: str = "cls", blocks: Sequence[int] | None = None):
        self.model = model.eval()
        self.mean, self.std = normalizer(model)
        self.importance = importance if supports_importance(model) else "none"
        self._captured: list[torch.Tensor] = []
        self.blocks: tuple[int, ...] = ()
        if self.importance != "none":
            depth = len(model.blocks)
            self.blocks = tuple(range(depth)) if importance == "rollout" else resolve_blocks(blocks, depth)
            for i in self.blocks:
                model.blocks[i].attn.register_forward_pre_hook(self._capture)

    def _capture(self, attn: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not self._capturing:
            return
        q, k, _ = qkv_heads(attn, args[0])
        if self.importance == "cls":
            self._captured.append(cls_attention(q, k, self.model.num_prefix_tokens))
        else:  # rollout needs the full matrix of every block
            self._captured.append((q * attn.scale @ k.transpose(-2, -1)).float().softmax(-1))

    _capturing = False

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)  # type: ignore[return-value]

    def record(self) -> dict[str, Any]:
        """What the manifest says about the maps: how they are made, from which blocks, on which grid."""
        return {"method": self.importance, "blocks": list(self.blocks),
                "grid": list(self.grid) if self.importance != "none" else None}

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_input(images, self.mean, self.std)

    def to(self, device: torch.device) -> "ProxyModel":
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.inference_mode()
    def score_batch(self, images: torch.Tensor) -> ProxyOutput:
        x = self.prepare(images)
        self._captured, self._capturing = [], self.importance != "none"
        try:
            with _autocast(x.device):
                pre = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
                logits = self.model.get_classifier()(pre)
        finally:
            self._capturing = False
        return ProxyOutput(logits.float(), pre.float(), self._importance())

    def _importance(self) -> torch.Tensor | None:
        if self.importance == "none":
            return None
        if self.importance == "rollout":
            patch = metrics.attention_rollout(self._captured, self.model.num_prefix_tokens)
        else:
            patch = torch.stack(self._captured).mean(0)
        return metrics.to_grid(patch, self.grid)


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (scores are computed in fp32 from the logits); nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

