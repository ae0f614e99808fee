"""Proxy models: a timm model by name or a named recipe, its weights, and one scoring forward.

A recipe names a timm model, its size overrides and how to train it here. Any other name is
taken as a timm model name with the default recipe. `ProxyModel.score_batch` returns logits,
the pre-logit embedding and the patch-importance map: CLS attention for ViT-family proxies, the
class activation map for convolutional ones (`cam`).
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
from curate.score import airbench, cam, metrics

assert airbench.airbench_net  # registered with timm on import: `timm.create_model("airbench_net")`


@dataclass(frozen=True)
class Recipe:
    model: str  # timm model name
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # size overrides (img_size, depth, ...)
    img_size: int = 224  # proxy input side: the whole image squash-resized to this
    epochs: int = 0  # default --train-epochs when training here
    # adamw: lr is the peak for batch 128 (scaled linearly), cosine to zero after the warmup.
    # sgd: airbench's decoupled form (Nesterov momentum; lr and weight_decay per 1,024 examples, so
    # neither depends on the batch size or the momentum), a triangular schedule, lookahead averaging.
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # linear warmup (adamw: from 0; sgd: from 0.2 of the peak)
    batch_size: int = 128  # training batch
    label_smoothing: float = 0.0
    translate: int = 0  # training shifts of up to this many pixels (reflect padded); 0: a side / 8
    alternate_flip: bool = False  # airbench: each image mirrored on alternate epochs, not at random
    flip_tta: bool = False  # scoring averages the image and its mirror (logits, embedding, map)
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


@register_recipe("airbench")
def _airbench() -> Recipe:
    # airbench94's hyperparameters (github.com/KellerJordan/cifar10-airbench), at batch 500 so
    # that 10,000 images still make 20 steps an epoch (the decoupled lr and weight decay keep the
    # per-example step). Its 94% on CIFAR-10 in 10 epochs is for all 50,000 images.
    return Recipe("airbench_net", {}, img_size=32, epochs=10, optimizer="sgd", lr=11.5, weight_decay=0.0153,
                  warmup_epochs=2.3, batch_size=500, label_smoothing=0.2, translate=2, alternate_flip=True,
                  flip_tta=True,
                  note="small images (CIFAR-size) at 32 px: airbench's whitened CNN for real photographs; "
                       "class activation maps (--importance cam)")


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
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # another architecture, or the same one with another head
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{path} does not fit the proxy {type(model).__name__} ({first} ...): name the "
                         "architecture it was trained as with --proxy") from None
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
    """A model plus what scoring needs around it: normalisation, attention capture or class
    activation maps, and the mirrored view when the recipe scores with it."""

    def __init__(self, model: nn.Module, importance: str = "auto", blocks: Sequence[int] | None = None,
                 img_size: int = 224, flip_tta: bool = False):
        self.model = model.eval()
        self.mean, self.std = normalizer(model)
        self.importance = resolve_importance(model, importance, img_size)
        self.flip_tta = flip_tta
        self._captured: list[torch.Tensor] = []
        self.blocks: tuple[int, ...] = ()
        self._side = 0  # the stored CAM grid side
        if self.importance == "cam":
            with torch.no_grad():
                feats = model.forward_features(torch.zeros(1, 3, img_size, img_size))
            self._side = cam.map_side(img_size, max(feats.shape[-2:]))
        elif self.importance != "none":
            depth = len(model.blocks)
            self.blocks = tuple(range(depth)) if importance == "rollout" else resolve_blocks(blocks, depth)
            for i in self.blocks:
                model.blocks[i].attn.register_forward_pre_hook(self._capture)

    def _capture(self, attn: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not self._capturing:
            return
        q, k, _ = qkv_heads(attn, args[0])
        if self.importance == "rollout":  # rollout needs the full matrix of every block
            self._captured.append((q * attn.scale @ k.transpose(-2, -1)).float().softmax(-1))
        else:
            self._captured.append(cls_attention(q, k, self.model.num_prefix_tokens))

    _capturing = False

    @property
    def grid(self) -> tuple[int, int]:
        if self.importance == "cam":
            return self._side, self._side
        return tuple(self.model.patch_embed.grid_size)  # type: ignore[return-value]

    def record(self) -> dict[str, Any]:
        """What the manifest says about the maps: how they are made, from which blocks, on which grid."""
        return {"method": self.importance, "blocks": list(self.blocks),
                "grid": list(self.grid) if self.importance != "none" else None, "flip_tta": self.flip_tta}

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_input(images, self.mean, self.std)

    def to(self, device: torch.device) -> "ProxyModel":
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    @torch.no_grad()
    def score_batch(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ProxyOutput:
        """Logits, embedding and map of each image; a CAM is the map of the image's label
        (of the predicted class where the label is unknown, < 0, or not given)."""
        x = self.prepare(images)
        out = self._view(x, labels)
        if not self.flip_tta:
            return out
        mirrored = self._view(x.flip(-1), labels)
        maps = None if out.importance is None else (
            (out.importance.float() + mirrored.importance.float().flip(-1)) / 2).half()
        return ProxyOutput((out.logits + mirrored.logits) / 2, (out.embedding + mirrored.embedding) / 2, maps)

    def _view(self, x: torch.Tensor, labels: torch.Tensor | None) -> ProxyOutput:
        self._captured, self._capturing = [], self.importance in ("cls", "rollout")
        try:
            with _autocast(x.device):
                feats = self.model.forward_features(x)
                pre = self.model.forward_head(feats, pre_logits=True)
                logits = self.model.get_classifier()(pre)
        finally:
            self._capturing = False
        logits = logits.float()
        if self.importance == "cam":
            target = logits.argmax(1) if labels is None else torch.where(
                labels.to(logits.device) >= 0, labels.to(logits.device), logits.argmax(1))
            maps = cam.to_stored_grid(cam.class_activation_maps(self.model, feats, target), self._side)
            return ProxyOutput(logits, pre.float(), maps)
        return ProxyOutput(logits, pre.float(), self._importance())

    def _importance(self) -> torch.Tensor | None:
        if self.importance == "none":
            return None
        if self.importance == "rollout":
            patch = metrics.attention_rollout(self._captured, self.model.num_prefix_tokens)
        else:
            patch = torch.stack(self._captured).mean(0)
        return metrics.to_grid(patch, self.grid)


def resolve_importance(model: nn.Module, importance: str, img_size: int) -> str:
    """`auto`: CLS attention for a ViT, class activation maps for a CNN, nothing for anything else.
    A method the model cannot give is an error, not a table without maps."""
    vit, cnn = supports_importance(model), not supports_importance(model) and cam.supports_cam(model, img_size)
    if importance == "auto":
        return "cls" if vit else "cam" if cnn else "none"
    if importance in ("cls", "rollout") and not vit:
        raise ValueError(f"--importance {importance} reads a ViT's attention; this proxy has none"
                         + (": use --importance cam (class activation maps) or auto" if cnn else ""))
    if importance == "cam" and not cnn:
        raise ValueError("--importance cam needs a convolutional proxy (a last feature map with space in it)"
                         + ("; for a ViT use cls, rollout or auto" if vit else ""))
    return importance


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (scores are computed in fp32 from the logits); nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

