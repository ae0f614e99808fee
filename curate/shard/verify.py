"""`curate verify`: re-read everything a shard folder's indexes list; faults as text."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from curate.common.atomic import file_sha256
from curate.ingest.decode import decode_image
from curate.shard.format import (IMAGE_FIELDS, INFO, MANIFEST, MAP_FIELD, FormatError, cls_faults, filename_fault,
                                 load_npy, max_side_of, num_classes_fault, read_samples, version_fault)

MAX_FAULTS_PER_SHARD = 10  # a systematically broken shard would otherwise flood the report


def verify(out: Path) -> list[str]:
    """Re-read everything listed in OUT/manifest.json and OUT/_info.json; faults as text.

    An empty list means: the manifest is of this format version, indexes agree, every shard
    name stays inside OUT, every shard exists with the recorded sha256, size and count, every
    sample has one decodable jpg/png/webp, a cls that is a class index below the manifest's
    num_classes (itself a class count), a json dict and (in splits whose manifest entry says
    "importance": true) a float16 2-D importance map of the recorded shape, keys are unique
    within each split, and no `.tmp` leftovers or unlisted `.tar` files lie in OUT. With
    `images.max_side` in the manifest (`curate shard --max-side`), every reduced image is within
    it and every image kept as original bytes has its recorded original size.
    """
    out = Path(out)
    faults: list[str] = []
    manifest = _load_json(out / MANIFEST, faults)
    info = _load_json(out / INFO, faults)
    if manifest is None or info is None:
        return faults
    if fault := version_fault(manifest):
        return faults + [fault]  # fields may mean other things in another version: read no further
    shards = _manifest_shards(manifest, faults)
    try:
        max_side = max_side_of(manifest)
    except FormatError as exc:
        faults.append(str(exc))
        max_side = None
    faults += _check_info(info, shards)
    if fault := num_classes_fault(manifest):
        faults.append(fault)
    classes = None if fault else manifest["num_classes"]
    for split, entries in shards.items():
        owner: dict[str, str] = {}  # key -> shard that holds it; keys are unique per split
        maps = manifest["splits"][split].get("importance")
        if not isinstance(maps, bool):
            faults.append(f"{MANIFEST}: split {split!r} does not say whether it carries maps (importance)")
            continue
        for entry in entries:
            faults += _check_shard(out, entry, owner, maps, max_side, classes)
    faults += _stray_files(out, {e.get("filename") for es in shards.values() for e in es})
    return faults


def _load_json(path: Path, faults: list[str]) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        faults.append(f"{path.name}: cannot read: {exc}")
        return None
    if not isinstance(obj, dict):
        faults.append(f"{path.name}: not a JSON object")
        return None
    return obj


def _manifest_shards(manifest: dict, faults: list[str]) -> dict[str, list[dict]]:
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        faults.append("manifest.json: no 'splits' with shard entries")
        return {}
    shards: dict[str, list[dict]] = {}
    for split, part in splits.items():
        entries = part.get("shards") if isinstance(part, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            faults.append(f"manifest.json: split {split!r} has no list of shard entries")
            continue
        names = [filename_fault(e.get("filename")) for e in entries]
        if any(names):
            faults += [f"manifest.json: split {split!r}: {f}" for f in names if f]
            continue  # never open a path the index points outside the folder
        shards[split] = entries
    return shards


def _check_info(info: dict, shards: dict[str, list[dict]]) -> list[str]:
    """_info.json against itself and the manifest: what timm trusts must match the tars."""
    splits = info.get("splits")
    if not isinstance(splits, dict):
        return ["_info.json: no 'splits' object"]
    only_one = sorted(set(splits) ^ set(shards))
    faults = [f"_info.json: split {s!r} is in only one of _info.json, manifest.json"
              for s in only_one]
    for split in sorted(set(splits) & set(shards)):
        faults += _check_info_split(split, splits[split], shards[split])
    return faults


def _check_info_split(split: str, part: Any, entries: list[dict]) -> list[str]:
    where = f"_info.json split {split!r}"
    try:
        names, lengths = list(part["filenames"]), list(part["shard_lengths"])
        total = part["num_samples"]
    except (KeyError, TypeError) as exc:
        return [f"{where}: missing field {exc} "
                "(timm needs name, num_samples, filenames, shard_lengths)"]
    faults = [] if part.get("name") == split else [f"{where}: name is {part.get('name')!r}"]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in [*lengths, total]):
        return faults + [f"{where}: num_samples and shard_lengths must be integers, got {total!r}, {lengths!r:.80}"]
    if total != sum(lengths):
        faults.append(f"{where}: num_samples {total} != sum(shard_lengths) {sum(lengths)}")
    if names != [e.get("filename") for e in entries]:
        faults.append(f"{where}: filenames differ from manifest.json")
    if lengths != [e.get("count") for e in entries]:
        faults.append(f"{where}: shard_lengths {lengths} != manifest counts "
                      f"{[e.get('count') for e in entries]}")
    return faults


def _check_shard(out: Path, entry: dict, owner: dict[str, str], maps: bool, max_side: int | None,
                 classes: int | None) -> list[str]:
    name = str(entry.get("filename"))
    path = out / name
    if not path.is_file():
        return [f"{name}: listed in manifest.json but missing"]
    faults = []
    if path.stat().st_size != entry.get("bytes"):
        faults.append(f"{name}: size {path.stat().st_size} != manifest bytes {entry.get('bytes')}")
    if file_sha256(path) != entry.get("sha256"):
        faults.append(f"{name}: sha256 differs from manifest.json (corrupt or rewritten)")
    count, sample_faults = _check_samples(path, owner, maps, max_side, classes)
    if count != entry.get("count"):
        faults.append(f"{name}: {count} samples read, manifest count is {entry.get('count')}")
    return faults + _capped(name, sample_faults)


def _check_samples(path: Path, owner: dict[str, str], maps: bool, max_side: int | None, classes: int | None
                   ) -> tuple[int, list[str]]:
    count, faults = 0, []
    try:
        for sample in read_samples(path):
            count += 1
            key = sample["__key__"]
            if key in owner:
                faults.append(f"key {key!r} also in {owner[key]}")
            owner[key] = path.name
            problems = sample_faults(sample, require_importance=maps, max_side=max_side, classes=classes)
            faults += [f"{key}: {f}" for f in problems]
    except Exception as exc:  # truncated or corrupt tar: report, keep checking other shards
        # webdataset appends the stream and url to args: keep only the message
        message = exc.args[0] if exc.args else exc
        faults.append(f"unreadable after {count} samples: {type(exc).__name__}: {message}")
    return count, faults


def _capped(name: str, faults: list[str]) -> list[str]:
    shown = [f"{name}: {f}" for f in faults[:MAX_FAULTS_PER_SHARD]]
    if len(faults) > MAX_FAULTS_PER_SHARD:
        shown.append(f"{name}: ... and {len(faults) - MAX_FAULTS_PER_SHARD} more faults")
    return shown


def sample_faults(sample: dict[str, Any], require_importance: bool, max_side: int | None = None,
                  classes: int | None = None) -> list[str]:
    """What is wrong with one raw sample (field -> bytes) as timm and sparsevit read it; with
    `max_side`, also its image size against what `curate shard --max-side` promised; with
    `classes`, its cls against the class count."""
    images = [f for f in IMAGE_FIELDS if f in sample]
    if len(images) != 1:
        return [f"has {len(images)} jpg/png/webp members, needs exactly one"]
    faults = []
    decoded = decode_image(sample[images[0]], 8)  # tiny target: JPEG draft keeps it fast
    if decoded.error:
        faults.append(f"{images[0]} does not decode: {decoded.error}")
    faults += cls_faults(sample.get("cls"), classes)
    meta = _json_field(sample.get("json"), faults)
    if max_side is not None and decoded.ok:
        faults += _size_faults((decoded.width, decoded.height), meta, max_side)
    if MAP_FIELD in sample or require_importance:
        faults += _importance_faults(sample.get(MAP_FIELD), meta)
    return faults


def _size_faults(size: tuple[int, int], meta: dict, max_side: int) -> list[str]:
    """A reduced image within `max_side`; original bytes at their recorded original size."""
    stored, original = meta.get("stored"), meta.get("original_size")
    if stored not in ("original", "reduced") or not isinstance(original, list) or len(original) != 2:
        return [f"json lacks stored/original_size, and the manifest says images were shipped at max_side {max_side}"]
    if stored == "reduced" and max(size) > max_side:
        return [f"reduced image is {size[0]}x{size[1]}, over max_side {max_side}"]
    if stored == "original" and list(size) != original:
        return [f"image is {size[0]}x{size[1]}, json says original bytes of {original[0]}x{original[1]}"]
    return []


def _json_field(data: bytes | None, faults: list[str]) -> dict:
    try:
        meta = json.loads(data) if data is not None else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        faults.append("json is missing or not an object")
        return {}
    return meta


def _importance_faults(data: bytes | None, meta: dict) -> list[str]:
    """The map as the training loader reads it (format.load_npy), finite, of the recorded shape."""
    if data is None:
        return ["importance.npy is missing (the manifest says this split carries maps)"]
    try:
        grid = load_npy(data)
    except ValueError as exc:
        return [str(exc)]
    if not np.isfinite(grid).all():
        return ["importance.npy holds NaN or infinite values"]
    expected = meta.get("importance_shape")
    if expected is not None and list(grid.shape) != list(expected):
        return [f"importance.npy shape {list(grid.shape)} != json importance_shape {expected}"]
    return []


def _stray_files(out: Path, listed: set[Any]) -> list[str]:
    """Leftovers a directory-glob reader would pick up, or that mean an interrupted write."""
    faults = [f"{p.name}: leftover temporary file (interrupted write?)"
              for p in sorted(out.glob(".*.tmp"))]
    faults += [f"{p.name}: .tar not listed in manifest.json"
               for p in sorted(out.glob("*.tar")) if p.name not in listed]
    return faults
