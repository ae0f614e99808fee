"""The layout keeps the data flow readable: a stage imports only stages before it, and sparsevit
(the training library) only curate.common, the inputs' rules (curate.ingest: `curate predict` reads
image files as `curate score` does) and the shard format."""
import ast
from pathlib import Path

from .conftest import ROOT

# The data flow, in order. A module may import its own stage and those before it.
STAGES = ("curate.common", "curate.ingest", "curate.score", "curate.select", "curate.shard", "sparsevit",
          "curate.demo")
SPARSEVIT_MAY_USE = ("curate.common", "curate.ingest", "curate.shard.format")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports (inside functions too), as dotted names of ours."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("curate", "sparsevit")}


def _stage(module: str) -> int | None:
    for i, prefix in enumerate(STAGES):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None  # `curate` itself (its version), or a name imported from a package


def _modules() -> dict[str, Path]:
    files = sorted((ROOT / "curate").rglob("*.py")) + sorted((ROOT / "sparsevit").rglob("*.py"))
    return {_module_name(p): p for p in files}


def test_every_module_belongs_to_a_stage():
    loose = [m for m in _modules() if _stage(m) is None and m != "curate"]
    assert loose == [], f"modules outside the stage packages {STAGES}: {loose}"


def test_no_module_imports_a_later_stage():
    backwards = []
    for module, path in _modules().items():
        own = _stage(module)
        for imported in _imports(path):
            theirs = _stage(imported)
            if own is not None and theirs is not None and theirs > own:
                backwards.append(f"{module} ({STAGES[own]}) imports {imported} ({STAGES[theirs]})")
    assert backwards == []


def test_sparsevit_uses_only_common_ingest_and_the_shard_format():
    outside = []
    for module, path in _modules().items():
        if module.startswith("sparsevit"):
            outside += [f"{module} imports {m}" for m in _imports(path)
                        if m.startswith("curate") and not m.startswith(SPARSEVIT_MAY_USE) and m != "curate.shard"]
    assert outside == []


def test_the_check_sees_a_backward_import(tmp_path: Path):
    """The checks above can fail: a stage importing a later one is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from curate.shard.job import run_shard\n    import sparsevit.train\n")
    assert _imports(bad) == {"curate.shard.job", "curate.shard.job.run_shard", "sparsevit.train"}
    assert _stage("curate.shard.job") > _stage("curate.score.table") and _stage("curate.demo.run") == 6


def _readme_tree() -> dict[str, set[str]]:
    """The README's Layout block as {package folder: module files listed under it}."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    tree: dict[str, set[str]] = {}
    package = ""
    for line in block.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.endswith("/") and not line.startswith(" "):
            package = name.rstrip("/")
            tree[package] = set()
        elif name.endswith(".py") and line.startswith("  ") and package:
            tree[package].add(name)
    return tree


def test_the_readme_layout_lists_every_module():
    tree = {package: files for package, files in _readme_tree().items() if files}  # bench/, tests/: no list
    on_disk = {str(p.parent.relative_to(ROOT)): set() for p in _modules().values()}
    for p in _modules().values():
        if p.name != "__init__.py":
            on_disk[str(p.parent.relative_to(ROOT))].add(p.name)
    on_disk = {k: v for k, v in on_disk.items() if v}
    assert tree == on_disk
