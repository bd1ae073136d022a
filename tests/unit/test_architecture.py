"""The shape of the code: no import cycles, the detector free of the platform, a light `--help`, short files."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"retinanet": REPO / "retinanet", "retinaops": REPO / "platform" / "retinaops"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of both packages (a package is its __init__.py)."""
    found = {}
    for name, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = [name, *path.relative_to(root).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The modules of `known` that `module` imports anywhere in its file, functions included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..a import b
                base = ".".join([package.rsplit(".", node.level - 1)[0], *([base] if base else [])])
            # `from pkg import mod` imports the module; `from pkg import name` what pkg/__init__ defines
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from a.b import f`: the module is a.b
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imports(p, m, set(found)) for m, p in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions_and_from_imports():
    edges = graph()
    assert "retinaops.run.sweep" in edges["retinaops.cli.sweep"]  # imported inside cmd_sweep
    assert "retinaops.job.spec" in edges["retinaops.job.resolved"]


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_detector_never_imports_the_platform():
    edges = graph()
    assert not [
        (m, d)
        for m, deps in edges.items()
        if m.startswith("retinanet")
        for d in deps
        if d.startswith("retinaops")
    ]
    for path in PACKAGES["retinanet"].rglob("*.py"):
        tops = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                tops.add(node.module.split(".")[0])
        assert not tops & {"ray", "mlflow", "boto3", "pyarrow", "retinaops"}, path


def test_every_sub_package_says_what_it_owns_in_its_first_line():
    for init in sorted(PACKAGES["retinaops"].glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and doc.splitlines()[0].endswith("."), init


def test_help_imports_neither_ray_nor_mlflow_nor_torch():
    code = (
        "import sys\n"
        "from retinaops.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'torch', 'pyarrow'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("folder", ["retinanet", "platform", "benchmarks", "tests", "jobs"])
def test_no_python_file_is_over_400_lines(folder):
    long = {
        str(p.relative_to(REPO)): n
        for p in (REPO / folder).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


# Sub-packages in layers: each imports only the layers below it; the top-level modules (retry, storage,
# ...) import no sub-package.
LAYERS = {"cli": 0, "run": 1, "tracking": 2, "cluster": 2, "job": 3}


def test_sub_packages_import_downwards_only():
    def layer(module: str) -> int | None:
        parts = module.split(".")
        if parts[0] != "retinaops" or len(parts) < 2:
            return None
        return LAYERS.get(parts[1], 4)  # a top-level module: the bottom

    upward = [
        (m, d)
        for m, deps in graph().items()
        for d in deps
        if layer(m) is not None
        and layer(d) is not None
        and layer(d) <= layer(m) < 4
        and m.split(".")[1] != d.split(".")[1]
    ]
    assert upward == []
