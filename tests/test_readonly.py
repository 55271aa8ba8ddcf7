"""Reading a package changes nothing in it (bytes and mtimes), and coremltools' temporary
packages live in sdwork's scratch folder: removed when the operation ends or fails, and the
leftovers of a killed process removed at the next start."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sdwork import paths
from sdwork.compress.recipe import Recipe

TE = ("text_encoder",)


def snapshot(folder: Path) -> dict:
    return {str(f.relative_to(folder)): (f.read_bytes(), f.stat().st_mtime_ns)
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    """(pipeline, fp16 packages of tiny-random, a snapshot of them before any read)."""
    from sdwork.experiments.experiment import Experiment
    from sdwork.generate import GenSettings

    exp = Experiment("tiny-random", GenSettings(prompts=("a small red circle on a gray background",), seeds=(0,),
                                                steps=2), None, tmp_path_factory.mktemp("ro") / "run", progress=False)
    packages = exp.fp16_packages()
    folder = next(iter(packages.values())).parent
    return exp, packages, folder, snapshot(folder)


def test_every_read_path_leaves_the_packages_as_they_were(fp16, tmp_path, capsys):
    from sdwork.cli import main
    from sdwork.compress.apply import compress, non_weight_consts
    from sdwork.convert.cache import user_packages
    from sdwork.convert.into_torch import load_package_into_module
    from sdwork.convert.weightmap import load_weight_map
    from sdwork.coreml.package import metadata, package_weights
    from sdwork.coreml.sizes import package_sizes
    from sdwork.coreml.tables import io_table, package_table
    from sdwork.evaluate.variant import evaluate, layer_errors

    exp, packages, folder, before = fp16
    for comp, p in packages.items():
        package_sizes(p), package_weights(p), metadata(p), load_weight_map(p), non_weight_consts(p)
    package_table(packages), io_table(packages)
    user_packages(exp.pipe, folder, list(packages))
    load_package_into_module(exp.pipe.text_encoder, "text_encoder", packages["text_encoder"])
    assert main(["sizes", str(packages["unet"]), "--layers"]) == 0
    done = compress(Recipe(nbits=4, components=TE), packages, tmp_path / "v", pipe=exp.pipe, progress=False)
    layer_errors(packages["text_encoder"], done.packages["text_encoder"])
    evaluate(exp.pipe, done.packages, exp.settings, exp.baseline, None, progress=False, fp16_packages=packages)
    after = snapshot(folder)
    assert after.keys() == before.keys()
    changed = [name for name in before if after[name] != before[name]]
    assert changed == [], f"a read rewrote {changed}"
    capsys.readouterr()


def test_a_read_only_package_can_be_read(fp16, tmp_path):
    import shutil

    from sdwork.coreml.package import metadata, package_weights

    _, packages, _, _ = fp16
    p = tmp_path / "TextEncoder.mlpackage"
    shutil.copytree(packages["text_encoder"], p)
    for f in [p, *p.rglob("*")]:
        f.chmod(0o555 if f.is_dir() else 0o444)
    try:
        assert metadata(p)["component"] == "text_encoder" and package_weights(p)
    finally:
        for f in [p, *p.rglob("*")]:
            f.chmod(0o755 if f.is_dir() else 0o644)


def test_coremltools_temporaries_go_to_the_scratch_folder_and_go_when_it_fails(fp16, tmp_path, monkeypatch):
    from sdwork.compress import apply

    exp, packages, _, _ = fp16
    seen = []
    real = apply._run_passes

    def passes_then_crash(*a, **kw):
        out, _report = real(*a, **kw)
        seen.append((tempfile.gettempdir(), out.package_path))
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(apply, "_run_passes", passes_then_crash)
    before = tempfile.gettempdir()
    with pytest.raises(KeyboardInterrupt):
        apply.compress(Recipe(nbits=4, components=TE), packages, tmp_path / "v", pipe=exp.pipe, progress=False)
    (tmp, package), = seen
    assert Path(tmp).parent == paths.scratch_dir() and Path(package).parent == Path(tmp)  # coremltools wrote there
    assert not Path(tmp).exists() and not Path(package).exists()  # and it is gone
    assert tempfile.gettempdir() == before  # the process's temp folder is back


def test_the_scratch_block_removes_what_it_made_and_restores_the_temp_folder():
    before = tempfile.gettempdir()
    with pytest.raises(RuntimeError), paths.scratch() as folder:
        made = Path(tempfile.mkdtemp(suffix=".mlpackage"))
        assert made.parent == folder and folder.parent == paths.scratch_dir()
        raise RuntimeError("a failed conversion")
    assert not folder.exists() and tempfile.gettempdir() == before
    with paths.scratch() as folder:
        Path(tempfile.mkstemp()[1]).write_text("x")
    assert not folder.exists()


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())


def test_a_killed_processs_scratch_folder_is_removed_at_the_next_start(tmp_path):
    killed = _child("import os, signal, tempfile\nfrom sdwork import paths\n"
                    "with paths.scratch():\n"
                    "    open(tempfile.mkstemp(suffix='.bin')[1], 'wb').write(b'x' * 1000)\n"
                    "    print(paths.scratch_dir(), flush=True)\n"
                    "    os.kill(os.getpid(), signal.SIGKILL)\n")
    left = Path(killed.stdout.strip())
    assert killed.returncode == -9 and left.is_dir() and any(left.rglob("*.bin"))  # what a killed run leaves
    mine = paths.scratch_dir()  # a live process's folder: never another's to remove
    nxt = _child("from sdwork import paths\nprint(paths.scratch_dir())")
    assert nxt.returncode == 0, nxt.stderr
    assert not left.exists() and mine.is_dir()
    assert not Path(nxt.stdout.strip()).exists()  # the next process removed its own at exit


def test_a_killed_conversions_leftover_in_the_package_cache_is_removed(tmp_path):
    gone = _child("import os; print(os.getpid())")
    dead = int(gone.stdout)
    host = paths.owner_tag().rsplit("-", 1)[0]
    stale = tmp_path / f".tmp-abc-{host}-{dead}"
    live = tmp_path / f".tmp-abc-{paths.owner_tag()}"
    other_host = tmp_path / f".tmp-abc-elsewhere-{dead}"
    for d in (stale, live, other_host):
        (d / "Unet.mlpackage").mkdir(parents=True)
    assert paths.remove_stale(tmp_path, ".tmp-*") == [stale]
    assert not stale.exists() and live.exists() and other_host.exists()
