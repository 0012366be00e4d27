"""The tutorials in notebooks/ run top to bottom.

Each CPU notebook is executed in a fresh Jupyter kernel of this Python (``sys.executable``, whatever kernels the
machine has registered), with notebooks/ as the working directory, and fails on the first cell that raises. The
notebooks download nothing and write only to temporary directories; the test checks that nothing appeared in or
changed under notebooks/ and the repository root. A notebook that needs a GPU is marked in its metadata
(``{"rlcore": {"requires": "cuda"}}``), is not executed here, and must keep empty outputs.

To refresh the committed outputs after changing a notebook (writes the notebooks given)::

    python tests/test_notebooks.py notebooks/01_gsm8k_grpo.ipynb [more.ipynb ...]
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
# Seconds each CPU notebook may take (measured on 2 busy cores, kernel start included: 10-30 s, and about 40 s for
# 01 when it builds the tiny model first); a cell that hangs fails at this bound instead of blocking CI.
CPU_NOTEBOOKS = {
    "01_gsm8k_grpo.ipynb": 150,
    "02_custom_reward.ipynb": 120,
    "03_game2048_sandbox.ipynb": 120,
    "04_grpo_vs_gspo_and_is.ipynb": 90,
}
GPU_MARK = {"requires": "cuda"}


def _kernel_dir() -> str:
    """A Jupyter data directory whose ``python3`` kernel runs this interpreter; put first on JUPYTER_PATH, it takes
    precedence over any ``python3`` kernel registered for another Python on the machine."""
    directory = tempfile.mkdtemp(prefix="rlcore-kernel-")
    spec_dir = os.path.join(directory, "kernels", "python3")
    os.makedirs(spec_dir)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python",
            "env": {"TOKENIZERS_PARALLELISM": "false"}}
    with open(os.path.join(spec_dir, "kernel.json"), "w", encoding="utf-8") as handle:
        json.dump(spec, handle)
    return directory


def execute(path: str, timeout: float):
    """Runs the notebook at ``path`` top to bottom in a fresh kernel; returns it with its outputs. Raises
    ``nbclient.exceptions.CellExecutionError`` naming the cell when one raises."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    previous = os.environ.get("JUPYTER_PATH")
    kernel_dir = _kernel_dir()
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (kernel_dir, previous) if p)
    try:
        client = NotebookClient(notebook, kernel_name="python3", timeout=int(timeout), record_timing=False,
                                resources={"metadata": {"path": os.path.dirname(path)}})
        client.execute()
    finally:
        if previous is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = previous
        shutil.rmtree(kernel_dir, ignore_errors=True)
    return notebook


def _snapshot() -> dict[str, float]:
    """Where a notebook could write by mistake (it runs in notebooks/): every file and folder under notebooks/ with
    its modification time, and the names at the repository root."""
    found = {name: 0.0 for name in os.listdir(ROOT)}
    for directory, subdirectories, files in os.walk(NOTEBOOKS):
        subdirectories[:] = [d for d in subdirectories if d != "__pycache__"]
        for name in subdirectories + files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, ROOT)] = os.stat(path).st_mtime
    return found


def _read(name: str):
    import nbformat

    return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def _code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CPU_NOTEBOOKS))
def test_notebook_runs_top_to_bottom(name):
    before = _snapshot()
    started = time.perf_counter()
    executed = execute(os.path.join(NOTEBOOKS, name), CPU_NOTEBOOKS[name])
    seconds = time.perf_counter() - started
    assert seconds < CPU_NOTEBOOKS[name], f"{name} took {seconds:.0f} s, more than its {CPU_NOTEBOOKS[name]} s"
    cells = _code_cells(executed)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    after = _snapshot()
    written = sorted(path for path in after if before.get(path) != after[path])
    assert not written, f"{name} wrote into the repository: {written}"


@pytest.mark.parametrize("name", sorted(CPU_NOTEBOOKS))
def test_committed_outputs_come_from_one_run(name):
    """Every code cell has its output from a single top-to-bottom run (execution counts 1, 2, 3, ...), no error
    output, and no giant text output (a log dumped by mistake)."""
    cells = _code_cells(_read(name))
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), \
        f"{name}: re-run it top to bottom with `python tests/test_notebooks.py notebooks/{name}`"
    for index, cell in enumerate(cells):
        for output in cell.outputs:
            assert output.output_type != "error", f"{name}: code cell {index} has an error output"
            text = output.get("text", "") or output.get("data", {}).get("text/plain", "")
            assert len(text) < 20_000, f"{name}: code cell {index} has {len(text):,} characters of output"


def test_every_notebook_is_run_here_or_marked_as_needing_a_gpu():
    names = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
    assert names, "no notebooks found"
    for name in names:
        if name in CPU_NOTEBOOKS:
            continue
        notebook = _read(name)
        assert notebook.metadata.get("rlcore") == GPU_MARK, \
            f"{name} is neither executed by this test nor marked {{'rlcore': {GPU_MARK}}} in its metadata"
        for index, cell in enumerate(_code_cells(notebook)):
            assert not cell.outputs and cell.execution_count is None, \
                f"{name}: code cell {index} has outputs; a GPU notebook is committed without them"
            ast.parse(cell.source, filename=f"{name} code cell {index}")  # at least it is valid Python


def main(paths: list[str]) -> int:
    import nbformat

    if not paths:
        print(__doc__.split("\n\n")[-1].strip())
        return 2
    for path in paths:
        name = os.path.basename(path)
        if name not in CPU_NOTEBOOKS:
            print(f"{path}: not a CPU notebook of this test ({', '.join(sorted(CPU_NOTEBOOKS))})", file=sys.stderr)
            return 2
        started = time.perf_counter()
        notebook = execute(os.path.join(NOTEBOOKS, name), CPU_NOTEBOOKS[name])
        nbformat.write(notebook, os.path.join(NOTEBOOKS, name))
        print(f"{name}: executed in {time.perf_counter() - started:.1f} s and saved")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
