"""benchmarks/break_check.py stays runnable as the code moves: every mutation's fragment occurs
exactly once in its file (a stale one would break nothing, or something else), the broken file
still compiles, and every test it names exists. No pytest subprocesses here."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "break_check", ROOT / "benchmarks" / "break_check.py"
)
break_check = importlib.util.module_from_spec(_spec)
sys.modules["break_check"] = break_check  # dataclasses look their module up there
_spec.loader.exec_module(break_check)
MUTATIONS = break_check.MUTATIONS


def test_names_are_unique_and_every_mutation_changes_something():
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    assert all(m.fragment != m.replacement and m.tests for m in MUTATIONS)


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.name)
def test_fragment_occurs_once_and_the_broken_file_compiles(m):
    mutated = break_check.check_fragment(m, ROOT / "src")
    assert m.replacement in mutated and m.fragment not in mutated.replace(m.replacement, "")


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.name)
def test_the_guarding_tests_exist(m):
    for node in m.tests:
        path, _, name = node.partition("::")
        text = (ROOT / path).read_text()
        if name:
            function = re.sub(r"\[.*\]$", "", name)
            assert re.search(rf"^def {re.escape(function)}\(", text, re.MULTILINE), node


def test_a_fragment_that_is_not_there_is_refused(tmp_path):
    (tmp_path / "firmad").mkdir()
    (tmp_path / "firmad" / "x.py").write_text("a = 1\na = 1\n")
    twice = break_check.Mutation("t", "x.py", "f", "a = 1", "a = 2", ("tests/x.py",), "")
    with pytest.raises(ValueError, match="2 times"):
        break_check.check_fragment(twice, tmp_path)
    gone = break_check.Mutation("t", "x.py", "f", "b = 1", "b = 2", ("tests/x.py",), "")
    with pytest.raises(ValueError, match="0 times"):
        break_check.check_fragment(gone, tmp_path)
