import io
from pathlib import Path

import pytest
from PIL import Image

from curate.demo.data import DemoConfig, make_demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset (4 classes x 24 images at 64 px), shared by the job tests."""
    root = tmp_path_factory.mktemp("demo")
    make_demo(DemoConfig(root=root, classes=4, per_class=24, val_per_class=4, seed=1))
    return root


def jpeg_bytes(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 30),
               mode: str = "RGB", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 128).save(buf, "JPEG", **save)
    return buf.getvalue()
