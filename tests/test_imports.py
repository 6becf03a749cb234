"""The package's import graph, read from the source (imports inside functions included): no circles, no private
name reached for across modules, and a function-level import only for an optional heavy dependency."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tlora_cli"
# What may be imported inside a function: dependencies that are heavy to import or optional, each for a reason.
LAZY = {
    "matplotlib": "optional (the plot extra), and slow to import",
    "peft": "optional (the peft extra): only the training helper and the trainer need it",
    "transformers": "about 2 s to import: `tlora --help`, `inspect` and `allocate` never need it",
    "datasets": "about 1 s to import, and only hub and folder data need it",
    "huggingface_hub": "only hub paths need it",
    "pyarrow": "optional: parquet files only",
    "jinja2": "only chat templates need it (through transformers)",
    "click": "Typer's vendored copy or click: which one is there is known only at run time",
    "typer": "Typer's vendored click, looked for at run time",
    "accelerate": "only the built-in model's GGUF conversion needs it",
    "gguf": "only the built-in model's GGUF conversion needs it",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module a `from ... import` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


class Imports(ast.NodeVisitor):
    """Every import of one module: (target module, names, line, inside a function)."""

    def __init__(self, module: str, is_package: bool, modules: set[str]):
        self.module, self.is_package, self.modules = module, is_package, modules
        self.found: list[tuple[str, list[str], int, bool]] = []
        self.depth = 0

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, [], node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        target = resolve(self.module, node, self.is_package)
        names = [a.name for a in node.names]
        # `from . import x` where x is a module: an import of that module
        submodules = [n for n in names if f"{target}.{n}" in self.modules]
        for n in submodules:
            self.found.append((f"{target}.{n}", [], node.lineno, self.depth > 0))
        rest = [n for n in names if n not in submodules]
        if rest or not submodules:
            self.found.append((target, rest, node.lineno, self.depth > 0))

    def visit_If(self, node: ast.If) -> None:
        """`if TYPE_CHECKING:` imports never run."""
        test = node.test
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)


def read_graph() -> dict[str, list[tuple[str, list[str], int, bool]]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        visitor = Imports(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        graph[name] = visitor.found
    return graph


def internal(target: str, modules: set[str]) -> str | None:
    """The package module an import reaches (a `pkg.mod.name` import counts as `pkg.mod`)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def edges(graph: dict) -> dict[str, set[str]]:
    """Module -> the package modules it imports; importing a.b.c also runs a and a.b (their __init__)."""
    modules = set(graph)
    out: dict[str, set[str]] = {m: set() for m in modules}
    for module, found in graph.items():
        for target, _, _, _ in found:
            hit = internal(target, modules)
            if hit is None or hit == module:
                continue
            out[module].add(hit)  # an explicit import, of a parent package too (data.show -> data)
            parts = hit.split(".")
            for i in range(1, len(parts)):  # the packages above it run first, unless they are this module's own
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != module and not module.startswith(prefix + "."):
                    out[module].add(prefix)
    return out


def cycles(out: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(out[v]):
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
            if len(component) > 1 or v in out[v]:
                found.append(sorted(component))

    for v in sorted(out):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circle():
    found = cycles(edges(read_graph()))
    assert not found, f"import circles: {found}"


# The data flow, in order: a module imports from its own layer or an earlier one, never from a later one.
LAYERS = (
    ("tlora_cli", "tlora_cli.errors", "tlora_cli.signals", "tlora_cli.jsonio", "tlora_cli.names", "tlora_cli.options"),
    ("tlora_cli.distributed", "tlora_cli.progress", "tlora_cli.recipe"),
    ("tlora_cli.model",),
    ("tlora_cli.data",),
    ("tlora_cli.calib",),
    ("tlora_cli.allocation", "tlora_cli.factorisation", "tlora_cli.directions", "tlora_cli.plan"),
    ("tlora_cli.train",),
    ("tlora_cli.methods",),
    ("tlora_cli.adapter",),
    ("tlora_cli.report",),
    ("tlora_cli.outputs",),
    ("tlora_cli.exports",),
    ("tlora_cli.training",),
    ("tlora_cli.pipeline",),
    ("tlora_cli.trial",),
    ("tlora_cli.flags", "tlora_cli.cli", "tlora_cli.__main__"),
)


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names the module or a package above it."""
    best, depth = None, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            below = module.startswith(prefix + ".") and prefix != "tlora_cli"  # the package itself: its __init__ only
            if (module == prefix or below) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def test_no_module_imports_from_a_later_stage_of_the_flow():
    graph = read_graph()
    out = edges(graph)
    bad = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module in sorted(out)
        for target in sorted(out[module])
        if layer_of(target) > layer_of(module)
    ]
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_across_modules():
    graph = read_graph()
    bad = [
        f"{module}:{line} imports {name} from {target}"
        for module, found in graph.items()
        for target, names, line, _ in found
        if target.startswith("tlora_cli")
        for name in names
        if name.startswith("_") and name != "__version__"
    ]
    assert not bad, "\n".join(bad)


def test_function_level_imports_are_only_of_optional_or_heavy_dependencies():
    graph = read_graph()
    bad = [
        f"{module}:{line} imports {target} inside a function"
        for module, found in graph.items()
        for target, _, line, lazy in found
        if lazy and target.split(".")[0] not in LAZY
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("sources", "circle"),
    [
        ({"a": "from . import b\n", "b": "def f():\n    from .a import x\n"}, ["p.a", "p.b"]),
        ({"a": "from .b import y\n", "b": "from .c import z\n", "c": "import p.a\n"}, ["p.a", "p.b", "p.c"]),
        ({"a": "from .b import y\n", "b": "x = 1\n"}, None),
        ({"__init__": "from .a import f\n", "a": "def f():\n    from . import g\n"}, ["p", "p.a"]),
    ],
)
def test_the_circle_finder_sees_circles_through_function_level_imports(tmp_path, monkeypatch, sources, circle):
    """The checks above would pass on anything if the graph reader missed imports: it must find these."""
    package = tmp_path / "p"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in sources.items():
        (package / f"{name}.py").write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    found = cycles(edges(read_graph()))
    assert found == ([circle] if circle else [])
