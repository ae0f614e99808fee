"""Deterministic synthetic ImageFolder with ground truth, for tests, `curate demo` and benchmarks.

Each image is one foreground shape (its class) at a random position and scale over a cluttered
background of lines, blobs and noise. Beside the images, `truth.parquet` records what every score
should find: the object box, which labels were flipped on purpose, and near-duplicate groups.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageFilter

from curate.common.atomic import atomic_path, write_bytes

CLASSES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "bar")
# Base hue per class, spread round the colour wheel; `hue_jitter` makes neighbours overlap.
_HUES = np.linspace(0.0, 1.0, len(CLASSES), endpoint=False)


@dataclass(frozen=True)
class DemoConfig:
    root: Path  # output folder: ROOT/train/<class>/*.JPEG, ROOT/val/..., ROOT/truth.parquet
    classes: int = 8  # number of classes (<= len(CLASSES))
    per_class: int = 250  # training images per class, near-duplicates included
    val_per_class: int = 50  # clean validation images per class
    size: int = 64  # image side in pixels
    scale: tuple[float, float] = (0.3, 0.55)  # object size as a fraction of the image side
    hue_jitter: float = 0.06  # colour noise of the object (1.0 = full colour wheel)
    clutter: int = 6  # distractor strokes and blobs in the background
    flip_fraction: float = 0.1  # training labels moved on purpose to a wrong class folder
    dup_fraction: float = 0.05  # fraction of training images that are near-copies of another
    quality: int = 90  # JPEG quality
    seed: int = 0  # everything derives from this

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= len(CLASSES):
            raise ValueError(f"classes must be in [2, {len(CLASSES)}], got {self.classes}")
        if not 0.0 <= self.flip_fraction < 0.5 or not 0.0 <= self.dup_fraction < 0.5:
            raise ValueError("flip_fraction and dup_fraction must be in [0, 0.5)")
        if self.size < 16:
            raise ValueError(f"size must be >= 16, got {self.size}")


@dataclass(frozen=True)
class Scene:
    """Everything needed to redraw one image (near-duplicates redraw with small changes)."""

    label: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the object, pixels, exclusive end
    rgb: tuple[int, int, int]
    angle: float
    seed: int  # background clutter and noise


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def _random_scene(cfg: DemoConfig, label: int, rng: np.random.Generator) -> Scene:
    side = int(cfg.size * rng.uniform(*cfg.scale))
    x0 = int(rng.integers(0, cfg.size - side + 1))
    y0 = int(rng.integers(0, cfg.size - side + 1))
    hue = (_HUES[label] + rng.normal(0.0, cfg.hue_jitter)) % 1.0
    rgb = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    return Scene(label, (x0, y0, x0 + side, y0 + side), rgb, float(rng.uniform(0, 360)),
                 int(rng.integers(2**31)))


def _polygon(name: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of the polygonal shapes, rotated by `angle` degrees."""
    if name == "star":
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
        angles = [i * 36.0 for i in range(10)]
    else:
        corners = {"square": 4, "triangle": 3, "diamond": 4}[name]
        radii = [r] * corners
        angles = [i * 360.0 / corners for i in range(corners)]
        if name == "diamond":  # a diamond is a square stretched along one diagonal
            radii = [r, r * 0.7, r, r * 0.7]
    a0 = math.radians(angle)
    return [(cx + rr * math.cos(a0 + math.radians(a)), cy + rr * math.sin(a0 + math.radians(a)))
            for rr, a in zip(radii, angles)]


def _draw_object(draw: ImageDraw.ImageDraw, scene: Scene) -> None:
    x0, y0, x1, y1 = scene.box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    name = CLASSES[scene.label]
    width = max(3, int(r * 0.6))  # strokes at least most of a patch wide, so they are visible
    if name == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=scene.rgb)
    elif name == "ring":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], outline=scene.rgb, width=width)
    elif name in ("cross", "bar"):
        for a in ((scene.angle, scene.angle + 90) if name == "cross" else (scene.angle,)):
            dx, dy = r * math.cos(math.radians(a)), r * math.sin(math.radians(a))
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=scene.rgb, width=width)
    else:
        draw.polygon(_polygon(name, cx, cy, r, scene.angle), fill=scene.rgb)


