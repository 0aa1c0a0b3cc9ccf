"""The package's layering, read off the source with ast: no import circle, and the zoo's float models import nothing of
the engine (they are plain torch; `qnn.models.registry` quantizes them).

Every import counts, at the top of a file or inside a function: a deferred import still ties the two modules together.
"""

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the library folders of the one `qnn` namespace (pyproject's package-dir): a circle may pass through any of them
PACKAGES = {"qnn": ROOT / "qnn", "qnn.kernels": ROOT / "kernels", "qnn.export": ROOT / "export"}
ZOO = {f"qnn.models.{n}" for n in ("resnet", "mobilenetv2", "mobilenetv3", "efficientnet", "squeezenet", "vgg")}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = (pkg, *f.relative_to(folder).with_suffix("").parts)
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The modules of `mods` that module `name` imports: `from a import b` is module a.b where that is one, else a;
    a name below a module (a.b.c, c not a module) is a.b. The bare package `qnn` (its version, lazy attributes) is
    left out: every module sits below it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in mods:
                n = n.rpartition(".")[0]
            if n and n not in ("qnn", name):
                found.add(n)
    return found


@functools.cache  # read once for both tests
def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_circles_are_found():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _circles(g) == [["a", "b", "c"]]


def test_no_import_circle():
    graph = _graph()
    circles = _circles(graph)
    assert not circles, "; ".join(
        f"{len(c)} modules import each other: " + ", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c)
        for c in circles)


def test_zoo_models_are_plain_float_definitions():
    graph = _graph()
    assert ZOO <= set(graph)
    for m in sorted(ZOO):
        extra = graph[m] - ZOO - {"qnn.models.zoo"}
        assert not extra, f"{m} imports {sorted(extra)}: a zoo model takes from qnn only qnn.models.zoo and zoo files"
    assert graph["qnn.models.zoo"] == set()  # the registration list imports nothing of qnn either


def _names_imported(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return out


def test_the_product_does_not_import_bench():
    """bench/ holds benchmark programs; what the library, the exporter and the kernels need lives among them."""
    bad = {str(p.relative_to(ROOT)): sorted(n for n in _names_imported(p) if n.split(".")[:2] == ["qnn", "bench"]
                                            or n.split(".")[0] == "bench")
           for folder in PACKAGES.values() for p in folder.rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_the_bench_launcher_of_the_edge_runner_imports_the_standard_library_only():
    import sys

    assert _names_imported(ROOT / "bench" / "run_edge.py") <= set(sys.stdlib_module_names)
