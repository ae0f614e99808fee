"""curate.ingest.sources: items from ImageFolder, WebDataset shards and list files, with stable keys."""
from __future__ import annotations

import io
import pickle
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import webdataset as wds

from curate.ingest.sources import (
    Item,
    SourceError,
    assign_keys,
    from_image_folder,
    from_list_file,
    from_webdataset,
    open_source,
    read_bytes,
    read_class_map,
    relative_source,
    sanitize_key,
    split_source,
)
from curate.ingest.limits import class_count_fault

KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _assert_valid_keys(items: list[Item]) -> None:
    keys = [it.key for it in items]
    assert all(KEY_RE.match(k) for k in keys), keys
    assert len(set(keys)) == len(keys)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    _write(root / "zebra" / "z1.JPEG", b"z1")
    _write(root / "zebra" / "sub" / "deep.jpg", b"deep")  # nested inside a class dir
    _write(root / "apple" / "ünïcode name.v2.JPEG", b"u")
    _write(root / "apple" / "a b.jpg", b"ab")
    _write(root / "apple" / "a.b.JPEG", b"dots")
    _write(root / "apple" / "notes.txt", b"not an image")  # still an input: a decode error later
    _write(root / "apple" / ".DS_Store", b"hidden")
    _write(root / "apple" / ".cache" / "x.jpg", b"hidden dir")
    _write(root / "README.md", b"ignored: not in a class dir")
    (root / "zebra" / "link.jpg").symlink_to(root / "zebra" / "z1.JPEG")
    return root


# --- keys -------------------------------------------------------------------------------------


def test_sanitize_key_rules() -> None:
    assert sanitize_key("apple-ünïcode name.v2") == "apple-unicode_name_v2"
    assert sanitize_key("cls-a.b") == "cls-a_b"
    assert sanitize_key("..//..") == "x"
    assert sanitize_key("日本") == "x"
    long_a, long_b = "n" * 100 + "a", "n" * 100 + "b"
    key_a, key_b = sanitize_key(long_a), sanitize_key(long_b)
    assert len(key_a) == len(key_b) == 80 and key_a != key_b
    assert KEY_RE.match(key_a) and key_a == sanitize_key(long_a)


def test_assign_keys_collisions_are_order_independent() -> None:
    raw = ["cls-a b", "cls-a_b", "cls-other"]
    sources = ["/d/cls/a b.jpg", "/d/cls/a_b.jpg", "/d/cls/other.jpg"]
    keys = assign_keys(raw, sources)
    assert keys[2] == "cls-other"
    # Both members of the collision get a hash, not just the second one.
    assert all(re.fullmatch(r"cls-a_b_[0-9a-f]{8}", k) for k in keys[:2])
    assert len(set(keys)) == 3
    reversed_keys = assign_keys(raw[::-1], sources[::-1])
    assert reversed_keys[::-1] == keys


def test_assign_keys_long_collisions_stay_short() -> None:
    raw = ["c-" + "x" * 120, "c-" + "x" * 120]
    keys = assign_keys(raw, ["/s/1", "/s/2"])
    assert all(KEY_RE.match(k) for k in keys) and keys[0] != keys[1]


def test_assign_keys_same_source_twice_raises() -> None:
    with pytest.raises(SourceError, match="share a key"):
        assign_keys(["a", "a"], ["/same", "/same"])


# --- ImageFolder ------------------------------------------------------------------------------


def test_image_folder_items(folder: Path) -> None:
    items = from_image_folder(folder)
    _assert_valid_keys(items)
    by_key = {it.key: it for it in items}
    names = sorted(Path(it.source).name for it in items)
    expected = ["a b.jpg", "a.b.JPEG", "notes.txt", "ünïcode name.v2.JPEG"]
    assert names == sorted([*expected, "deep.jpg", "link.jpg", "z1.JPEG"])
    # Sorted label order: apple = 0 before zebra = 1, then by path.
    assert [it.label for it in items] == [0, 0, 0, 0, 1, 1, 1]
    assert [it.class_name for it in items][:4] == ["apple"] * 4
    assert items == sorted(items, key=lambda it: (it.label, it.source))
    assert "apple-unicode_name_v2" in by_key
    assert "zebra-sub_deep" in by_key
    assert all(Path(it.source).is_absolute() and it.path == it.source for it in items)
    assert read_bytes(by_key["zebra-sub_deep"]) == b"deep"
    assert read_bytes(by_key["zebra-link"]) == b"z1"  # symlinked file, read through the link


def test_image_folder_dotted_names_collide_and_get_hashes(folder: Path) -> None:
    # "a b.jpg" and "a.b.JPEG" both sanitise to "apple-a_b".
    items = from_image_folder(folder)
    colliding = [it for it in items if it.key.startswith("apple-a_b_")]
    assert sorted(Path(it.source).name for it in colliding) == ["a b.jpg", "a.b.JPEG"]
    assert all(re.fullmatch(r"apple-a_b_[0-9a-f]{8}", it.key) for it in colliding)
    assert [it.key for it in from_image_folder(folder)] == [it.key for it in items]


