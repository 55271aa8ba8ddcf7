"""A regular (non-editable) install carries the embedded models and grids as package data."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_the_embedded_models_and_grids(tmp_path):
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and egg-info beside the sources
    shutil.copytree(ROOT / "sdwork", src / "sdwork", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / f, src / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("sdwork-*.whl"))).namelist())
    for must in ("sdwork/data/models/tiny-sd/model_index.json", "sdwork/data/models/tiny-sd/unet/config.json",
                 "sdwork/data/models/tiny-clip/config.json", "sdwork/data/grids/default.yaml",
                 "sdwork/data/configs/sd15/unet/config.json"):
        assert must in names, must
    weights = [n for n in names if n.startswith("sdwork/data/models/") and n.endswith(".safetensors")]
    assert len(weights) >= 4
