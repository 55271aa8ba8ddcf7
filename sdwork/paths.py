"""Where sdwork's files live: the embedded data (shipped inside the package), the cache, runs.

The cache (fp16 baselines, fp16 packages, generated tokenizer files) sits under
`$SDWORK_CACHE` when set, else `~/.cache/sdwork`; tests point it at a temporary folder, so
nothing is written into a checkout. Runs go where the caller says (`out=`).

One rule for every relative path a notebook or the library is given (run folders, grid files,
converted packages): `resolve` puts it under the checkout sdwork runs from (else the current
folder), wherever the process started (a notebook kernel starts in notebooks/).

coremltools writes GB-sized temporary packages into the temp folder and removes them only at a
normal exit (a killed run leaves them all). `scratch()` sends them to a folder under
`<cache>/tmp/<host>-<pid>/`, removed when the block ends (failed or not); the process's folder
goes at exit, and the folders of processes that died are removed at the next start.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
DATA = PACKAGE / "data"  # package data: found by editable and regular installs alike
MODELS = DATA / "models"
TINY = MODELS / "tiny-sd"
TINY_CLIP = MODELS / "tiny-clip"
GRIDS = DATA / "grids"
CONFIGS = DATA / "configs"
CACHE_ENV = "SDWORK_CACHE"


def cache_dir(*parts: str) -> Path:
    """A folder under the cache root ($SDWORK_CACHE or ~/.cache/sdwork), not created."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdwork"
    return Path(root).expanduser().joinpath(*parts)


def repo_root() -> Path | None:
    """The source checkout this package sits in (None for a regular install)."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").exists() and (root / "notebooks").is_dir() else None


def resolve(path) -> Path:
    """A path: absolute as given (after ~), relative ones under the checkout (else the current folder)."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    return (repo_root() or Path.cwd()) / path


def run_dir(out) -> Path:
    """A run folder, by the one rule of `resolve`."""
    return resolve(out)


def spec(text) -> str:
    """A model or CLIP spec: a folder by the rule of `resolve`; a hub id ("org/name", no such
    folder under the checkout) as given."""
    text = str(text)
    path = resolve(text)
    hub_like = not text.startswith((".", "/", "~")) and text.count("/") == 1
    return text if hub_like and not path.exists() else str(path)


# --- the scratch folder for coremltools' temporaries

_SCRATCH: dict[str, Path] = {}


def scratch_dir() -> Path:
    """This process's scratch folder (created, with stale ones of dead processes removed, on first use)."""
    root = cache_dir("tmp")
    mine = root / owner_tag()
    if _SCRATCH.get("dir") != mine:  # first use, or a forked child
        remove_stale(root)
        mine.mkdir(parents=True, exist_ok=True)
        _SCRATCH["dir"] = mine
        atexit.register(shutil.rmtree, mine, ignore_errors=True)
    mine.mkdir(parents=True, exist_ok=True)  # removed by hand meanwhile: made again
    return mine


def owner_tag() -> str:
    """'<host>-<pid>': ends the name of a folder this process owns until it exits (see remove_stale)."""
    # a cache on shared storage serves several machines: only this host's pids can be checked
    return f"{socket.gethostname().replace('-', '_') or 'host'}-{os.getpid()}"


def remove_stale(root, pattern: str = "*") -> list[Path]:
    """Remove the entries of `root` matching `pattern` whose name ends with the owner tag of a
    process of this host that no longer runs (killed mid-way); returns them."""
    root, host = Path(root), owner_tag().rsplit("-", 1)[0]
    gone = []
    for d in root.glob(pattern) if root.is_dir() else ():
        tag_host, _, pid = d.name.rpartition("-")
        if (tag_host == host or tag_host.endswith("-" + host)) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() and not d.is_symlink() else d.unlink(missing_ok=True)
            gone.append(d)
    return gone


_SCRATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def scratch():
    """Inside the block Python's temp folder (which coremltools takes) is a new folder in this
    process's scratch folder, removed when the block ends, failed or not: wrap a whole operation
    that saves its result inside the block. Threads take turns (tempfile.tempdir is global)."""
    with _SCRATCH_LOCK:
        folder, before = Path(tempfile.mkdtemp(prefix="op-", dir=scratch_dir())), tempfile.tempdir
        tempfile.tempdir = str(folder)
        try:
            yield folder
        finally:
            tempfile.tempdir = before
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
