"""One-shot device benchmark: is the GPU fed? Everything as images/s, with ratios in the same run.

    python bench/throughput/device.py                      # CUDA: deit_tiny and deit_small at 224 px, bf16
    python bench/throughput/device.py --device cpu --quick # the same code paths, small, on the CPU

(a) model only: `curate train`'s training step on batches already on the device (dense, keep 0.7,
    keep 0.5; eager and torch.compile);
(b) loader only, 16 workers, from generated 500x375 JPEG shards: original bytes, shards written with
    `--max-side 256`, and `--decode gpu` (nvJPEG in the main process);
(c) end to end: the training step fed by each loader, at each keep ratio;
(d) `curate score` (read, decode, forward with importance capture, Parquet) against the bare
    forward on the same pre-decoded tensors;
(e) inference as `curate predict` ships it: a token selector before block 0 keeps 0.7 / 0.5 of the
    tokens with no maps, against timm's dense forward (bench/throughput/predict_throughput.py).

Sized for 8 minutes on one H100/H200 with 16 cores (docs/benchmarks.md says what has run where).
Writes `device.md` and `device.json` under $OUT (or --out), and `device.log` line by line (what
was measured survives a timeout). The lent GPU machine lacks webdataset
and polars: `bash bench/tools/device_wheels.sh` here puts them in .whl/; carry it and run there
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
        PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 bench/throughput/device.py
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402
from predict_throughput import measure as predict_measure  # noqa: E402  (beside this script)

from curate.common.dist import Dist  # noqa: E402
from curate.ingest.decode import decode_image  # noqa: E402
from curate.ingest.sources import open_source, read_bytes  # noqa: E402
from curate.score.job import ScoreConfig, run_score  # noqa: E402
from curate.score.proxies import normalizer, resolve_recipe  # noqa: E402
from curate.shard import format as fmt  # noqa: E402
from sparsevit.model import SparseConfig, create_sparse  # noqa: E402
from sparsevit.data import Batch  # noqa: E402
from sparsevit.train import TrainConfig, build, train_step  # noqa: E402

KEEPS = (1.0, 0.7, 0.5)
LOADERS = ("original bytes", "--max-side 256", "--decode gpu")


@dataclass(frozen=True)
class Plan:
    device: torch.device
    models: tuple[str, ...]
    img_size: int
    patch: int | None  # None: the model's own
    model_kwargs: dict[str, Any]
    batch: int
    images: int  # JPEGs in the training shards: 2 batches per loader worker, so no timing spans an epoch's end
    score_images: int
    steps: int
    warmup: int
    workers: int
    compile_keeps: tuple[float, ...]  # keep ratios also timed under torch.compile (of the last model, after
    # everything else: each compile costs tens of seconds, and the 8-minute budget holds two)


def plan_for(device: str, quick: bool) -> Plan:
    if quick:  # the same paths, sized for 2 CPU cores
        return Plan(torch.device(device), ("deit_tiny_patch16_224",), 64, 8, {"depth": 2}, 16, 96, 32, 3, 1,
                    2, (0.5,))
    return Plan(torch.device(device), ("deit_tiny_patch16_224", "deit_small_patch16_224"), 224, None, {}, 256,
                8192, 2048, 24, 6, 16, (1.0, 0.5))


def _config(plan: Plan, model: str, shards: Path, tmp: Path, keep: float, decode: str = "cpu") -> TrainConfig:
    return TrainConfig(shards=shards, out=tmp / "run", model=model, img_size=plan.img_size, patch_size=plan.patch,
                       model_kwargs=plan.model_kwargs, num_classes=4, batch_size=plan.batch, keep=keep,
                       workers=plan.workers, shuffle_buffer=plan.batch, epochs=1, warmup_epochs=0.0,
                       decode=decode, progress=False)


def _timed(fn: Callable[[], int], steps: int, warmup: int, device: torch.device) -> float:
    """images/s of `steps` calls of fn (each returns its images), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    common.sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        n += fn()
    common.sync(device)
    return n / (time.perf_counter() - t0)


def model_only(plan: Plan, model: str, shards: Path, tmp: Path, keep: float, compiled: bool) -> float:
    """(a) training steps on one batch already on the device: the model's ceiling."""
    split = fmt.read_split(shards, "train")
    run = build(_config(plan, model, shards, tmp, keep), Dist(), plan.device, split)
    if compiled:
        run.net = torch.compile(run.core)
    n_tokens = run.core.num_patches
    batch = Batch(keys=[f"k{i}" for i in range(plan.batch)], skipped=[],
                  image=torch.randn(plan.batch, 3, plan.img_size, plan.img_size, device=plan.device),
                  label=torch.randint(0, 4, (plan.batch,), device=plan.device),
                  importance=torch.rand(plan.batch, n_tokens, device=plan.device))

    def step() -> int:
        train_step(run, batch, 0.5, 0, 0.01)
        return plan.batch

    return _timed(step, plan.steps, plan.warmup + (2 if compiled else 0), plan.device)


