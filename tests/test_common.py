"""curate.common: the seeded hash, the registry, the learning-rate schedule, atomic files."""
import hashlib
import math
from pathlib import Path

import pytest

from curate.common.atomic import atomic_path, jsonable
from curate.common.hashing import key_digest, unit, unit_hash
from curate.common.registry import Registry
from curate.common.schedule import warmup_cosine


def test_seeded_hash_is_blake2b_of_seed_and_key_and_tags_separate_draws():
    # The formula selection and the shard order used before they shared this module: changing
    # it would change every selection and every shard's bytes.
    expected = hashlib.blake2b(b"7\x00some-key", digest_size=8).digest()
    assert key_digest(7, "some-key") == expected
    assert unit(7, "some-key") == (int.from_bytes(expected, "little") >> 11) / 2 ** 53
    keys = [f"k{i}" for i in range(1000)]
    u = unit_hash(keys, seed=3)
    assert list(u[:5]) == [unit(3, k) for k in keys[:5]]
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.03
    assert unit(3, "k1", tag="epoch1") != unit(3, "k1") != unit(4, "k1")


def test_registry_lists_the_known_names_when_a_name_is_wrong():
    reg: Registry[int] = Registry("colour")
    reg.register("red")(1)
    reg.add("blue", 2)
    assert reg["red"] == 1 and "blue" in reg and reg.names() == ["blue", "red"] and list(reg) == ["red", "blue"]
    with pytest.raises(ValueError, match="unknown colour 'green'; choose from blue, red"):
        reg["green"]
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("red", 3)


def test_warmup_cosine_in_steps_is_the_proxy_schedule_it_replaced():
    def old(step: int, total: int, warmup: int, peak: float) -> float:  # curate/training.py before the move
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    for total, warmup in ((160, 16), (10, 0), (7, 7)):
        assert [warmup_cosine(s, total, warmup, 2e-3) for s in range(total + 2)] == \
            [old(s, total, warmup, 2e-3) for s in range(total + 2)]  # bit for bit: proxy scores depend on it


def test_warmup_cosine_in_epochs_reaches_peak_as_warmup_ends_and_floor_at_the_end():
    step = 1 / 40  # 40 steps an epoch
    first = warmup_cosine(0.0, 10, 1.0, 1.0, floor=0.1, step=step)
    assert first == pytest.approx(step)  # the first step already learns
    assert warmup_cosine(1.0 - step, 10, 1.0, 1.0, 0.1, step) == pytest.approx(1.0)
    assert warmup_cosine(1.0, 10, 1.0, 1.0, 0.1, step) == pytest.approx(1.0)
    assert warmup_cosine(5.5, 10, 1.0, 1.0, 0.1, step) == pytest.approx(0.55)
    assert warmup_cosine(10.0, 10, 1.0, 1.0, 0.1, step) == pytest.approx(0.1)


def test_atomic_path_leaves_nothing_under_either_name_when_the_writer_fails(tmp_path: Path):
    target = tmp_path / "model.pt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]
    assert jsonable({"p": Path("a"), "t": (1, 2)}) == {"p": "a", "t": [1, 2]}
