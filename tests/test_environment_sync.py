"""environment.yml (the conda route) lists exactly pyproject.toml's dependencies."""
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _norm(spec: str) -> str:
    r = Requirement(spec)
    return f"{r.name.lower().replace('_', '-')}{sorted(r.extras) or ''}{r.specifier}"


def _pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    return project, {_norm(d) for d in deps}


def _environment():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return conda, pip


def test_pip_section_matches_pyproject():
    _, want = _pyproject()
    _, pip = _environment()
    have = {_norm(p) for p in pip if not p.startswith("-e")}
    assert not want - have, f"missing from environment.yml: {sorted(want - have)}"
    assert not have - want, f"in environment.yml but not pyproject.toml: {sorted(have - want)}"


def test_conda_python_matches_and_package_is_installed():
    project, _ = _pyproject()
    conda, pip = _environment()
    assert "python=3.11" in conda and "pip" in conda
    assert project["requires-python"] == ">=3.11"
    assert "-e ." in pip, "environment.yml must install sdwork itself (pip: -e .)"


def test_torch_is_pinned_to_the_local_cpu_wheel_version():
    _, want = _pyproject()
    assert "torch==2.13.0" in want  # an unpinned torch pulls a multi-GB CUDA build on Linux
