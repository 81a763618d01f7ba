"""The test tree has no __init__.py files, so pytest imports test modules by basename: two test
files with one basename in different folders abort collection ("import file mismatch")."""

import collections
from pathlib import Path


def test_test_file_basenames_are_unique():
    names = collections.Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], f"duplicate test basenames: {names.most_common(3)}"
