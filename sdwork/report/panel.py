"""The notebook's recipe panel: widgets that re-run `Experiment.run` for the settings picked."""
from __future__ import annotations

from sdwork.errors import SdworkError


def recipe_panel(exp, template):
    """ipywidgets: pick bits, granularity, group size, cluster_dim; the button calls exp.run (what the
    notebook's plain cell ran) and shows the variant's images and metrics."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    from sdwork.compress.recipe import NBITS
    from sdwork.report.plots import compare, metrics_table

    nbits = w.Dropdown(options=NBITS, value=template.nbits, description="bits")
    gran = w.Dropdown(options=["per_tensor", "per_grouped_channel"], value=template.granularity,
                      description="granularity")
    group = w.Dropdown(options=[4, 8, 16, 32, 64], value=template.group_size or 16, description="group size")
    cdim = w.Dropdown(options=[1, 2, 4], value=template.cluster_dim, description="cluster_dim")
    engine = w.Dropdown(options=["coremltools", "sdwork", "torch"], value=template.engine, description="engine")
    button, out = w.Button(description="Run recipe", button_style="primary"), w.Output()

    def run(_):
        out.clear_output()
        with out:
            try:
                grouped = gran.value == "per_grouped_channel"
                recipe = template.with_(nbits=nbits.value, granularity=gran.value,
                                        group_size=group.value if grouped else None, cluster_dim=cdim.value,
                                        engine=engine.value)
                print(f"running {recipe.name} ...")
                v = exp.run(recipe)
            except SdworkError as e:  # widget callbacks swallow exceptions: show ours, raise the rest
                print(f"error: {e}")
                return
            display(metrics_table(v.row))
            fig = compare(v)
            display(fig)
            plt.close(fig)

    button.on_click(run)
    return w.VBox([w.HBox([nbits, gran]), w.HBox([group, cdim]), engine, button, out])
