"""The notebooks as committed. That they execute top to bottom, print what they promise and draw
their plots is checked once, by tests/test_docs.py, on the site mkdocs builds with both notebooks
executed (docs/hooks.py); executing them here as well cost the suite about 4 minutes."""

import os

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


def test_notebooks_are_committed_without_large_outputs():
    for name in sorted(os.listdir(NOTEBOOKS)):
        if name.endswith(".ipynb"):
            assert os.path.getsize(os.path.join(NOTEBOOKS, name)) < 200_000, name