def _background(cfg: DemoConfig, rng: np.random.Generator) -> Image.Image:
    """Smooth colour gradient + distractor strokes and blobs + pixel noise."""
    base = np.stack([_hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.8))
                     for _ in range(4)]).reshape(2, 2, 3).astype(np.float32)
    img = Image.fromarray(base.astype(np.uint8)).resize((cfg.size, cfg.size), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(cfg.clutter):
        # Low-saturation distractors: clutter that hides no class colour, so the class can only
        # be read off the object and a proxy's attention has a reason to go there.
        colour = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.15, 0.95))
        pts = rng.uniform(0, cfg.size, size=4)
        if rng.random() < 0.5:
            draw.line(list(pts), fill=colour, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(1.5, cfg.size * 0.06)
            draw.ellipse([pts[0] - r, pts[1] - r, pts[0] + r, pts[1] + r], fill=colour)
    return img


def scene_jpeg(cfg: DemoConfig, scene: Scene, variant: int = 0) -> bytes:
    """JPEG bytes of a scene; variant > 0 is a near-duplicate (shift, brightness, noise, quality)."""
    rng = np.random.default_rng(scene.seed)
    img = _background(cfg, rng)
    _draw_object(ImageDraw.Draw(img), scene)
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, size=(cfg.size, cfg.size, 3))
    quality = cfg.quality
    if variant:
        vrng = np.random.default_rng([scene.seed, variant])
        pixels = np.roll(pixels, tuple(vrng.integers(-1, 2, size=2)), axis=(0, 1))
        pixels = pixels * vrng.uniform(0.93, 1.07) + vrng.normal(0, 3, size=pixels.shape)
        quality = int(vrng.integers(70, 96))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _train_plan(cfg: DemoConfig, rng: np.random.Generator) -> list[dict]:
    """One dict per training image: its scene, given label and duplicate group."""
    n = cfg.classes * cfg.per_class
    n_dup = int(round(n * cfg.dup_fraction))
    originals = [_random_scene(cfg, i % cfg.classes, rng) for i in range(n - n_dup)]
    rows = [dict(scene=s, variant=0, dup_group=-1) for s in originals]
    # Near-duplicates: groups of 2-3 around distinct clean originals.
    group_of = rng.choice(len(originals), size=max(1, n_dup // 2), replace=False)
    for j in range(n_dup):
        g = int(group_of[j % len(group_of)])
        rows[g]["dup_group"] = g
        rows.append(dict(scene=originals[g], variant=j + 1, dup_group=g))
    flip = set(rng.choice([i for i, r in enumerate(rows) if r["dup_group"] < 0],
                          size=int(round(n * cfg.flip_fraction)), replace=False).tolist())
    for i, row in enumerate(rows):
        true = row["scene"].label
        shift = int(rng.integers(1, cfg.classes)) if i in flip else 0
        row.update(given=(true + shift) % cfg.classes, flipped=i in flip)
    return rows


def _paths(cfg: DemoConfig, split: str, rows: list[dict]) -> list[Path]:
    """Relative file path of every row: `split/<given class>/<class>_NNNNN.JPEG`."""
    counters = [0] * cfg.classes
    paths = []
    for row in rows:
        name = CLASSES[row["given"]]
        paths.append(Path(split) / name / f"{name}_{counters[row['given']]:05d}.JPEG")
        counters[row["given"]] += 1
    return paths


def _write(cfg: DemoConfig, split: str, rows: list[dict], paths: list[Path]) -> list[dict]:
    # Labels in the truth table follow ImageFolder's rule (sorted class-dir order), so they
    # compare directly with the labels `curate score` reads back.
    folder_index = {name: i for i, name in enumerate(sorted(CLASSES[:cfg.classes]))}
    truth = []
    for row, rel in zip(rows, paths):
        scene, given = row["scene"], row["given"]
        name = CLASSES[given]
        (cfg.root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_bytes(cfg.root / rel, scene_jpeg(cfg, scene, row["variant"]))
        x0, y0, x1, y1 = scene.box
        truth.append(dict(path=str(rel), split=split, class_name=name, true_class=CLASSES[scene.label],
                          given_label=folder_index[name], true_label=folder_index[CLASSES[scene.label]],
                          flipped=row["flipped"], dup_group=row["dup_group"],
                          x0=x0, y0=y0, x1=x1, y1=y1))
    return truth


TRUTH = "truth.parquet"


def make_demo(cfg: DemoConfig, claim: Callable[[list[str]], None] | None = None) -> pl.DataFrame:
    """Write the demo dataset under cfg.root and return its ground truth (also truth.parquet).

    `claim`, when given, is told every relative path before anything is written (a run folder
    records them, so a later overwrite deletes exactly these files)."""
    rng = np.random.default_rng(cfg.seed)
    train = _train_plan(cfg, rng)
    order = rng.permutation(len(train))  # so duplicates do not sit next to their originals
    train = [train[i] for i in order]
    val = [dict(scene=_random_scene(cfg, i % cfg.classes, rng), variant=0, dup_group=-1,
                given=i % cfg.classes, flipped=False) for i in range(cfg.classes * cfg.val_per_class)]
    paths = {"train": _paths(cfg, "train", train), "val": _paths(cfg, "val", val)}
    if claim is not None:
        claim([p.as_posix() for split in paths.values() for p in split] + [TRUTH])
    truth = _write(cfg, "train", train, paths["train"]) + _write(cfg, "val", val, paths["val"])
    df = pl.DataFrame(truth).with_columns(pl.col("dup_group").cast(pl.Int64))
    with atomic_path(cfg.root / TRUTH) as tmp:
        df.write_parquet(tmp)
    return df
