"""The package's layers, read from its source with ``ast``: each layer is a folder of ``pipeline/``
(numerics, curvature, landscape, orchestration), imports only go down, no module imports itself back
through others, only orchestration talks to Ray, and only the entry points and the config to Hydra.

Every module lives in a layer's folder; only ``__init__`` and ``__main__`` sit at the top."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

NUMERICS, CURVATURE, SCIENCE, ORCHESTRATION = 0, 1, 2, 3
LAYER_NAMES = {NUMERICS: "numerics", CURVATURE: "problem and curvature", SCIENCE: "landscape science",
               ORCHESTRATION: "orchestration and results"}
FOLDERS = {"numerics": NUMERICS, "curvature": CURVATURE, "landscape": SCIENCE, "orchestration": ORCHESTRATION}
TOP = {"__init__", "__main__"}  # the package's re-exports and ``python -m pipeline``: above every layer
HYDRA_MODULES = {"cli", "config"}


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.rglob("*.py")) if p.stem != "__init__" or p.parent == PACKAGE}


def _layer_of(path: Path) -> int:
    return ORCHESTRATION if path.parent == PACKAGE else FOLDERS.get(path.parent.name, -1)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """The package modules and the top-level third-party packages ``path`` imports (at any depth: a
    function-level import is an import too)."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pipeline."):
                    ours.add(alias.name.split(".")[-1])
                else:
                    theirs.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "pipeline":
                theirs.add(parts[0])
            elif len(parts) == 1 or (len(parts) == 2 and parts[1] in FOLDERS):
                ours.update(alias.name for alias in node.names)  # from pipeline[.layer] import module
            else:
                ours.add(parts[-1])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path.name}: relative import; write `from pipeline.layer.x import y`")
    return ours - {"conf"}, theirs


MODULES = _modules()
LAYERS = {name: _layer_of(path) for name, path in MODULES.items()}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_every_module_sits_in_a_layer_folder():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.stem not in TOP)
    assert not loose, (f"module(s) {loose} sit at the top of pipeline/: move each into numerics/, curvature/ "
                       "(problem and curvature), landscape/ (landscape science) or orchestration/")
    strays = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                    if p.parent != PACKAGE and p.parent.name not in FOLDERS)
    assert not strays, f"{strays} are in no layer's folder ({', '.join(FOLDERS)})"
    names = [p.stem for p in PACKAGE.rglob("*.py") if p.stem != "__init__"]
    assert len(names) == len(set(names)), "two modules share a name across layers"
    for folder in FOLDERS:
        assert (PACKAGE / folder / "__init__.py").exists(), f"pipeline/{folder}/ has no __init__.py"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_go_down(module):
    up = sorted(m for m in GRAPH[module][0] if LAYERS.get(m, -1) > LAYERS.get(module, ORCHESTRATION))
    assert not up, (f"pipeline.{module} ({LAYER_NAMES[LAYERS[module]]}) imports {up} from a higher layer: "
                    f"{', '.join(f'{m} is {LAYER_NAMES[LAYERS[m]]}' for m in up)}")


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH[m][0]):
            if n not in GRAPH:
                continue
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_only_orchestration_imports_ray():
    bad = sorted(m for m, (_, theirs) in GRAPH.items() if "ray" in theirs and LAYERS.get(m) != ORCHESTRATION)
    assert not bad, f"only orchestration modules may import ray; these do: {bad}"


def test_only_the_entry_points_and_the_config_import_hydra():
    bad = sorted(m for m, (_, theirs) in GRAPH.items() if "hydra" in theirs and m not in HYDRA_MODULES)
    assert not bad, f"only {sorted(HYDRA_MODULES)} may import hydra; these do: {bad}"


def test_the_walk_sees_real_imports():
    """The walk itself: known edges are found, function-level imports included (so the test can fail)."""
    assert "hvp" in GRAPH["hessian"][0] and "estimate" in GRAPH["hessian"][0]  # the latter inside a function
    assert "ray" in GRAPH["sweep"][1] and "hydra" in GRAPH["cli"][1]


def test_the_readme_layout_table_matches_the_tree():
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    rows = re.findall(r"^\| `pipeline/(\w+)/`[^|]*\| ([\w, ]+) \|$", readme, re.M)
    table = {folder: sorted(m.strip() for m in mods.split(",")) for folder, mods in rows}
    tree = {folder: sorted(p.stem for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__")
            for folder in FOLDERS}
    assert table == tree, "README's Code layout table and pipeline/'s folders differ"


def test_the_package_re_exports_its_public_api():
    import pipeline

    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name
    assert pipeline.spectrum_at.__module__ == "pipeline.curvature.hessian"
    with pytest.raises(AttributeError):
        pipeline.no_such_name  # noqa: B018


# A function whose code (its docstring aside) runs past this many lines says in its docstring why it stays
# in one piece: "in one piece", "in one loop" or "on purpose" (house rule: functions ≤ ~60 lines).
LONG_LINES = 60
LONG_REASON = ("in one piece", "in one loop", "on purpose")


def _long_functions(tree: ast.AST) -> list[tuple[str, int, str]]:
    """``(name, code lines, docstring)`` of each function in ``tree`` whose body after its docstring spans
    more than :data:`LONG_LINES` lines."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node) or ""
            body = node.body[1:] if doc and len(node.body) > 1 else node.body
            lines = node.end_lineno - body[0].lineno + 1
            if lines > LONG_LINES:
                out.append((node.name, lines, " ".join(doc.split())))
    return out


def test_long_functions_say_why_they_stay_in_one_piece():
    unexplained = [f"{path.relative_to(PACKAGE.parent)}:{name} ({lines} lines)"
                   for path in MODULES.values() for name, lines, doc in _long_functions(ast.parse(path.read_text()))
                   if not any(reason in doc for reason in LONG_REASON)]
    assert not unexplained, f"functions over {LONG_LINES} lines without a reason in their docstring: {unexplained}"


def test_the_long_function_check_measures_code_not_docstrings():
    code = lambda n, doc: f'def f():\n    """{doc}"""\n' + "    x = 1\n" * n  # noqa: E731
    assert _long_functions(ast.parse(code(LONG_LINES, "short"))) == []
    ((name, lines, doc),) = _long_functions(ast.parse(code(LONG_LINES + 1, "kept in one piece on purpose")))
    assert (name, lines) == ("f", LONG_LINES + 1) and "on purpose" in doc
