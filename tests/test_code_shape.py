"""The shape rules of the house, checked on the source: no function over 60 lines or 8
parameters, no module over 700 lines (src/firmad), except the exemptions below."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "firmad"
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8
MAX_MODULE_LINES = 700

# (module relative to src/firmad, function name): why it may be wider.
WIDE_FUNCTIONS = {
    ("detector.py", "__init__"): "scikit-learn needs every hyper-parameter in __init__",
}
# CLI commands (in this package, decorated with app.command): their parameters are the
# command's options, one typer option each.
CLI_PACKAGE = "cli"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Named parameters, without self / cls (``*args`` / ``**kwargs`` not counted)."""
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return [n for n in names if n not in ("self", "cls")]


def _is_cli_command(path: Path, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A command of the CLI (decorated with ``app.command``): its parameters are its options."""
    if path.parts[0] != CLI_PACKAGE:
        return False
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Attribute) and target.attr == "command":
            return True
    return False


def _module_trees():
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        yield path.relative_to(SRC), text, ast.parse(text)


def test_no_function_is_too_wide_or_too_long():
    wide, long = [], []
    for rel, _, tree in _module_trees():
        for fn in _functions(tree):
            where = f"{rel}:{fn.lineno} {fn.name}"
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{where} ({lines} lines)")
            n = len(_parameters(fn))
            exempt = (rel.as_posix(), fn.name) in WIDE_FUNCTIONS or _is_cli_command(rel, fn)
            if n > MAX_PARAMETERS and not exempt:
                wide.append(f"{where} ({n} parameters)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
    assert not wide, f"functions over {MAX_PARAMETERS} parameters (group them): {wide}"


def test_no_module_is_too_long():
    sizes = [(str(rel), len(text.splitlines())) for rel, text, _ in _module_trees()]
    big = [f"{rel} ({n} lines)" for rel, n in sizes if n > MAX_MODULE_LINES]
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them by job): {big}"


def test_the_checker_sees_a_wide_function():
    """The rules can fail: a made-up function of 9 parameters is found."""
    fn = next(_functions(ast.parse("def f(a, b, c, d, e, f, g, h, i, *, j=1):\n    pass\n")))
    assert len(_parameters(fn)) == 10
    method = next(_functions(ast.parse("class A:\n    def m(self, a):\n        pass\n")))
    assert _parameters(method) == ["a"]
