"""Layering of the package, read from the source with ``ast`` (nothing is imported):

- the toolkit never imports the bundled shapes world: no module outside ``negprompt/shapes`` imports
  ``negprompt.shapes``, at module level or inside a function (the world plugs in through entry
  points instead, see ``pyproject.toml``);
- no import cycle between negprompt's modules, counting imports inside functions too (imports under
  ``if TYPE_CHECKING:`` are for annotations only, never run, and are not counted).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "negprompt"
WORLD = "negprompt.shapes"
DYNAMIC_IMPORTS = {"import_module", "__import__"}  # importlib.import_module("…"), __import__("…")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Module name → file, for every ``.py`` file of the package (bundled assets hold none)."""
    return {module_name(path, package.parent): path for path in sorted(package.rglob("*.py"))}


def imported_names(path: Path, name: str, modules: set[str]) -> set[str]:
    """Every negprompt module ``path`` imports, anywhere in the file (also inside functions).

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``;
    relative imports are resolved against ``name``; ``import_module("a.b")`` with a literal counts too.
    """
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    annotation_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for statement in node.body
        for inner in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if id(node) in annotation_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in DYNAMIC_IMPORTS and node.args and isinstance(node.args[0], ast.Constant):
                if isinstance(node.args[0].value, str):
                    found.add(node.args[0].value)
    return {target for target in found if target == "negprompt" or target.startswith("negprompt.")}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the negprompt modules it imports (names that are not modules map to their package)."""
    files = source_files(package)
    modules = set(files)
    graph = {}
    for name, path in files.items():
        targets = set()
        for target in imported_names(path, name, modules):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]  # an attribute or a missing module: its package
            if target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def toolkit_imports_of_the_world(graph: dict[str, set[str]]) -> list[str]:
    inside = lambda module: module == WORLD or module.startswith(WORLD + ".")  # noqa: E731
    return sorted(f"{m} imports {t}" for m, targets in graph.items() if not inside(m) for t in targets if inside(t))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_toolkit_never_imports_the_shapes_world():
    graph = import_graph()
    assert WORLD in graph, "negprompt/shapes is missing"
    assert toolkit_imports_of_the_world(graph) == []


def test_no_import_cycles_between_negprompt_modules():
    assert cycles(import_graph()) == []


# ---------------------------------------------------------------- the checks can fail


def write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "negprompt"


@pytest.mark.parametrize(
    "source",
    [
        "from negprompt.shapes.scene import IMAGE_SIZE\n",
        "def f():\n    from negprompt.shapes import detectors\n",
        "import negprompt.shapes.model as model\n",
        "from negprompt import shapes\n",
        "from ..shapes import scene\n",
        "import importlib\ndef f():\n    return importlib.import_module('negprompt.shapes.regions')\n",
    ],
)
def test_a_toolkit_module_importing_the_world_is_found(tmp_path, source):
    package = write_package(
        tmp_path,
        {
            "negprompt/__init__.py": "",
            "negprompt/analysis/__init__.py": "",
            "negprompt/analysis/edit.py": source,
            "negprompt/shapes/__init__.py": "",
            "negprompt/shapes/scene.py": "IMAGE_SIZE = 32\n",
            "negprompt/shapes/detectors.py": "from negprompt.shapes.scene import IMAGE_SIZE\n",
        },
    )
    assert toolkit_imports_of_the_world(import_graph(package))[0].startswith("negprompt.analysis.edit imports ")


def test_an_import_cycle_is_found_also_through_a_function(tmp_path):
    package = write_package(
        tmp_path,
        {
            "negprompt/__init__.py": "",
            "negprompt/a.py": "from negprompt.b import x\n",
            "negprompt/b.py": "x = 1\ndef f():\n    from negprompt import c\n",
            "negprompt/c.py": "import negprompt.a\n",
            "negprompt/d.py": "import negprompt.a\n",
        },
    )
    assert cycles(import_graph(package)) == [["negprompt.a", "negprompt.b", "negprompt.c"]]


@pytest.mark.parametrize("masked", [False, True])
def test_attention_over_split_keys_merged_by_logsumexp_equals_attention_over_all(masked):
    """merge_attention of attention_and_logsumexp over [text; image] parts = softmax over all keys (NAG on joint
    layers attends to the image keys once and merges each text's part); a fully masked part weighs 0."""
    import torch
    import torch.nn.functional as F

    from negprompt.layers.attention import attention_and_logsumexp, merge_attention

    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 20, 8, generator=g)
    text = torch.randn(2, 3, 7, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    image = torch.randn(2, 3, 20, 8, generator=g), torch.randn(2, 3, 20, 8, generator=g)
    bias = None
    if masked:  # row 0 keeps 3 text keys, row 1 none
        bias = torch.zeros(2, 1, 1, 7)
        bias[0, ..., 3:] = float("-inf")
        bias[1] = float("-inf")
    merged = merge_attention([attention_and_logsumexp(query, *text, bias), attention_and_logsumexp(query, *image)])
    full_bias = None if bias is None else torch.cat([bias, torch.zeros(2, 1, 1, 20)], dim=-1)
    keys, values = torch.cat([text[0], image[0]], dim=2), torch.cat([text[1], image[1]], dim=2)
    direct = F.scaled_dot_product_attention(query, keys, values, attn_mask=full_bias)
    assert torch.isfinite(merged).all()
    assert torch.allclose(merged, direct, atol=1e-5), float((merged - direct).abs().max())
