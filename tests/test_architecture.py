"""ARCHITECTURE.md's promises, checked: no module over 500 lines, no function over 80, lower layers never import
higher ones, nothing imports the CLI, and `meshprobe --help` loads no torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "meshprobe"

# Bottom to top; a module may import from its own layer or a lower one (ARCHITECTURE.md, "The modules").
LAYERS = [
    {"meshprobe", "errors", "checks", "_io", "runtime", "config", "hooks", "loss", "tl", "data"},
    {"mesh", "model"},
    {"checkpoint"},
    {"evaluate", "training", "hf"},
    {"dynamics"},
    {"analysis"},
    {"features"},
    {"paper"},
    {"cli", "__main__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def unit(path: Path) -> str:
    """The layer unit of a file: its top-level module or subpackage under meshprobe/."""
    rel = path.relative_to(PKG).with_suffix("").parts
    return "meshprobe" if rel == ("__init__",) else rel[0]


def imported_units(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "meshprobe":
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
            for name in names:
                yield name, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "meshprobe":
                    yield (parts[1] if len(parts) > 1 else "meshprobe"), node.lineno


def in_type_checking(tree: ast.AST) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:` (the root's editor hints; never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for sub in ast.walk(node):
                if hasattr(sub, "lineno"):
                    lines.add(sub.lineno)
    return lines


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_module_and_function_sizes(path):
    source = path.read_text()
    assert source.count("\n") <= 500, f"{path.name} has {source.count(chr(10))} lines: split it"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 80, f"{path.name}:{node.lineno} {node.name} has {length} lines: split it"


def test_every_unit_has_a_layer():
    units = {unit(p) for p in modules()}
    assert units <= set(LEVEL), f"add {sorted(units - set(LEVEL))} to LAYERS (and to ARCHITECTURE.md)"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_upward_imports(path):
    me = unit(path)
    tree = ast.parse(path.read_text())
    hints = in_type_checking(tree)
    for name, line in imported_units(tree):
        if line in hints or name not in LEVEL:
            continue
        assert LEVEL[name] <= LEVEL[me], f"{path.relative_to(PKG)}:{line} imports meshprobe.{name} (a higher layer)"


# The analysis pipeline, bottom to top (ARCHITECTURE.md): a module imports only the ones before it, lazily or not,
# so following a model from mp.analyze or the CLI never climbs back up.
PIPELINE = [
    "schema", "collect", "analyzer", "texts", "tokens", "outputs", "analyze", "dynamics", "checkpoints", "hf_dirs"]


def test_pipeline_imports_one_way():
    folder = PKG / "analysis" / "pipeline"
    assert {p.stem for p in folder.glob("*.py")} - {"__init__"} == set(PIPELINE), "add the module to PIPELINE"
    for i, name in enumerate(PIPELINE):
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("meshprobe.analysis.pipeline"):
                parts = node.module.split(".")
                targets = parts[3:4] or [a.name for a in node.names]
                for t in targets:
                    assert PIPELINE.index(t) < i, f"pipeline/{name}.py:{node.lineno} imports pipeline.{t}"


def test_help_loads_no_torch():
    code = "import sys; from meshprobe.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
