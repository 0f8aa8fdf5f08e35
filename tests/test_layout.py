"""The package's layout, checked from its imports (ast, every import including those inside
functions; `if TYPE_CHECKING:` blocks excluded): the core never imports a study, nothing imports
upward, and there are no cycles between units.

A unit is a root module (`nn`), a subpackage (`algorithms`, `kv`), or one module of `studies/`
or `viz/` (`studies.deploy`). A new module fails test_every_unit_has_a_floor until it is given
a floor in FLOORS below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "quantlab"

# Lowest first. A unit may import units on its own floor or below, never above.
FLOORS = [
    {"formats", "granularity", "layers"},
    {"scales"},
    {"schemes"},
    {"quantize", "quantlab"},  # quantlab: the package's __init__ (formats, quantize, schemes)
    {"packing", "kernels"},
    {"nn"},
    {"algorithms", "kv"},
    {"eval"},  # eval.lm.layer_errors captures layer inputs (algorithms) through QuantLinear
    {"models", "report"},
    {"io", "compare", "sequential", "throughput"},  # io/audit prints with report.format_table;
    # io/cli loads models; sequential (the layer-by-layer exporter) writes through io;
    # throughput (the decode benchmark) runs nn's QuantLinear and kv's attention
    {"studies", "studies.outliers", "studies.calibrated", "studies.fp8", "studies.kv",
     "studies.deploy"},
    {"viz", "viz.book", "viz.compare", "viz.formats", "viz.schemes", "viz.outliers",
     "viz.calibrated", "viz.fp8", "viz.kv", "viz.kernels", "viz.deploy"},
    {"widgets", "cli", "io.cli"},
]
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}

# Modules outside studies/, viz/ and widgets/ allowed to import a study, with the reason.
# Empty: no job needs one (the CLI's export and audit use quantlab.io, not studies.deploy).
STUDY_IMPORT_EXCEPTIONS: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """quantlab.kv.cache -> kv; quantlab.studies.kv -> studies.kv; quantlab -> quantlab;
    quantlab.io.cli -> io.cli (the export/audit commands: a job above io, like cli)."""
    parts = module.split(".")[1:]
    if not parts:
        return "quantlab"
    if parts[0] in ("studies", "viz") and len(parts) > 1 or parts[:2] == ["io", "cli"]:
        return ".".join(parts[:2])
    return parts[0]


def _is_module(dotted: str) -> bool:
    p = PKG.parent.joinpath(*dotted.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(path: Path) -> set[str]:
    """Every quantlab module `path` imports: `from quantlab import kv` gives quantlab.kv,
    `from quantlab import quantize` the module quantlab.quantize, `from quantlab import PRESETS`
    the package quantlab itself."""
    name, tree = _module_name(path), ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip, found = _type_checking_nodes(tree), set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base)
    return {m for m in found if m == "quantlab" or m.startswith("quantlab.")}


MODULES = sorted(PKG.rglob("*.py"))
GRAPH = {p: imports_of(p) for p in MODULES}


def _rel(p: Path) -> str:
    return str(p.relative_to(PKG.parent))


def test_every_unit_has_a_floor():
    missing = sorted({_unit(_module_name(p)) for p in MODULES} - set(FLOOR))
    assert not missing, f"give {missing} a floor in tests/test_layout.py FLOORS (lowest first)"


def test_the_core_and_the_jobs_never_import_a_study():
    bad = []
    for p, mods in GRAPH.items():
        rel = _rel(p)
        if rel.startswith(("quantlab/studies/", "quantlab/viz/", "quantlab/widgets/")):
            continue
        bad += [f"{rel} imports {m}" for m in sorted(mods)
                if _unit(m).startswith("studies") and rel not in STUDY_IMPORT_EXCEPTIONS]
    assert not bad, "studies sit above the core and the jobs; move what they need down:\n" + \
        "\n".join(bad)


def test_studies_import_no_job_and_no_figure():
    bad = [f"{_rel(p)} imports {m}" for p, mods in GRAPH.items()
           if _module_name(p).startswith("quantlab.studies") for m in sorted(mods)
           if _unit(m) in ("cli", "compare", "widgets") or _unit(m).startswith("viz")]
    assert not bad, "\n".join(bad)


def test_no_module_imports_upward():
    bad = []
    for p, mods in GRAPH.items():
        me = _unit(_module_name(p))
        for m in sorted(mods):
            them = _unit(m)
            if me in FLOOR and them in FLOOR and FLOOR[them] > FLOOR[me]:
                bad.append(f"{_rel(p)} (floor {FLOOR[me]}) imports {m} (floor {FLOOR[them]})")
    assert not bad, "\n".join(bad)


def test_no_cycles_between_units():
    edges: dict[str, set[str]] = {}
    for p, mods in GRAPH.items():
        me = _unit(_module_name(p))
        edges.setdefault(me, set()).update(_unit(m) for m in mods if _unit(m) != me)
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(u, path):
        state[u] = 1
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(v):] + [v]))
            if v not in state:
                visit(v, path + [v])
        state[u] = 2

    for u in sorted(edges):
        if u not in state:
            visit(u, [u])


def test_studies_are_named_as_their_figures():
    studies = {p.stem for p in (PKG / "studies").glob("*.py") if p.stem != "__init__"}
    figures = {p.stem for p in (PKG / "viz").glob("*.py")}
    assert studies <= figures, f"studies without a viz module of the same name: {studies - figures}"
