"""`curate predict`: a trained run's model on image files, picking its own tokens.

A run trained with a token selector (`curate train --selector-blocks`) drops tokens at inference
with no stored map: the selector ranks the tokens from the model's own features and keeps a fixed
k per batch, so shapes are static, the saving is real and the model exports and compiles. A run
without a selector predicts with all tokens (dropping by importance would need the proxy's maps).

The weights are the run's EMA when it kept one (what its validation accuracy was measured on).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

from curate.common.atomic import atomic_path
from curate.common.runtime import load_weights
from curate.shard.format import decode_rgb  # the shards' decoder: the pixels the model trained on
from sparsevit import data
from sparsevit.model import SparseConfig, SparseViT, create_sparse


def load_model(checkpoint: Path, device: torch.device | str = "cpu") -> tuple[SparseViT, dict[str, Any]]:
    """The model of a `curate train` checkpoint (a run folder or its checkpoint.pt), in eval
    mode, and the run's config."""
    path = checkpoint / "checkpoint.pt" if checkpoint.is_dir() else checkpoint
    state = load_weights(path, device)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{path}: not a `curate train` checkpoint (no config or model)")
    cfg = state["config"]
    num_classes = state["model"]["head.weight"].shape[0]
    core = create_sparse(cfg["model"], SparseConfig(**cfg["sparse"]), num_classes, cfg["img_size"],
                         cfg["patch_size"], **cfg["model_kwargs"])
    core.vit.load_state_dict(state["model"])
    core.selectors.load_state_dict(state.get("selectors", {}))
    if state.get("ema") is not None:
        core.load_state_dict(state["ema"])
    return core.to(device).eval(), cfg


class Deployed(nn.Module):
    """Images in, logits out, the way the model ships: the selector keeps `keep` of the tokens at
    each selector block (no maps; k fixed, so it exports and compiles), or all tokens."""

    def __init__(self, core: SparseViT, keep: float = 1.0, online_keep: float = 1.0) -> None:
        super().__init__()
        if not 0 < keep <= 1:
            raise ValueError(f"--keep must be in (0, 1], got {keep}")
        if keep < 1 and not core.selectors:
            raise ValueError(f"--keep {keep}: this model has no token selector, and dropping by importance needs "
                             "the proxy's maps; predict with --keep 1, or train with --selector-blocks")
        self.core, self.keep, self.online_keep = core, keep, online_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        share = 1.0 if self.keep < 1 else 0.0
        return self.core(x, None, self.keep, self.online_keep, selector_share=share)


def deployed(checkpoint: Path, keep: float | None = None, device: torch.device | str = "cpu"
             ) -> tuple[Deployed, dict[str, Any]]:
    """The run's model as it ships; keep defaults to the run's own with a selector, else 1."""
    core, cfg = load_model(checkpoint, device)
    if keep is None:
        keep = cfg["keep"] if core.selectors else 1.0
    online = cfg.get("online_keep", 1.0) if keep < 1 else 1.0
    return Deployed(core, keep, online).eval(), cfg


def export(model: Deployed, img_size: int, path: Path) -> None:
    """torch.export with a dynamic batch size: a .pt2 that `torch.export.load` runs with no
    sparsevit code, its token drop included."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.zeros(2, 3, img_size, img_size, device=next(model.parameters()).device)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp)


def image_files(root: Path) -> list[Path]:
    """Every file under root (or root itself) with an extension PIL opens, sorted."""
    if root.is_file():
        return [root]
    exts = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    found = [Path(d) / f for d, _, files in os.walk(root) for f in files if Path(f).suffix.lower() in exts]
    if not found:
        raise ValueError(f"{root}: no image files (none with an extension PIL opens)")
    return sorted(found)


@dataclass(frozen=True)
class _Images(torch.utils.data.Dataset):
    files: Sequence[Path]
    transform: data.EvalTransform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            image = decode_rgb(self.files[i].read_bytes())
        except (OSError, ValueError) as e:  # unreadable, or not an image (DecodeError)
            return i, None, f"{type(e).__name__}: {e}"
        return i, self.transform(image, None)[0], ""


def _batches(files: Sequence[Path], img_size: int, patch: int, batch_size: int, workers: int
             ) -> Iterator[list[tuple[int, torch.Tensor | None, str]]]:
    ds = _Images(files, data.EvalTransform(data.Geometry(img_size, patch)))
    yield from torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=list)


@torch.inference_mode()
def predict(model: Deployed, files: Sequence[Path], img_size: int, batch_size: int = 64, workers: int = 2,
            device: torch.device | str = "cpu") -> pa.Table:
    """One row per file: top-1 class and probability, or the error that kept it from being read."""
    patch = model.core.vit.patch_embed.patch_size[0]
    pred, prob, error = [None] * len(files), [None] * len(files), [""] * len(files)
    for batch in _batches(files, img_size, patch, batch_size, workers):
        ok = [(i, x) for i, x, _ in batch if x is not None]
        for i, x, err in batch:
            error[i] = err
        if ok:
            p = model(torch.stack([x for _, x in ok]).to(device)).float().softmax(-1)
            top = p.max(-1)
            for (i, _), c, q in zip(ok, top.indices.tolist(), top.values.tolist()):
                pred[i], prob[i] = c, q
    return pa.table({"path": [str(f) for f in files], "label": pa.array(pred, pa.int32()),
                     "prob": pa.array(prob, pa.float32()), "error": error})


def write_predictions(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