def _loader_source(name: str, shards: dict[str, Path]) -> tuple[Path, str]:
    return {"original bytes": (shards["original"], "cpu"), "--max-side 256": (shards["reduced"], "cpu"),
            "--decode gpu": (shards["original"], "gpu")}[name]


def loader_only(plan: Plan, model: str, shards: dict[str, Path], tmp: Path, name: str) -> float:
    """(b) batches as the training step receives them (on the device), nothing trained."""
    root, decode = _loader_source(name, shards)
    split = fmt.read_split(root, "train")
    it = common.endless(build(_config(plan, model, root, tmp, 1.0, decode), Dist(), plan.device, split), split)

    def take() -> int:
        b = next(it)
        b.image.to(plan.device, non_blocking=True)
        return len(b)

    return _timed(take, plan.steps, plan.warmup, plan.device)


def end_to_end(plan: Plan, model: str, shards: dict[str, Path], tmp: Path, name: str, keep: float) -> float:
    """(c) `curate train`'s step fed by the loader: what a user's epoch runs at."""
    root, decode = _loader_source(name, shards)
    split = fmt.read_split(root, "train")
    run = build(_config(plan, model, root, tmp, keep, decode), Dist(), plan.device, split)
    it = common.endless(run, split)

    def step() -> int:
        b = next(it)
        train_step(run, b, 0.5, 0, 0.01)
        return len(b)

    return _timed(step, plan.steps, plan.warmup, plan.device)


def scoring(plan: Plan, photos: Path, tmp: Path) -> dict[str, float]:
    """(d) `curate score` with the ImageNet ViT recipe vs its bare forward on decoded tensors."""
    recipe = resolve_recipe("imagenet-vit")
    items = open_source(photos)
    ckpt = tmp / "proxy.pt"
    model = common.random_proxy(ckpt, 4, "imagenet-vit")
    images = torch.stack([decode_image(read_bytes(it), recipe.img_size).image for it in items]).to(plan.device)
    model = model.to(plan.device).eval()
    mean, std = (t.to(plan.device) for t in normalizer(model))
    batch = min(plan.batch, len(images))

    def forward() -> int:
        with torch.inference_mode(), torch.autocast(plan.device.type, torch.bfloat16,
                                                    enabled=plan.device.type == "cuda"):
            for i in range(0, len(images), batch):
                model((images[i:i + batch].float() / 255 - mean) / std)
        return len(images)

    bare = _timed(forward, 2, 1, plan.device)
    res = run_score(ScoreConfig(str(photos), tmp / "scores", proxy="imagenet-vit", checkpoint=ckpt,
                                batch_size=batch, workers=plan.workers, device=plan.device.type, progress=False))
    ours = len(items) / res.timing["score_s"]
    return {"bare_img_s": bare, "score_img_s": ours, "ratio": ours / bare}


