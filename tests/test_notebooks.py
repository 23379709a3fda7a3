"""The notebooks execute top to bottom (nbclient), as a researcher would run them."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


def _execute(name: str, timeout: int) -> nbformat.NotebookNode:
    path = os.path.join(NOTEBOOKS, name)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": NOTEBOOKS}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    return notebook


def _outputs(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )


def test_notebooks_are_committed_without_large_outputs():
    for name in sorted(os.listdir(NOTEBOOKS)):
        if name.endswith(".ipynb"):
            assert os.path.getsize(os.path.join(NOTEBOOKS, name)) < 200_000, name


@pytest.mark.slow
def test_derivation_notebook_runs_and_recovers_the_optimum():
    notebook = _execute("derivation.ipynb", timeout=600)
    text = _outputs(notebook)
    assert "KL(π_θ ‖ π*) with infinite data:" in text
    assert any(
        output.get("output_type") == "display_data"
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    ), "the KL curve should be drawn"


@pytest.mark.slow
def test_quickstart_notebook_trains_gemma3_and_samples_before_and_after():
    notebook = _execute("quickstart.ipynb", timeout=900)
    text = _outputs(notebook)
    assert "before: " in text and "after: " in text
    assert "held-out rewards/accuracies before -> after:" in text
