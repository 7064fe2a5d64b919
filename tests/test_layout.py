"""The package layout stays as README's "Layout" section describes it.

Imports are read from the source (every ``import`` statement, deferred ones inside functions
included), so a circle that only forms at call time is caught too.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("moe_dispatch", "token_dispatcher")
CORE = ("moe_dispatch.routing", "moe_dispatch.permute", "moe_dispatch.protocol",
        "moe_dispatch.registry", "moe_dispatch.comm", "moe_dispatch.auto",
        "moe_dispatch.testing", "moe_dispatch.kernels")


def _modules() -> dict:
    """module name -> path, for every module of the two packages."""
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def _targets(mod: str, path: Path, node, mods: dict) -> list:
    """The project modules one import statement names (the longest known prefix)."""
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            up = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
            base = ".".join(up + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for name in names:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        if name:
            out.append(name)
    return out


def import_graph() -> dict:
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[mod].update(t for t in _targets(mod, path, node, mods) if t != mod)
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
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


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_never_imports_a_backend():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith(CORE):
            bad = [d for d in deps if d.startswith("moe_dispatch.backends")]
            assert not bad, f"{mod} imports backend modules {bad}"


def test_core_root_has_at_most_nine_modules():
    root = sorted(p.name for p in (ROOT / "moe_dispatch").glob("*.py"))
    assert len(root) <= 9, root


def test_multi_file_backends_have_folders():
    backends = ROOT / "moe_dispatch" / "backends"
    for name in ("deepep", "hybridep", "nvshmem"):
        assert (backends / name / "__init__.py").is_file(), name
        assert not (backends / f"{name}.py").exists(), name
