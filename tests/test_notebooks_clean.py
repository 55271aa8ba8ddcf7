"""Notebooks are committed without outputs and with exactly one parameters cell."""
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
EXTRA_KEYS = "metadata.papermill cell.metadata.papermill"


def test_there_are_notebooks():
    assert any(p.name.startswith("00_") for p in NOTEBOOKS)


@pytest.fixture(scope="module")
def verify_report():
    """nbstripout --verify over every notebook at once (one interpreter start, not one per notebook)."""
    r = subprocess.run([sys.executable, "-m", "nbstripout", "--verify", "--extra-keys", EXTRA_KEYS, *map(str, NOTEBOOKS)],
                       capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_outputs(path, verify_report):
    code, out = verify_report
    assert path.name not in out, f"{path.name} has outputs or papermill metadata: run `make strip`\n{out}"
    assert code == 0 or any(p.name in out for p in NOTEBOOKS), f"nbstripout --verify failed:\n{out}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_exactly_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters', need exactly 1"
    assert tagged[0].cell_type == "code"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name[:2].isdigit()], ids=lambda p: p.name)
def test_every_notebook_is_executed_by_a_test(path):
    tests = Path(__file__).resolve().parent
    users = [t.name for t in tests.glob("test_*.py") if f'"{path.name}"' in t.read_text()]
    assert users, f"no test runs {path.name}: add one that calls nbrun.run_notebook({path.name!r}, tmp_path, ...)"
