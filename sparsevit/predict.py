"""`curate predict`: a trained run's model on image files, picking its own tokens.

A run trained with a token selector (`curate train --selector-blocks`) drops tokens at inference
with no stored map: the selector ranks the tokens from the model's own features and keeps a fixed
k per batch, so shapes are static, the saving is real and the model exports and compiles. A run
without a selector predicts with all tokens (dropping by importance would need the proxy's maps).

The weights are the run's EMA when it kept one (what its validation accuracy was measured on).

The rules of every other command hold: the images are read as `curate score` reads its inputs
(`curate.ingest.sources.from_files`: one row per file, bad files as error rows, nothing read
outside the folder, no device or FIFO opened for reading, the size and pixel limits), and a
checkpoint is data to check, never trusted: its config is validated and its model built on the
meta device and compared with its weights before anything real is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from curate.common.atomic import atomic_path
from curate.common.runtime import load_weights
from curate.ingest.decode import DEFAULT_MAX_PIXELS, decode_rgb  # the one decoder: the pixels training saw
from curate.ingest.sources import Item, read_bytes
from sparsevit import data
from sparsevit.model import SparseViT, create_sparse
from sparsevit.train import CHECKPOINT, TrainConfig


@dataclass(frozen=True)
class TrainedRun:
    """What a `curate train` checkpoint holds for inference."""
    core: SparseViT  # in eval mode, EMA weights when the run kept them
    config: TrainConfig  # the run's settings, checked as the CLI checks them
    class_names: list[str] | None  # by class index, from the shards' manifest (None: not recorded)


def load_model(checkpoint: Path, device: torch.device | str = "cpu") -> TrainedRun:
    """The model of a `curate train` checkpoint (a run folder or its checkpoint.pt). A file that
    is not one, a config no run could have, or weights that do not fit the config: a ValueError
    naming the file, raised before the model is allocated."""
    path = checkpoint / CHECKPOINT if checkpoint.is_dir() else checkpoint
    state = load_weights(path, "cpu")
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) \
            or not isinstance(state.get("model"), dict):
        raise ValueError(f"{path}: not a `curate train` checkpoint (no config or model)")
    cfg = _config(state["config"], path)
    num_classes = _num_classes(state["model"], path)
    args = (cfg.model, cfg.sparse, num_classes, cfg.img_size, cfg.patch_size)
    with torch.device("meta"):  # shapes only: a hostile config allocates nothing
        skeleton = _create(args, cfg.model_kwargs, path)
    _check_fits(skeleton, state, path)
    core = _create(args, cfg.model_kwargs, path)
    core.vit.load_state_dict(state["model"])
    core.selectors.load_state_dict(state.get("selectors") or {})
    if state.get("ema") is not None:
        core.load_state_dict(state["ema"])
    return TrainedRun(core.to(device).eval(), cfg, _class_names(state.get("class_names"), num_classes))


def _config(raw: dict[str, Any], path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_json(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: its config is not one `curate train` writes: {e}") from None


def _num_classes(weights: dict[str, Any], path: Path) -> int:
    head = weights.get("head.weight")
    if not isinstance(head, torch.Tensor) or head.ndim != 2 or head.shape[0] < 1:
        raise ValueError(f"{path}: the weights have no classifier head (head.weight)")
    return head.shape[0]


def _create(args: tuple[Any, ...], kwargs: dict[str, Any], path: Path) -> SparseViT:
    try:
        return create_sparse(*args, **kwargs)
    except (TypeError, ValueError) as e:  # geometry was checked with the config; timm's asserts are ValueErrors
        raise ValueError(f"{path}: its config does not build a model: {e}") from None


def _check_fits(skeleton: SparseViT, state: dict[str, Any], path: Path) -> None:
    """The checkpoint's tensors have the shapes the config's model has: then building it for
    real allocates no more than the file already holds."""
    for part, weights in (("model", skeleton.vit.state_dict()), ("selectors", skeleton.selectors.state_dict()),
                          *((("ema", skeleton.state_dict()),) if state.get("ema") is not None else ())):
        given = state.get(part) or {}
        if not isinstance(given, dict):
            raise ValueError(f"{path}: {part} is not a state dict")
        want = {k: tuple(v.shape) for k, v in weights.items()}
        have = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in given.items()}
        if want != have:
            wrong = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
            raise ValueError(f"{path}: the {part} weights do not fit the model its config describes "
                             f"({len(wrong)} tensors differ, e.g. {wrong[0]!r})")


def _class_names(names: Any, num_classes: int) -> list[str] | None:
    ok = isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names)
    return names if ok else None


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
             ) -> tuple[Deployed, TrainedRun]:
    """The run's model as it ships; keep defaults to the run's own with a selector, else 1."""
    run = load_model(checkpoint, device)
    if keep is None:
        keep = run.config.keep if run.core.selectors else 1.0
    online = run.config.online_keep if keep < 1 else 1.0
    return Deployed(run.core, keep, online).eval(), run


def export(model: Deployed, img_size: int, path: Path) -> None:
    """torch.export with a dynamic batch size: a .pt2 that `torch.export.load` runs with no
    sparsevit code, its token drop included."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.zeros(2, 3, img_size, img_size, device=next(model.parameters()).device)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp)


@dataclass(frozen=True)
class _Images(torch.utils.data.Dataset):
    items: Sequence[Item]
    transform: data.EvalTransform
    max_pixels: int

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:  # read_bytes: regular files inside the folder, at most 1 GiB; never waits on a FIFO
            image = decode_rgb(read_bytes(self.items[i]), self.max_pixels)
        except (OSError, ValueError) as e:  # unreadable, refused, or not an image (DecodeError)
            return i, None, f"{type(e).__name__}: {e}"
        return i, self.transform(image, None)[0], ""


def _batches(items: Sequence[Item], transform: data.EvalTransform, batch_size: int, workers: int, max_pixels: int
             ) -> Iterator[list[tuple[int, torch.Tensor | None, str]]]:
    ds = _Images(items, transform, max_pixels)
    yield from torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=list)


@torch.inference_mode()
def predict(model: Deployed, items: Sequence[Item], img_size: int, batch_size: int = 64, workers: int = 2,
            device: torch.device | str = "cpu", class_names: Sequence[str] | None = None,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """One row per input: top-1 class (index and name), probability, or the error that kept it
    from being read. `path` is the file's name as text (non-UTF-8 bytes as escapes)."""
    vit = model.core.vit
    transform = data.EvalTransform(data.Geometry(img_size, vit.patch_embed.patch_size[0]),
                                   normalize=data.Normalize.of(vit))  # as the run trained
    pred, prob, error = [None] * len(items), [None] * len(items), [""] * len(items)
    for batch in _batches(items, transform, batch_size, workers, max_pixels):
        ok = [(i, x) for i, x, _ in batch if x is not None]
        for i, x, err in batch:
            error[i] = err
        if ok:
            p = model(torch.stack([x for _, x in ok]).to(device)).float().softmax(-1)
            top = p.max(-1)
            for (i, _), c, q in zip(ok, top.indices.tolist(), top.values.tolist()):
                pred[i], prob[i] = c, q
    names = [None if c is None or class_names is None else class_names[c] for c in pred]
    return pa.table({"path": [it.source for it in items], "label": pa.array(pred, pa.int32()),
                     "class_name": pa.array(names, pa.string()), "prob": pa.array(prob, pa.float32()),
                     "error": error})


def write_predictions(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
