"""The package's shape: folders in the order a user works, and no module importing one above it."""
import ast
from pathlib import Path

import sdwork

PACKAGE = Path(sdwork.__file__).parent
# bottom to top; a module may import its own layer and the ones below it
LAYERS = [
    ("base", ["sdwork.errors", "sdwork.paths", "sdwork.io", "sdwork.hooks", "sdwork.validate", "sdwork.quiet"]),
    ("tiny", ["sdwork.tiny.dataset", "sdwork.tiny.models", "sdwork.tiny.tokenizer", "sdwork.tiny.judge",
              "sdwork.tiny.train", "sdwork.tiny"]),
    ("load", ["sdwork.load", "sdwork.weights"]),
    ("generate", ["sdwork.generate"]),
    ("coreml", ["sdwork.coreml"]),
    ("convert", ["sdwork.convert"]),
    ("compress", ["sdwork.compress"]),
    ("evaluate", ["sdwork.evaluate", "sdwork.tiny.quality"]),
    ("experiments", ["sdwork.experiments"]),
    ("report", ["sdwork.report"]),
    ("bundle", ["sdwork.bundle"]),
    ("top", ["sdwork.cli", "sdwork"]),
]


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every sdwork module a file imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sdwork")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdwork"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            # "from sdwork.compress import kmeans1d" imports the module sdwork.compress.kmeans1d
            out |= {n if (PACKAGE.parent / (n.replace(".", "/") + ".py")).exists() else node.module for n in names}
    return out


def test_no_module_imports_a_layer_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        if me == "sdwork":
            continue  # the package's front door re-exports from every layer
        for other in imports(path):
            if other != "sdwork" and layer_of(other) > layer_of(me):
                upward.append(f"{me} ({LAYERS[layer_of(me)][0]}) imports {other} ({LAYERS[layer_of(other)][0]})")
    assert not upward, "imports pointing upwards:\n" + "\n".join(upward)


def test_the_walk_sees_nested_and_aliased_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from sdwork.experiments import experiment\n    import sdwork.report.plots as p\n")
    assert imports(f) == {"sdwork.experiments.experiment", "sdwork.report.plots"}
    assert layer_of("sdwork.report.plots") > layer_of("sdwork.experiments.experiment") > layer_of("sdwork.load")


def test_the_front_door_has_what_a_notebook_needs():
    for name in ("Experiment", "GenSettings", "Recipe", "load_pipeline", "convert_pipeline", "SdworkError"):
        assert hasattr(sdwork, name), name


def test_no_front_door_name_hides_a_module():
    """`import sdwork.generate as g` must give the module: an exported function of the same name
    would take its place as the package attribute."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    assert not modules & set(sdwork.__all__)
