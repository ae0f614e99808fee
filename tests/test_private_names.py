"""A `_name` is private to the module that defines it: no module, bench or test of ours reaches
into another's. What one module needs from another is public API, so it can be read, documented
and kept; the check reads the source (ast), nothing is imported."""
import ast
from pathlib import Path

from .conftest import ROOT

OURS = ("curate", "sparsevit", "cli", "tests", "bench")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _python_files(root: Path) -> list[Path]:
    folders = ("curate", "sparsevit", "bench", "tests")
    return [p for d in folders for p in sorted((root / d).rglob("*.py"))] + [root / "cli.py"]


def _private_defs(files: list[Path]) -> dict[str, set[Path]]:
    """Private functions, methods and classes by name, with the files that define them."""
    defs: dict[str, set[Path]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(node.name):
                defs.setdefault(node.name, set()).add(path)
    return defs


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _on_self(node: ast.Attribute) -> bool:
    """`self._x` or `cls._x`: the object's own member (`self.other._x` is not)."""
    return isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")


def reaches_into(path: Path, defs: dict[str, set[Path]]) -> list[str]:
    """Where `path` uses another module's private name: `from ours import _x`, `our_module._x`,
    or `obj._x` where `_x` is a private function or method defined only in other files."""
    tree = ast.parse(path.read_text(), str(path))
    modules: set[str] = set()  # names bound to our modules (or to names imported from them)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in OURS):
            modules |= {a.asname or a.name for a in node.names}
            found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            modules |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in OURS}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        root = _root_name(node.value)
        if root in modules:
            found.append(f"{path.name}:{node.lineno} uses {ast.unparse(node)}")
        elif not _on_self(node) and path not in defs.get(node.attr, {path}):
            found.append(f"{path.name}:{node.lineno} calls {ast.unparse(node)}, private to "
                         f"{sorted(p.name for p in defs[node.attr])}")
    return found


def test_no_module_uses_another_modules_private_names():
    files = _python_files(ROOT)
    defs = _private_defs(files)
    assert [hit for path in files for hit in reaches_into(path, defs)] == []


def test_the_check_finds_each_kind_of_reach(tmp_path: Path):
    """Planted: each way of reaching in is found; a module's own private names and other
    libraries' are not."""
    owner = tmp_path / "owner.py"
    owner.write_text("class A:\n    def _step(self):\n        return self._helper()\n\n"
                     "    def _helper(self):\n        return 1\n")
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom sparsevit.train import _build\nfrom sparsevit import data\n"
                   "import sparsevit.model as m\n\n"
                   "def f(a):\n    os._exit(0)\n    data._MEAN\n    m._check_supported(a)\n    return a._step()\n\n"
                   "class B:\n    def g(self):\n        return self.inner._helper()\n")
    defs = _private_defs([owner, bad])
    hits = reaches_into(bad, defs)
    assert sorted(h.split(" ", 1)[1].split(",")[0] for h in hits) == [
        "calls a._step", "calls self.inner._helper", "imports _build", "uses data._MEAN", "uses m._check_supported"]
    assert reaches_into(owner, defs) == []
