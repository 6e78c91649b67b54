"""The package's import layers, read from the source: benchmarks, the probe and the demo sit beside
training, not above it, and the demo never imports the CLI that imports it."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mirror_rt"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions (absolute names)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_only_training_imports_training_code():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("train/"):
            continue
        if any(m == "mirror_rt.train" or m.startswith("mirror_rt.train.") for m in imported_modules(path)):
            offenders.append(rel)
    assert offenders == []


def test_the_demo_does_not_import_the_cli():
    assert not any(m.startswith("mirror_rt.cli") for m in imported_modules(PKG / "demo.py"))


def test_the_walker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from mirror_rt.train import data\n    import mirror_rt.cli\n")
    assert {"mirror_rt.train", "mirror_rt.train.data", "mirror_rt.cli"} <= imported_modules(f)
