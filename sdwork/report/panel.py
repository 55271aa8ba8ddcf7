"""The notebook's recipe panel: widgets that re-run `Experiment.run` for the settings picked.

    recipe_panel(exp, recipe)     # last line of a cell: the panel shows there

What a person sees: a compression family (palettize, linear, prune, joint) and its kind;
controls that do not apply are disabled (the LUT controls for linear and prune, group size
under per_tensor);
only group sizes and cluster_dims that compress some layer of the model are offered; picking a
cluster_dim the engine cannot run switches the engine, and says so. While a recipe runs every
control is disabled and a bar shows the stage; a second click on the same settings (a double
click arrives as two) shows the result already there instead of running again. An error is
shown once, in the status line, with the fix its message names.

The figure is drawn in the callback into PNG bytes from a Figure pyplot does not know, so no
other thread of the kernel can draw it half-way (see sdwork.report.figure).
"""
from __future__ import annotations

import time

from sdwork import hooks, quiet
from sdwork.errors import SdworkError

GROUP_SIZES = (4, 8, 16, 32, 64)
# family -> {choice shown: the Recipe fields it sets}; palettize and joint also use the LUT controls
FAMILIES = {
    "palettize": {"LUT (fp16)": {}},
    "linear": {"int8 per-channel": dict(linear_bits=8), "int4 per-block 32": dict(linear_bits=4, block_size=32),
               "int4 per-block 64": dict(linear_bits=4, block_size=64)},
    "prune": {"50% magnitude": dict(sparsity=0.5), "75% magnitude": dict(sparsity=0.75), "2:4": dict(n_m=(2, 4))},
    "joint": {"50% sparse, then LUT": dict(sparsity=0.5), "LUT in int8": dict(lut_dtype="int8")},
}
_FAMILY_FIELDS = dict(lut_dtype="fp16", linear_bits=None, linear_granularity=None, block_size=None, sparsity=None,
                      n_m=None)
_NO_LUT = dict(nbits=None, granularity=None, group_size=None, cluster_dim=1)
CLUSTER_DIMS = (1, 2, 4)
STAGES = ("compressing", "generating and scoring", "drawing")


def recipe_panel(exp, template):
    """The panel for `exp`, starting from `template` (a Recipe: the notebook's plain-cell recipe)."""
    return RecipePanel(exp, template)


