"""Run a notebook headlessly for a test: `run_notebook("00_quickstart.ipynb", tmp_path, steps=2)`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def run_notebook(name: str, tmp_path: Path, **params) -> Path:
    """Execute notebooks/<name> with papermill into tmp_path; any cell error fails the test.

    The kernel is python3 of this interpreter, started in notebooks/ (as Jupyter
    Lab would), offline, with the repository importable. Returns the executed copy.
    """
    import papermill as pm
    from jupyter_client.kernelspec import KernelSpecManager

    src = NOTEBOOKS / name
    if not src.exists():
        raise FileNotFoundError(f"no notebook {src}")
    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    if argv0 not in ("python", "python3", sys.executable):
        raise RuntimeError(f"the python3 kernel runs {argv0}, not this interpreter {sys.executable}: "
                           "remove the stray kernelspec (jupyter kernelspec list)")
    out = Path(tmp_path) / name
    env = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        pm.execute_notebook(
            str(src), str(out), parameters=params, kernel_name="python3", cwd=str(NOTEBOOKS),
            progress_bar=False, log_output=False, request_save_on_cell_execute=False,
        )  # raises PapermillExecutionError, naming the cell, on any error
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return out