def test_image_folder_underscore_collision(tmp_path: Path) -> None:
    _write(tmp_path / "c" / "a b.jpg", b"1")
    _write(tmp_path / "c" / "a_b.jpg", b"2")
    items = from_image_folder(tmp_path)
    _assert_valid_keys(items)
    assert all(re.fullmatch(r"c-a_b_[0-9a-f]{8}", it.key) for it in items)


def test_image_folder_long_names(tmp_path: Path) -> None:
    stem = "y" * 150
    _write(tmp_path / "c" / f"{stem}1.jpg", b"1")
    _write(tmp_path / "c" / f"{stem}2.jpg", b"2")
    items = from_image_folder(tmp_path)
    _assert_valid_keys(items)
    assert all(len(it.key) == 80 for it in items)


def test_image_folder_class_map(folder: Path, tmp_path: Path) -> None:
    class_map = tmp_path / "classes.txt"
    class_map.write_text("zebra\n\nunused\napple\n")
    assert read_class_map(class_map) == ["zebra", "unused", "apple"]
    items = from_image_folder(folder, class_map)
    assert [it.label for it in items] == [0, 0, 0, 2, 2, 2, 2]
    assert {it.class_name for it in items if it.label == 0} == {"zebra"}


def test_image_folder_class_missing_from_map(folder: Path, tmp_path: Path) -> None:
    class_map = tmp_path / "classes.txt"
    class_map.write_text("zebra\n")
    with pytest.raises(SourceError, match="apple"):
        from_image_folder(folder, class_map)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        from_image_folder(tmp_path / "nope")
    _write(tmp_path / "loose.jpg", b"x")
    with pytest.raises(SourceError, match="no class subdirectories"):
        from_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(SourceError, match="no samples"):
        from_image_folder(tmp_path)


# --- WebDataset -------------------------------------------------------------------------------


def _write_shard(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)


def _shard_samples(shard: int, n: int) -> list[dict]:
    return [
        {
            "__key__": f"s{shard}/img{i:03d}",
            "jpg": bytes([shard, i]) * (300 + i),  # bytes pass through TarWriter unencoded
            "cls": i % 3,
            "importance.npy": b"not really npy",
        }
        for i in range(n)
    ]


def test_webdataset_keys_labels_and_bytes(tmp_path: Path) -> None:
    samples = _shard_samples(0, 4)
    samples[1]["json"] = {"class_name": "kite"}
    _write_shard(tmp_path / "train-000000.tar", samples)
    items = from_webdataset(str(tmp_path / "train-000000.tar"))
    _assert_valid_keys(items)
    assert [it.key for it in items] == [f"s0_img{i:03d}" for i in range(4)]
    assert [it.label for it in items] == [0, 1, 2, 0]
    assert [it.class_name for it in items] == ["0", "kite", "2", "0"]
    for item, sample in zip(items, samples):
        assert read_bytes(item) == sample["jpg"]
        assert item.source.endswith(f"train-000000.tar#{sample['__key__']}.jpg")
        assert split_source(item.source) == (str(tmp_path / "train-000000.tar"), f"{sample['__key__']}.jpg")


def test_webdataset_brace_glob_and_directory(tmp_path: Path) -> None:
    for shard in range(3):
        _write_shard(tmp_path / "shards" / f"train-{shard:06d}.tar", _shard_samples(shard, 2))
    brace = from_webdataset(str(tmp_path / "shards" / "train-{000000..000002}.tar"))
    directory = from_webdataset(str(tmp_path / "shards"))
    globbed = open_source(tmp_path / "shards" / "train-*.tar")
    assert brace == directory == globbed
    assert len(brace) == 6 and read_bytes(brace[5]) == bytes([2, 1]) * 301
    assert open_source(tmp_path / "shards") == brace


def test_webdataset_partial_samples_and_class_map(tmp_path: Path) -> None:
    tar_path = tmp_path / "odd.tar"
    with tarfile.open(tar_path, "w") as tf:
        members = [("a.cls", b"1"), ("b.jpg", b"bb"), ("b.seg.png", b"mask"), ("c.txt", b"t")]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    class_map = tmp_path / "classes.txt"
    class_map.write_text("cat\ndog\n")
    items = open_source(tar_path, class_map)
    by_key = {it.key: it for it in items}
    assert (by_key["a"].label, by_key["a"].class_name, by_key["a"].size) == (1, "dog", 0)
    assert read_bytes(by_key["a"]) == b""  # no image: decodes as an empty-file error row
    assert (by_key["b"].label, by_key["b"].class_name) == (-1, "")
    assert by_key["b"].problem.startswith("no label")  # an error row: never scored as "ok"
    assert read_bytes(replace(by_key["b"], problem="")) == b"bb"  # plain jpg preferred over the seg.png extra
    assert by_key["c"].size == 0


