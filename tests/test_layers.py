"""The package's layers, read from its source with ``ast``: imports only go down, no module imports itself
back through others, only orchestration talks to Ray, and only the entry points and the config to Hydra.

Every module of ``pipeline/`` must be placed in :data:`LAYERS`; a new module fails here until it is."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

NUMERICS, CURVATURE, SCIENCE, ORCHESTRATION = 0, 1, 2, 3
LAYER_NAMES = {NUMERICS: "numerics", CURVATURE: "problem and curvature", SCIENCE: "landscape science",
               ORCHESTRATION: "orchestration and results"}
LAYERS = {
    # numerics: pure functions over matrices or matvecs
    "lanczos": NUMERICS, "chebyshev": NUMERICS, "block_ldl": NUMERICS, "cusolver": NUMERICS, "symmetric": NUMERICS,
    # problem and curvature: data, models, the loss of flat θ, HVPs, the Hessian, counting, the spectrum
    "data": CURVATURE, "models": CURVATURE, "problem": CURVATURE, "hvp": CURVATURE, "mlp_hessian": CURVATURE,
    "hessian_build": CURVATURE, "hessian_memory": CURVATURE, "hessian": CURVATURE, "inertia": CURVATURE,
    "estimate": CURVATURE, "spectrum": CURVATURE,
    # landscape science: stalls, critical-point labels, refinement, fits
    "stall": SCIENCE, "critical": SCIENCE, "refine": SCIENCE, "refine_result": SCIENCE, "newton_eig": SCIENCE, "fits": SCIENCE,
    # orchestration and results: config to Ray tasks to tables and figures
    "config": ORCHESTRATION, "plan": ORCHESTRATION, "train": ORCHESTRATION, "jobs": ORCHESTRATION,
    "sweep": ORCHESTRATION, "shards": ORCHESTRATION, "progress": ORCHESTRATION, "storage": ORCHESTRATION,
    "tables": ORCHESTRATION, "rows": ORCHESTRATION, "identity": ORCHESTRATION, "verify": ORCHESTRATION, "analysis": ORCHESTRATION, "cli": ORCHESTRATION,
    "__main__": ORCHESTRATION, "__init__": ORCHESTRATION,
}
HYDRA_MODULES = {"cli", "config"}


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """The package modules and the top-level third-party packages ``path`` imports (at any depth: a
    function-level import is an import too)."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pipeline."):
                    ours.add(alias.name.split(".")[1])
                else:
                    theirs.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "pipeline":
                ours.update(alias.name for alias in node.names)
            elif node.module.startswith("pipeline."):
                ours.add(node.module.split(".")[1])
            else:
                theirs.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path.name}: relative import; write `from pipeline.x import y`")
    return ours - {"conf"}, theirs


GRAPH = {name: _imports(path) for name, path in _modules().items()}


def test_every_module_has_a_layer():
    unplaced = sorted(set(GRAPH) - set(LAYERS))
    assert not unplaced, (f"module(s) {unplaced} have no layer: add each to LAYERS in tests/test_layers.py as "
                          "NUMERICS, CURVATURE (problem and curvature), SCIENCE (landscape science) or "
                          "ORCHESTRATION (orchestration and results)")
    assert not set(LAYERS) - set(GRAPH), f"LAYERS names modules that do not exist: {sorted(set(LAYERS) - set(GRAPH))}"


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