def measure(plan: Plan, tmp: Path, log: Callable[[str], None]) -> dict[str, Any]:
    common.make_photos(tmp / "photos", plan.images)
    common.make_photos(tmp / "score-photos", plan.score_images)
    sizes = dict(per_shard=max(8, plan.images // 64), workers=os.cpu_count() or 2)
    shards = {"original": common.write_bench_shards(tmp / "photos", tmp / "original", **sizes),
              "reduced": common.write_bench_shards(tmp / "photos", tmp / "reduced", max_side=256, **sizes)}
    log(f"setup: {plan.images + plan.score_images} photos and two shard sets written")
    results: dict[str, Any] = {"model_only": [], "loader": [], "end_to_end": []}
    for model in plan.models:
        for keep in KEEPS:
            model_only_row(plan, model, shards["original"], tmp, keep, False, results, log)
    for name in LOADERS:
        ips = loader_only(plan, plan.models[0], shards, tmp, name)
        results["loader"].append({"loader": name, "img_s": ips})
        log(f"(b) loader {name}: {ips:.0f} img/s")
    for model in plan.models:
        for name in LOADERS:
            for keep in KEEPS:
                ips = end_to_end(plan, model, shards, tmp, name, keep)
                results["end_to_end"].append({"model": model, "loader": name, "keep": keep, "img_s": ips})
                log(f"(c) {model} {name} keep {keep}: {ips:.0f} img/s")
    results["score"] = scoring(plan, tmp / "score-photos", tmp)
    log(f"(d) score: {results['score']}")
    results["predict"] = {}
    for model in plan.models:
        core = create_sparse(model, SparseConfig(selector_blocks=(0,)), 4, plan.img_size, plan.patch,
                             **plan.model_kwargs)
        results["predict"][model] = predict_measure(core, list(KEEPS[1:]), plan.batch, plan.device, False, 5,
                                                    max(2, plan.steps // 4), amp=True)
        log(f"(e) predict {model}: {results['predict'][model]}")
    for keep in plan.compile_keeps:  # last: a compile costs tens of seconds, and a hang must not cost the rest
        model_only_row(plan, plan.models[-1], shards["original"], tmp, keep, True, results, log)
    return results


def model_only_row(plan: Plan, model: str, shards: Path, tmp: Path, keep: float, compiled: bool,
                   results: dict[str, Any], log: Callable[[str], None]) -> None:
    ips = model_only(plan, model, shards, tmp, keep, compiled)
    results["model_only"].append({"model": model, "keep": keep, "compiled": compiled, "img_s": ips})
    log(f"(a) {model} keep {keep} {'compiled' if compiled else 'eager'}: {ips:.0f} img/s")


def table(plan: Plan, res: dict[str, Any], header: str) -> str:
    lines = [header, "", "(a) model only, training step img/s (ratio to dense eager)", "",
             "| model | keep | eager | compiled |", "|---|---|---|---|"]
    mo = {(r["model"], r["keep"], r["compiled"]): r["img_s"] for r in res["model_only"]}
    for model in plan.models:
        dense = mo[(model, 1.0, False)]
        for keep in KEEPS:
            comp = mo.get((model, keep, True))
            eager = mo[(model, keep, False)]
            lines.append(f"| {model} | {keep} | {eager:.0f} ({eager / dense:.2f}x) | "
                         + (f"{comp:.0f} ({comp / dense:.2f}x)" if comp else "-") + " |")
    lines += ["", f"(b) loader only, {plan.workers} workers, img/s", "", "| loader | img/s |", "|---|---|"]
    lines += [f"| {r['loader']} | {r['img_s']:.0f} |" for r in res["loader"]]
    lines += ["", "(c) end to end img/s (ratio to dense with the same loader)", "",
              "| model | loader | " + " | ".join(f"keep {k}" for k in KEEPS) + " |", "|---|---|" + "---|" * len(KEEPS)]
    e2e = {(r["model"], r["loader"], r["keep"]): r["img_s"] for r in res["end_to_end"]}
    for model in plan.models:
        for name in LOADERS:
            dense = e2e[(model, name, 1.0)]
            lines.append(f"| {model} | {name} | " + " | ".join(
                f"{e2e[(model, name, k)]:.0f} ({e2e[(model, name, k)] / dense:.2f}x)" for k in KEEPS) + " |")
    s = res["score"]
    lines += ["", "(d) scoring, imagenet-vit recipe", "", "| bare forward img/s | curate score img/s | ratio |",
              "|---|---|---|", f"| {s['bare_img_s']:.0f} | {s['score_img_s']:.0f} | {s['ratio']:.2f} |"]
    lines += ["", "(e) inference, selector before block 0 (no maps), img/s (ratio to dense)", "",
              "| model | dense | " + " | ".join(f"keep {k}" for k in KEEPS[1:]) + " |",
              "|---|---|" + "---|" * (len(KEEPS) - 1)]
    for model, r in res["predict"].items():
        lines.append(f"| {model} | {r['dense']:.0f} | " + " | ".join(
            f"{r[f'keep {k}']:.0f} ({r[f'keep {k}'] / r['dense']:.2f}x)" for k in KEEPS[1:]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes: the code paths, not the figures")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-bench")))
    args = ap.parse_args()
    plan = plan_for(args.device, args.quick)
    if plan.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    header = common.header(f"images {plan.images} 500x375 JPEG", f"{plan.img_size} px", f"batch {plan.batch}",
                           "bf16 autocast on CUDA", f"{plan.steps} timed steps after {plan.warmup}",
                           *(["quick"] if args.quick else []), device=plan.device)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, open(args.out / "device.log", "w") as log_file:
        def log(line: str) -> None:
            line = f"[{time.perf_counter() - t0:5.0f}s] {line}"  # where a timed-out run's minutes went
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()

        log(header)
        res = measure(plan, Path(tmp), log)
    text = table(plan, res, header) + f"\n\ntotal {time.perf_counter() - t0:.0f}s\n"
    print("\n" + text)
    (args.out / "device.md").write_text(text)
    (args.out / "device.json").write_text(json.dumps({"header": header, "plan": {**plan.__dict__, "device": str(
        plan.device)}, **res}, indent=1))


if __name__ == "__main__":
    main()
