"""Screenshots of notebook 02 in JupyterLab, driven by headless Chromium, into docs/img/.

Runs the notebook the way a person does (Run All in the browser), photographs the sweep table,
the size-vs-metric plot and the image grid, then uses the recipe panel (picks a cluster_dim
the grid's engine cannot run, so the engine switches, and clicks Run) and photographs it while
it runs and when it is done. With --panel-runs N it clicks N more recipes and checks that every
tile of every image the browser shows was drawn (the panel once drew blank or half tiles).

Needs Chromium from the system packages and the `playwright` Python package (its bundled
browsers are not used):

    apt-get install -y chromium            # Debian/Ubuntu; the binary is /usr/bin/chromium
    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    PYTHONPATH=/tmp/pw/lib/python3.11/site-packages .venv/bin/python docs/screenshots.py

(or `.venv/bin/pip install playwright`). By hand, not in `make test`: it takes a few minutes
(the default grid's sweep; pass --run-dir of a finished sweep to have Run All read it back).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "02_palettize_sweep.ipynb"
MAX_BYTES = 300_000  # per committed PNG
KERNEL_JS = """async (code) => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const future = kernel.requestExecute({code, store_history: false});
  let out = "";
  future.onIOPub = (m) => { if (m.header.msg_type === "stream") out += m.content.text; };
  await future.done;
  return out;
}"""
# JupyterLab settings for a quiet, reproducible page: no news toast, every cell rendered
SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def main(argv=None) -> int:
    a = _args(argv)
    work = Path(tempfile.mkdtemp(prefix="sdwork-shots-"))
    run_dir = Path(a.run_dir).resolve() if a.run_dir else work / "run"
    _prepare(work, run_dir, a.grid)
    token, port = secrets.token_hex(16), _free_port()
    with _lab(work, port, token) as log:
        try:
            problems = _shoot(a, f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}", run_dir)
        except Exception:
            print(log.read_text()[-3000:], file=sys.stderr)
            raise
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default="default", help="the notebook's grid parameter (default: default)")
    p.add_argument("--run-dir", help="the notebook's run folder (a finished sweep is read back); default: a new one")
    p.add_argument("--out", default=str(ROOT / "docs" / "img"), help="where the PNGs go")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--panel-runs", type=int, default=0, help="more panel runs, each checked tile by tile")
    p.add_argument("--timeout", type=float, default=1800, help="seconds Run All may take")
    p.add_argument("--keep", action="store_true", help="keep the temporary JupyterLab folder")
    return p.parse_args(argv)


def _prepare(work: Path, run_dir: Path, grid: str) -> None:
    """A copy of notebook 02 whose parameters point at run_dir, and the lab's settings."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += f"\n# set by docs/screenshots.py\ngrid = {grid!r}\nout = {str(run_dir)!r}"
    nbformat.write(nb, work / NOTEBOOK.name)
    for name, value in SETTINGS.items():
        path = work / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@contextlib.contextmanager
