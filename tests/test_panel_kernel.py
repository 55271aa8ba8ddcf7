"""The recipe panel in a real kernel, clicked the way JupyterLab clicks it (a comm message), while
widget traffic flows and another thread keeps redrawing every pyplot figure (what the kernel's
other thread did when the panel's image grid came out blank or half drawn). The PNG the panel
displays must have every tile drawn: each tile is compared with the image it should show."""
import base64
import json
import os
import queue
import time

import numpy as np
import pytest
from nbrun import ROOT

from sdwork.report.images import tile_errors

TIMEOUT = 300

SETUP = """
import json, threading, time
import ipywidgets as w
import matplotlib.pyplot as plt
from IPython.display import display
from sdwork import Experiment, GenSettings, Recipe, quiet
from sdwork.report.images import tile_boxes
from sdwork.report.panel import recipe_panel

quiet.notebook()
settings = GenSettings(prompts=["a small red circle on a gray background", "a large blue square on a white background"],
                       seeds=[0, 1], steps=2, guidance=5.0)
exp = Experiment("tiny-random", settings, None, {out!r}, progress=False)
panel = recipe_panel(exp, Recipe(nbits=4, components=("text_encoder",), engine="sdwork"))
slider = w.IntSlider()
display(panel, slider)
plt.figure()  # a figure of the user's own: pyplot's registry is not empty

stop = threading.Event()
def busy():
    # widget messages out of the kernel and pyplot redraws, from a thread other than the callback's
    i = 0
    while not stop.is_set():
        i += 1
        slider.value = i % 100
        for m in plt._pylab_helpers.Gcf.get_all_fig_managers():
            m.canvas.draw()
        time.sleep(0.002)
threading.Thread(target=busy, daemon=True).start()
print(json.dumps(dict(button=panel.button.model_id, progress=panel.progress.model_id, slider=slider.model_id)))
"""


@pytest.fixture(scope="module")
def kernel():
    from jupyter_client import KernelManager

    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(ROOT / "notebooks"), env=env)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    yield kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def _collect(kc, parents: set[str], timeout=TIMEOUT) -> list[dict]:
    """iopub messages until every request in `parents` has gone idle."""
    msgs, busy, deadline = [], set(parents), time.monotonic() + timeout
    while busy:
        try:
            m = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"kernel still busy after {timeout} s; last messages: {msgs[-5:]}")
        msgs.append(m)
        pid = m["parent_header"].get("msg_id")
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" and pid in busy:
            busy.discard(pid)
        if m["msg_type"] == "error":
            raise AssertionError("\n".join(m["content"]["traceback"]))
    return msgs


def _execute(kc, code: str) -> str:
    msgs = _collect(kc, {kc.execute(code)})
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")


def _json(text: str):
    """The JSON line a snippet printed (quiet's summary line may follow it)."""
    return json.loads(next(line for line in text.splitlines() if line.startswith("{")))


def _comm(kc, comm_id: str, data: dict) -> str:
    """A comm message as the frontend sends it (a click, or a state update)."""
    msg = kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
    kc.shell_channel.send(msg)
    return msg["header"]["msg_id"]


def _updates(msgs, model_id) -> list[dict]:
    return [m["content"]["data"]["state"] for m in msgs
            if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == model_id
            and m["content"]["data"].get("method") in ("update", "echo_update")]


def _pngs(msgs) -> list[bytes]:
    return [base64.b64decode(m["content"]["data"]["image/png"]) for m in msgs
            if m["msg_type"] == "display_data" and "image/png" in m["content"]["data"]]


@pytest.mark.slow
def test_panel_click_in_kernel_draws_every_tile(kernel, tmp_path):
    out = tmp_path / "run"
    ids = _json(_execute(kernel, SETUP.format(out=str(out))))
    for round_ in range(3):
        # a double click, with widget updates from the frontend queued among the clicks
        click = {"method": "custom", "content": {"event": "click"}}
        sent = [_comm(kernel, ids["button"], click)]
        sent += [_comm(kernel, ids["slider"], {"method": "update", "state": {"value": i}, "buffer_paths": []})
                 for i in range(5)]
        sent.append(_comm(kernel, ids["button"], click))
        msgs = _collect(kernel, set(sent))
        pngs = _pngs(msgs)
        assert len(pngs) == 1, f"round {round_}: {len(pngs)} images displayed: the double click ran twice"
        disabled = [s["disabled"] for s in _updates(msgs, ids["button"]) if "disabled" in s]
        assert disabled[:1] == [True] and disabled[-1] is False, disabled  # disabled while it ran
        assert [s["value"] for s in _updates(msgs, ids["progress"]) if "value" in s], "no progress shown"

        state = _json(_execute(kernel, "print(json.dumps(dict(boxes=tile_boxes(panel.last_figure), "
                                       "name=panel.last_recipe.name, runs=panel.runs)))"))
        assert state["runs"] == round_ + 1
        base = np.load(out / "images" / "baseline.npz")["images"]
        variant = np.load(out / "images" / f"{state['name']}.npz")["images"]
        assert tile_errors(pngs[0], state["boxes"], [base, variant]) == []
        # the next round runs another recipe
        _execute(kernel, f"panel.nbits.value = {[3, 2, 6][round_]}")
    _execute(kernel, "stop.set()")


def test_tile_check_sees_a_missing_tile():
    """The comparison above fails on a blank tile (so a pass means every tile was drawn)."""
    from sdwork.report.figure import png
    from sdwork.report.images import image_grid, tile_boxes

    rng = np.random.default_rng(0)
    rows = {"a": rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8),
            "b": rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)}
    fig = image_grid(rows, ["p\nseed 0", "p\nseed 1"])
    boxes = tile_boxes(fig)
    assert tile_errors(png(fig), boxes, list(rows.values())) == []
    fig.tile_axes[1][1].images[0].remove()  # a tile left undrawn
    assert tile_errors(png(fig), boxes, list(rows.values())) == ["row 1 col 1: 100% of pixels wrong"]
