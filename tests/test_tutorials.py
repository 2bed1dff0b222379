"""The tutorials and the README's quickstart run as shipped (executed, not just imported)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))


@pytest.mark.tutorial
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("PYRO_SGMCMC_QUICK", "1")  # the notebooks' smaller sizes, to fit CI's time
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails


@pytest.mark.tutorial
def test_quickstart_runs_and_matches_the_exact_posterior():
    out = subprocess.run([sys.executable, str(ROOT / "tutorials" / "quickstart.py")], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    error = float(out.rsplit("largest error of a posterior mean:", 1)[1].split()[0])
    assert error < 0.5, out  # in posterior sds; Monte Carlo error of the mean is ~0.1 sd here


@pytest.mark.tutorial
def test_distributed_tutorial_runs_on_two_ranks_and_matches_the_exact_posterior(monkeypatch):
    monkeypatch.setenv("PYRO_SGMCMC_QUICK", "1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "tutorials" / "distributed_sgld.py")], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "2 rank(s)" in out and "replicas identical" in out, out
    error = float(out.rsplit("largest error of a posterior mean:", 1)[1].split()[0])
    assert error < 0.5, out  # in posterior sds; Monte Carlo error of the mean is ~0.1 sd here
