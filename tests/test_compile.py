"""torch.compile of the token-dropping model: with a fixed keep ratio the token count is fixed, so
new maps (new tokens chosen) each step must reuse the compiled graph, not recompile. On CPU with
inductor (it needs a C++ compiler) and, on a GPU machine, on CUDA."""
from __future__ import annotations

import shutil

import pytest
import torch

from sparsevit.model import SparseConfig, create_sparse

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                 reason="inductor needs a C++ compiler")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_compiled_token_dropping_does_not_recompile_per_step(device: str):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = create_sparse("vit_tiny_patch16_224", SparseConfig(), num_classes=4, img_size=32, patch_size=8,
                          depth=2).to(device)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    for step in range(4):
        x = torch.randn(8, 3, 32, 32, device=device)
        maps = torch.rand(8, 16, device=device)  # new importance each step: other tokens kept
        out = compiled(x, maps, 0.5)
        out.sum().backward()
        if step == 3:  # the compiled graph computes what eager mode does
            torch.testing.assert_close(out, model(x, maps, 0.5), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_the_deployed_selector_model_compiles_to_one_graph_without_maps():
    """What `curate predict` ships: the selector picks k tokens with no maps; new images (other
    tokens chosen) reuse the one compiled graph."""
    from torch._dynamo.utils import counters

    from sparsevit.predict import Deployed

    torch.manual_seed(0)
    core = create_sparse("vit_tiny_patch16_224", SparseConfig(selector_blocks=(0,), package=True), num_classes=4,
                         img_size=32, patch_size=8, depth=2).eval()
    model = Deployed(core, keep=0.5)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(8, 3, 32, 32)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