class RecipePanel:
    """Controls, a run button, a progress bar, a status line and an output area (see module doc).
    `run()` is what the button calls; `last_figure` is the figure last shown."""

    def __init__(self, exp, template):
        import ipywidgets as w

        from sdwork.compress.recipe import ENGINES, NBITS

        self.exp, self.template = exp, template
        self.last_figure, self.runs = None, 0
        self._last = None  # (recipe, status html) of the last click that ran or failed
        self._running = self._syncing = False
        style = dict(style={"description_width": "80px"}, layout=w.Layout(width="270px"))
        family = template.family if template.family in FAMILIES else "palettize"
        self.family = w.Dropdown(options=list(FAMILIES), value=family, description="family", **style)
        self.choice = w.Dropdown(options=list(FAMILIES[family]), description="kind", **style)
        self.nbits = w.Dropdown(options=NBITS, value=template.nbits or 4, description="bits", **style)
        self.granularity = w.Dropdown(options=["per_tensor", "per_grouped_channel"],
                                      value=template.granularity or "per_tensor",
                                      description="granularity", **style)
        self.group_size = w.Dropdown(options=GROUP_SIZES, value=template.group_size or 16,
                                     description="group size", **style)
        self.cluster_dim = w.Dropdown(options=CLUSTER_DIMS, value=template.cluster_dim, description="cluster_dim",
                                      **style)
        self.engine = w.Dropdown(options=ENGINES, value=template.engine, description="engine", **style)
        self.button = w.Button(description="Run recipe", button_style="primary", icon="play")
        self.progress = w.IntProgress(min=0, max=len(STAGES), layout=w.Layout(visibility="hidden"))
        self.note = w.HTML()  # what the panel changed by itself (an engine switch), until the next change
        self.status = w.HTML()  # the run: its stage, its result or its error
        self.out = w.Output()
        self.lut_controls = [self.nbits, self.granularity, self.group_size, self.cluster_dim, self.engine]
        self.controls = [self.family, self.choice, *self.lut_controls]
        for c in self.controls:
            c.observe(self._changed, names="value")
        self.button.on_click(self.run)
        self.widget = w.VBox([w.HBox([self.family, self.choice]),
                              w.HBox([self.nbits, self.granularity, self.group_size]),
                              w.HBox([self.cluster_dim, self.engine]),
                              self.note, w.HBox([self.button, self.progress]), self.status, self.out])
        self._sync()

    def _repr_mimebundle_(self, **kw):
        return self.widget._repr_mimebundle_(**kw)

    @property
    def last_recipe(self):
        """The recipe of the last click that ran (or failed), None before the first."""
        return self._last[0] if self._last else None

    # ------------------------------------------------------------ the recipe the controls say

    def recipe(self, **changes):
        """The Recipe of the current settings (with `changes`); raises the recipe's ConfigError."""
        v = dict(nbits=self.nbits.value, granularity=self.granularity.value, group_size=self.group_size.value,
                 cluster_dim=self.cluster_dim.value, engine=self.engine.value)
        v.update(changes)
        if v["granularity"] == "per_tensor":
            v["group_size"] = None  # the group size control is disabled there: it does not apply
        if not self._uses_lut():
            v.update(_NO_LUT)  # the LUT controls are disabled for this family: they do not apply
        family = FAMILIES[self.family.value]
        return self.template.with_(**{**v, **_FAMILY_FIELDS, **family.get(self.choice.value, {})})

    def _uses_lut(self) -> bool:
        return self.family.value in ("palettize", "joint")

    def _problem(self, **changes) -> str | None:
        """Why these settings cannot run on this model, or None when they can."""
        from sdwork.compress.apply import check_fits

        try:
            check_fits(self.recipe(**changes), self.exp.pipe)
        except SdworkError as e:
            return str(e)
        return None

    # ------------------------------------------------------------ keeping the controls consistent

    def _changed(self, change):
        if self._syncing:
            return
        note = ""
        if change["owner"] is self.family:
            self._syncing = True
            _offer(self.choice, list(FAMILIES[self.family.value]))
            self._syncing = False
        if change["owner"] is self.cluster_dim:
            note = self._engine_for_cluster_dim()
        elif change["owner"] is self.engine:
            note = self._cluster_dim_for_engine()
        self._sync()
        self.note.value = note
        self.status.value = self._problem_html()

    def _engine_for_cluster_dim(self) -> str:
        """A cluster_dim the engine cannot run switches to the first engine that can."""
        problem = self._problem()
        if not problem:
            return ""
        for engine in self.engine.options:
            if engine != self.engine.value and not self._problem(engine=engine):
                old, self._syncing = self.engine.value, True
                self.engine.value, self._syncing = engine, False
                return _note(f"engine switched from {old} to {engine}: {old} cannot run "
                             f"cluster_dim={self.cluster_dim.value}")
        return ""

    def _cluster_dim_for_engine(self) -> str:
        """An engine that cannot run the cluster_dim sets cluster_dim back to 1."""
        if self.cluster_dim.value == 1 or not self._problem():
            return ""
        old, self._syncing = self.cluster_dim.value, True
        self.cluster_dim.value, self._syncing = 1, False
        return _note(f"cluster_dim set from {old} to 1: engine {self.engine.value} cannot run it")

    def _sync(self) -> None:
        """Offer only the group sizes and cluster_dims that compress a layer of this model."""
        self._syncing = True
        try:
            lut = self._uses_lut()
            for c in self.lut_controls:
                c.disabled = not lut or self._running
            self.choice.disabled = self._running or len(self.choice.options) < 2
            if not lut:
                return
            grouped = self.granularity.value == "per_grouped_channel"
            self.group_size.disabled = not grouped or self._running
            if grouped:
                _offer(self.group_size, [g for g in GROUP_SIZES if not self._problem(group_size=g, cluster_dim=1)])
            _offer(self.cluster_dim, [c for c in CLUSTER_DIMS if c == 1 or self._some_engine_runs(c)])
        finally:
            self._syncing = False

    def _some_engine_runs(self, cluster_dim) -> bool:
        """Whether some engine can run this cluster_dim with the other settings (picking it
        switches to that engine)."""
        return any(self._problem(cluster_dim=cluster_dim, engine=e) is None for e in self.engine.options)

    def _problem_html(self) -> str:
        problem = self._problem()
        return _error(problem) if problem else ""

    # ------------------------------------------------------------ running

    def run(self, _=None) -> None:
        """What the button does: run the settings' recipe once and show its images and metrics."""
        if self._running:  # a click delivered while a run is under way
            return
        try:
            recipe = self.recipe()
        except SdworkError as e:
            self.status.value = _error(str(e))
            return
        if self._last and self._last[0] == recipe:  # a double click, or nothing changed since
            self.status.value = self._last[1]
            return
        self._start()
        try:
            self.status.value = self._show(recipe)
        except SdworkError as e:  # the message names the fix: shown once, in the status line
            self.out.clear_output()
            self.status.value = _error(str(e))
        except Exception:
            self.status.value = _error("unexpected error (a bug in sdwork?): traceback below")
            with self.out:  # the Output widget shows the traceback where the user is looking
                raise
        finally:
            self._last = (recipe, self.status.value)
            self._stop()

    def _show(self, recipe) -> str:
        from IPython.display import Image, display

        from sdwork.report.figure import png
        from sdwork.report.plots import compare, metrics_table

        t0, progress = time.monotonic(), self.exp.progress
        self.exp.progress = False  # the bar above replaces sdwork's per-op bars here
        try:
            with quiet.capture() as mark, hooks.on("variant_compressed", self._step), \
                    hooks.on("variant_done", self._step):
                v = self.exp.run(recipe)
                self._stage(2)
                fig = compare(v)
                image = png(fig)
        finally:
            self.exp.progress = progress
        self.out.clear_output(wait=True)
        with self.out:
            display(metrics_table(v.row))
            display(Image(data=image, format="png"))
            if line := quiet.summary(mark):
                print(line)
        self.last_figure, self.runs = fig, self.runs + 1
        how = "read back from the results" if v.reused else f"ran in {time.monotonic() - t0:.1f} s"
        return _note(f"<b>{v.name}</b>: {v.row['size_bytes'] / 1e6:.2f} MB, PSNR {v.row['psnr']:.1f} dB ({how})")

    def _start(self) -> None:
        self._running = True
        for c in (*self.controls, self.button):
            c.disabled = True
        self.button.description = "Running..."
        self.progress.layout.visibility = "visible"
        self._stage(0)

    def _stop(self) -> None:
        self._running = False
        for c in (*self.controls, self.button):
            c.disabled = False
        self.button.description = "Run recipe"
        self.progress.layout.visibility = "hidden"
        self._sync()

    def _step(self, **_):
        self._stage(min(self.progress.value + 1, len(STAGES) - 1))

    def _stage(self, i: int) -> None:
        self.progress.value = i
        self.status.value = _note(f"{STAGES[i]}...")


def _offer(dropdown, options) -> None:
    """Set a dropdown's options, keeping its value when still offered."""
    options = list(options) or [dropdown.value]
    value = dropdown.value if dropdown.value in options else options[0]
    if list(dropdown.options) != options:
        dropdown.options = options
    dropdown.value = value


def _note(text: str) -> str:
    return f"<span style='color:#333'>{text}</span>"


def _error(text: str) -> str:
    import html

    return f"<span style='color:#b00020'><b>error:</b> {html.escape(text)}</span>"
