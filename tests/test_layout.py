"""The layout keeps the data flow readable: a stage imports only stages before it, and sparsevit
(the training library) only curate.common, the inputs' rules (curate.ingest: `curate predict` reads
image files as `curate score` does) and the shard format."""
import ast
import re
import subprocess
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


# The contracts live in the repository (docs/design.md), not in a folder beside it that a clone lacks.
# Only the benchmarks that read its data, and the records of what was measured there, may name it.
# The patterns are built, so this file does not name them itself.
OUTSIDE_REFS = ("../" + "shared", "shared/" + "DESIGN")
MAY_NAME_OUTSIDE = ("bench/", "docs/history.md", "docs/benchmarks.md")
DESIGN_LINK = re.compile(r"docs/design\.md#([A-Za-z0-9_-]+)")


def _tracked_text_files() -> dict[str, str]:
    """Every file git tracks or would track (not ignored) that is UTF-8 text, as {relative path:
    text}; outside a git checkout, every file under ROOT but those in hidden and cache folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout
        names = [n for n in listed.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                 and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(ROOT).parts)]
    texts = {}
    for name in names:
        try:
            data = (ROOT / name).read_bytes()
        except OSError:  # deleted in the working tree, not yet in git
            continue
        if b"\0" not in data:
            try:
                texts[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
    return texts


def _outside_refs(texts: dict[str, str]) -> list[str]:
    return [f"{name}: {ref}" for name, text in texts.items() if not name.startswith(MAY_NAME_OUTSIDE)
            for ref in OUTSIDE_REFS if ref in text]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    headings = [line.lstrip("#").strip() for line in markdown.splitlines() if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _broken_design_links(texts: dict[str, str], design: str) -> list[str]:
    anchors = _anchors(design)
    return [f"{name}: docs/design.md#{a}" for name, text in texts.items() for a in DESIGN_LINK.findall(text)
            if a not in anchors]


def test_nothing_refers_outside_the_repository_and_design_links_resolve():
    texts = _tracked_text_files()
    assert "docs/design.md" in texts and "cli.py" in texts
    assert _outside_refs(texts) == []
    assert _broken_design_links(texts, texts["docs/design.md"]) == []
    assert DESIGN_LINK.search(texts["curate/ingest/sources.py"])  # the check has links to check


def test_the_checks_see_an_outside_reference_and_a_broken_link(tmp_path: Path):
    """The checks above can fail: a planted reference and a link to a missing heading are found."""
    planted = tmp_path / "planted.py"
    missing = "no-such-heading"  # a variable, so this file holds no broken link itself
    planted.write_text(f'"""The contracts: {OUTSIDE_REFS[0]}/DESIGN.md, see docs/design.md#{missing}."""\n')
    texts = {"curate/planted.py": planted.read_text(), "bench/reads_data.py": f"{OUTSIDE_REFS[0]}/data"}
    assert _outside_refs(texts) == [f"curate/planted.py: {OUTSIDE_REFS[0]}", f"curate/planted.py: {OUTSIDE_REFS[1]}"]
    design = "# Design\n## The sample key\n### Run folder: `--out` rules\n"
    assert _anchors(design) == {"design", "the-sample-key", "run-folder---out-rules"}
    assert _broken_design_links(texts, design) == [f"curate/planted.py: docs/design.md#{missing}"]