def test_webdataset_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="do not exist"):
        from_webdataset(str(tmp_path / "train-{0..1}.tar"))
    with pytest.raises(SourceError, match="no .tar shards"):
        from_webdataset(str(tmp_path / "*.tar"))
    _write(tmp_path / "broken.tar", b"this is not a tar" * 10)
    with pytest.raises(SourceError, match="broken.tar"):
        from_webdataset(str(tmp_path / "broken.tar"))


# --- list files -------------------------------------------------------------------------------


def _list_frame() -> pl.DataFrame:
    return pl.DataFrame(
        {"path": ["imgs/cat/1.jpg", "imgs/dog/1.jpg", "../abs.png"], "label": [0, 1, 1]}
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_list_file_relative_paths(tmp_path: Path, suffix: str) -> None:
    list_path = tmp_path / "lists" / f"train{suffix}"
    list_path.parent.mkdir()
    df = _list_frame()
    df.write_csv(list_path) if suffix == ".csv" else df.write_parquet(list_path)
    items = open_source(list_path)
    _assert_valid_keys(items)
    assert [it.key for it in items] == ["cat-1", "dog-1", f"{tmp_path.name}-abs"]
    assert [it.label for it in items] == [0, 1, 1]
    assert [it.class_name for it in items] == ["0", "1", "1"]
    assert items[0].source == str(tmp_path.resolve() / "lists" / "imgs" / "cat" / "1.jpg")
    assert items[2].source == str(tmp_path.resolve() / "abs.png")
    _write(Path(items[0].path), b"cat bytes")
    assert read_bytes(items[0]) == b"cat bytes"


def test_list_file_class_names_only(tmp_path: Path) -> None:
    list_path = tmp_path / "train.csv"
    list_path.write_text("path,class_name\nx/a.jpg,dog\ny/b.jpg,cat\nz/c.jpg,dog\n")
    items = from_list_file(list_path)
    assert [(it.label, it.class_name) for it in items] == [(1, "dog"), (0, "cat"), (1, "dog")]
    class_map = tmp_path / "classes.txt"
    class_map.write_text("dog\ncat\n")
    assert [it.label for it in from_list_file(list_path, class_map)] == [0, 1, 0]
    class_map.write_text("dog\n")
    with pytest.raises(SourceError, match="cat"):
        from_list_file(list_path, class_map)


def test_list_file_errors(tmp_path: Path) -> None:
    list_path = tmp_path / "train.csv"
    list_path.write_text("file,target\na.jpg,0\n")
    with pytest.raises(SourceError, match=r"'path'.*found \['file', 'target'\]"):
        from_list_file(list_path)
    list_path.write_text("path,label\na.jpg,zero\n")
    with pytest.raises(SourceError, match="integers"):
        from_list_file(list_path)
    list_path.write_text("path,label\n")
    with pytest.raises(SourceError, match="no samples"):
        from_list_file(list_path)
    list_path.write_text("path,label\na.jpg,5\n")
    (tmp_path / "classes.txt").write_text("only\n")
    with pytest.raises(SourceError, match="unknown label 5"):
        from_list_file(list_path, tmp_path / "classes.txt")


# --- dispatch and pickling --------------------------------------------------------------------


def test_open_source_dispatch_and_errors(folder: Path, tmp_path: Path) -> None:
    assert open_source(folder) == from_image_folder(folder)
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="cannot tell what kind of input"):
        open_source(empty)
    odd = _write(tmp_path / "data.json", b"{}")
    with pytest.raises(SourceError, match="cannot tell what kind of input"):
        open_source(odd)


def test_item_pickles(folder: Path) -> None:
    items = from_image_folder(folder)
    restored = pickle.loads(pickle.dumps(items))
    assert restored == items
    assert read_bytes(restored[0]) == read_bytes(items[0])


def test_split_source_is_the_one_parser_of_a_source(tmp_path: Path) -> None:
    """A tar member is "PATH.tar#member"; a "#" anywhere else belongs to a name."""
    assert split_source("/d/s-000.tar#k/a#1.jpg") == ("/d/s-000.tar", "k/a#1.jpg")
    assert split_source("/d/S.TAR#x.jpg") == ("/d/S.TAR", "x.jpg")
    assert split_source("/d/cls/a#b.jpg") == ("/d/cls/a#b.jpg", None)
    assert split_source("/d/cls/a.tar.jpg") == ("/d/cls/a.tar.jpg", None)
    assert relative_source("/d/s-000.tar#k/../a.jpg", "/d") == "s-000.tar#k/../a.jpg"
    assert relative_source("/d/cls/a#b.jpg", "/d") == "cls/a#b.jpg"


def test_class_count_fault_names_what_it_checked() -> None:
    assert class_count_fault(2, "n") == "" and class_count_fault(100_000, "n") == ""
    for bad in (1, 0, -3, 100_001, True, 2.0, "3", None):
        assert class_count_fault(bad, "--num-classes").startswith(f"--num-classes {bad!r}"), bad
    assert class_count_fault(7, "n", max_classes=6) == "n 7 is not a class count from 2 to 6"
