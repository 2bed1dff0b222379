"""Execute the tutorial notebooks at full size and save them with their outputs.

    .venv/bin/python scripts/execute_tutorials.py [tutorials/NAME.ipynb ...]

(all notebooks under ``tutorials/`` when none is named). The test suite executes the same notebooks
at reduced size (``PYRO_SGMCMC_QUICK=1``) without saving them. A saved notebook must not carry text
that belongs to this machine (an absolute path, a stderr warning): such an output is an error here.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent
MACHINE_TEXT = (str(ROOT), os.path.expanduser("~"), "site-packages")


def execute(path: pathlib.Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=3600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    problems = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            text = str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
            if output.get("name") == "stderr" or any(fragment in text for fragment in MACHINE_TEXT):
                problems.append(text)
    if problems:
        raise RuntimeError(f"{path.name} not saved: outputs carry machine-specific text:\n" + "\n".join(problems))
    nbformat.write(notebook, path)
    print(f"{path.relative_to(ROOT)}: executed in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    os.environ.pop("PYRO_SGMCMC_QUICK", None)
    paths = [pathlib.Path(p).resolve() for p in sys.argv[1:]] or sorted((ROOT / "tutorials").glob("*.ipynb"))
    for notebook_path in paths:
        execute(notebook_path)
