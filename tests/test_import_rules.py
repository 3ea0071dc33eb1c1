"""Who may turn recipes and "a.b=c" strings into configs: what import-linter cannot say (it
sees modules, not names), checked on the source. Library code passes typed configs
(``cfg.model_copy(update=...)``); strings stay at the edge."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "firmad"

# The loaders of firmad.config that read recipes or apply "section.key=value" overrides.
LOADERS = {"load_config", "apply_overrides", "read_recipe", "backbone_overrides"}

# Module (or package) relative to src/firmad -> why it may load recipes.
ALLOWED = {
    "config.py": "defines them",
    "cli": "the command line: --config and --set",
    "engine.py": "OneClassDetector's recipe= and overrides= parameters (its API edge)",
    "pipeline.py": "resuming a run: its recipe and the command line's --set",
    "bench/grid.py": "a grid file names recipes and their set: lists (recipe loading)",
    "robustness/study": "a study file names a recipe and its set: lists (recipe loading)",
}


def _allowed(rel: Path) -> bool:
    text = rel.as_posix()
    return any(text == key or text.startswith(key + "/") for key in ALLOWED)


def loader_imports(tree: ast.AST) -> set[str]:
    """The loaders a module imports from firmad.config (at any depth, lazy imports too), and
    ``firmad.config`` itself when it is imported as a module (``config.load_config(...)``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "firmad.config":
            found |= {a.name for a in node.names} & LOADERS
        elif isinstance(node, ast.ImportFrom) and node.module == "firmad":
            found |= {"firmad.config" for a in node.names if a.name == "config"}
        elif isinstance(node, ast.Import):
            found |= {"firmad.config" for a in node.names if a.name == "firmad.config"}
    return found


def test_only_the_edge_loads_recipes():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        used = loader_imports(ast.parse(path.read_text(encoding="utf-8")))
        if used and not _allowed(rel):
            offenders.append(f"{rel}: {sorted(used)}")
    assert not offenders, (
        "library modules must take typed configs, not load recipes or build 'a.b=c' overrides "
        f"(pass cfg.model_copy(update=...)): {offenders}"
    )


def test_the_rule_can_fail():
    tree = ast.parse("def f():\n    from firmad.config import RunConfig, load_config\n")
    assert loader_imports(tree) == {"load_config"}
    assert loader_imports(ast.parse("from firmad import config\n")) == {"firmad.config"}
    assert not _allowed(Path("scoring/evaluate.py")) and _allowed(Path("cli/runs.py"))
