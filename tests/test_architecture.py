"""docs/architecture.md's rules, checked on the source: imports go downwards, no private cross-module imports."""
import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "slaknet"

# package -> the slaknet packages it may import (docs/architecture.md, "Packages, bottom to top")
BASE = {"errors", "io", "lazy", "settings"}
ALLOWED = {
    "errors": set(), "io": {"errors"}, "lazy": set(), "settings": {"errors"},
    "checkpoints": BASE,
    "layers": BASE,
    "data": BASE,
    "models": BASE | {"layers", "checkpoints", "(root)"},
    "analysis": BASE | {"models", "checkpoints", "data", "layers", "(root)"},
    "sparse": BASE | {"layers", "checkpoints", "analysis"},
    "deploy": BASE | {"models", "layers", "checkpoints", "data", "(root)"},
    "train": BASE | {"models", "sparse", "analysis", "data", "checkpoints", "layers", "(root)"},
    "classify": BASE | {"train", "deploy", "models", "sparse", "analysis", "data", "checkpoints", "layers", "(root)"},
    "study": BASE | {"train", "models", "sparse", "analysis", "data", "checkpoints", "layers", "(root)"},
    "distill": BASE | {"classify", "train", "models", "sparse", "analysis", "data", "checkpoints", "layers", "(root)"},
    "segment": BASE | {"train", "models", "sparse", "analysis", "data", "checkpoints", "layers", "deploy", "(root)"},
    "detect": BASE | {"train", "models", "deploy", "sparse", "analysis", "data", "checkpoints", "layers", "(root)"},
}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        yield path, (rel.parts[0] if len(rel.parts) > 1 else rel.stem)


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "slaknet":
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "slaknet":
                    yield a.name, []


def _target(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def test_imports_go_downwards():
    bad = []
    for path, pkg in _modules():
        if pkg not in ALLOWED:
            continue  # cli, bench, __init__, __main__: top level, may import anything
        for module, _ in _imports(path):
            dst = _target(module)
            if dst != pkg and dst not in ALLOWED[pkg]:
                bad.append(f"{path.relative_to(SRC)} imports {module}")
    assert not bad, "\n".join(bad)


def test_no_private_cross_module_imports():
    bad = []
    for path, _ in _modules():
        here = ".".join(("slaknet",) + path.relative_to(SRC).with_suffix("").parts)
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and module != here:
                bad.append(f"{path.relative_to(SRC)}: from {module} import {', '.join(private)}")
    assert not bad, "\n".join(bad)
