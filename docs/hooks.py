"""mkdocs hook: the notebooks, kept in notebooks/ beside the code, become pages of the site.

They are added to the site's files before mkdocs-jupyter looks for notebooks, from where they are,
so that they execute with notebooks/ as the working directory, as a reader runs them. The build
executes them on the CPU: with libtpu installed (the tpu-planner extra), a jax that looked for a
TPU would print its initialisation errors into the pages.
"""

import glob
import os

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every notebook: one missing from mkdocs.yml's nav then fails the strict build.
NOTEBOOKS = sorted(
    os.path.relpath(path, _ROOT) for path in glob.glob(os.path.join(_ROOT, "notebooks", "*.ipynb"))
)


def on_config(config):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the notebook kernels inherit it
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files, config):
    for path in NOTEBOOKS:
        files.append(File(path, _ROOT, config["site_dir"], config["use_directory_urls"]))
    return files
