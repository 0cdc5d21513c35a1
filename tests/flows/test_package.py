"""The flows subpackage stands alone: documented examples run, no distillation imports."""

import ast
import doctest
from pathlib import Path

import flowdistill.flows as flows

PACKAGE = Path(flows.__file__).parent


def test_documented_examples_run():
    result = doctest.testmod(flows)
    assert result.attempted > 30 and result.failed == 0


def test_every_public_name_appears_in_the_examples():
    missing = [name for name in flows.__all__ if name not in flows.__doc__]
    assert not missing, missing


def test_imports_nothing_outside_flows():
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from outside flows: {node.module}"
                module = node.module or ""
                assert node.level == 1 or not module.startswith("flowdistill"), path.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("flowdistill"), path.name