def _lab(work: Path, port: int, token: str):
    """JupyterLab from the project's .venv, serving `work`, until the block ends."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTERLAB_SETTINGS_DIR=str(work / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"))
    cmd = [str(ROOT / ".venv" / "bin" / "jupyter"), "lab", "--no-browser", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
           "--LabApp.expose_app_in_browser=True"]  # window.jupyterapp: run commands, reach the kernel
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = work / "lab.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, proc)
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _shoot(a, url: str, run_dir: Path) -> list[str]:
    from playwright.sync_api import sync_playwright

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        page.wait_for_function("() => window.jupyterapp?.shell?.currentWidget?.sessionContext?.session?.kernel"
                               "?.status === 'idle'", timeout=120_000)
        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # the whole width for the notebook
        t0 = time.monotonic()
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        _wait_idle(page, a.timeout)
        print(f"Run All: {time.monotonic() - t0:.0f} s")
        problems = _output_problems(page)
        _cell_shot(page, "results = exp.sweep", out / "02_sweep_table.png")
        _cell_shot(page, "fig = plots.size_vs_metrics", out / "02_size_vs_metrics.png")
        _cell_shot(page, "fig = plots.image_grid", out / "02_image_grid.png")
        problems += _panel(page, out, run_dir, a.panel_runs)
        browser.close()
    return problems


def _panel(page, out: Path, run_dir: Path, more: int) -> list[str]:
    """One photographed panel run (cluster_dim 2: the engine switches), then `more` checked runs."""
    cell = _cell(page, "recipe_panel(exp, recipe)")
    _pick(cell, "granularity", "per_grouped_channel")
    _pick(cell, "group size", "16")
    _pick(cell, "cluster_dim", "2")
    old = _shown(cell)
    cell.get_by_role("button", name="Run recipe").click()
    cell.get_by_role("button", name="Running...").wait_for(timeout=30_000)
    _save(cell.screenshot(), out / "02_panel_running.png")
    problems = _after_run(page, cell, run_dir, "cluster_dim 2", old)
    _save(cell.screenshot(), out / "02_panel.png")
    _pick(cell, "cluster_dim", "1")
    _pick(cell, "engine", "sdwork")
    choices = [(n, g) for g in ("per_tensor", "per_grouped_channel") for n in ("2", "3", "4", "6", "8")]
    for i in range(more):
        n, g = choices[i % len(choices)]
        _pick(cell, "granularity", g)
        _pick(cell, "bits", n)
        old = _shown(cell)
        cell.get_by_role("button", name="Run recipe").click()
        problems += _after_run(page, cell, run_dir, f"{n} bits, {g}", old)
    if more:
        print(f"panel: {more} more runs, {len(problems)} problems")
    return problems


def _shown(cell) -> str:
    """The src of the image the panel shows now ('' before its first run)."""
    return cell.evaluate("(el) => el.querySelector('.widget-output img')?.src ?? ''")


def _after_run(page, cell, run_dir: Path, what: str, old: str) -> list[str]:
    """Wait until the panel shows a new image and is enabled again; check that image tile by tile
    against the variant's images in the run folder."""
    page.wait_for_function(
        "([el, old]) => { const img = el.querySelector('.widget-output img');"
        " return img && img.src !== old && !el.querySelector('button').disabled; }",
        arg=[cell.element_handle(), old], timeout=600_000, polling=250)
    png = base64.b64decode(_shown(cell).split(",", 1)[1])
    state = json.loads(page.evaluate(KERNEL_JS, (
        "import json\nfrom sdwork.report.images import tile_boxes as _tb\n"
        "_p = [o for o in Out.values() if type(o).__name__ == 'RecipePanel'][-1]\n"
        "print(json.dumps(dict(boxes=_tb(_p.last_figure), name=_p.last_recipe.name)))")))
    rows = [np.load(run_dir / "images" / "baseline.npz")["images"],
            np.load(run_dir / "images" / f"{state['name']}.npz")["images"]]
    from sdwork.report.images import tile_errors

    return [f"panel run ({what}, {state['name']}): {e}" for e in tile_errors(png, state["boxes"], rows)]


def _pick(cell, label: str, option: str) -> None:
    """Choose an option of the panel dropdown whose description is `label`."""
    box = cell.locator(".widget-dropdown").filter(has=cell.page.get_by_text(label, exact=True))
    box.locator("select").select_option(label=option)


def _cell(page, starts: str):
    cell = page.locator(".jp-CodeCell").filter(has_text=starts).first
    cell.scroll_into_view_if_needed()
    return cell


def _cell_shot(page, starts: str, path: Path) -> None:
    _save(_cell(page, starts).screenshot(), path)


def _wait_idle(page, timeout: float) -> None:
    """Until no cell is queued or running and the kernel is idle."""
    page.wait_for_function(
        "() => { const nb = window.jupyterapp.shell.currentWidget;"
        " const busy = [...document.querySelectorAll('.jp-InputPrompt')].some(p => p.textContent.includes('*'));"
        " return !busy && nb.sessionContext.session.kernel.status === 'idle'; }",
        timeout=timeout * 1000, polling=1000)


def _output_problems(page) -> list[str]:
    """Red blocks and errors a person would see after Run All."""
    stderr = page.locator("[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").count()
    return [f"stderr output: {t[:200]!r}" for t in stderr] + ([f"{errors} error outputs"] if errors else [])


def _save(png: bytes, path: Path) -> None:
    """Write a screenshot, reduced to a palette when that keeps it under MAX_BYTES."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    if buf.tell() > MAX_BYTES:
        buf = io.BytesIO()
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, "PNG",
                                                                                                   optimize=True)
    path.write_bytes(buf.getvalue())
    print(f"{path} ({img.width}x{img.height}, {buf.tell() // 1000} kB)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}; see its log")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not listen on port {port} within {timeout} s")


if __name__ == "__main__":
    sys.exit(main())
