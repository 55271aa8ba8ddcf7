"""Palettizer speed, memory and weight error on a full-size SD 2.1-base UNet (random init).

Engines, each in its own subprocess (so peak RSS is its own, read with wait4):
  sdwork  - sdwork.kmeans1d.palettize_weight on every eligible weight (fp16, as Core ML holds it)
  ptp     - coremltools.optimize.torch PostTrainingPalettizer(...).compress() (torch side)
  coreml  - coremltools' Core ML side per-op computation (palettize_weights.blockwise_compress,
            what the palettize_weights graph pass runs per const) on --layers weights evenly
            spread over the model (first and last included),
            because the full run takes 13+ minutes at 4 bits and hours at 8 bits

Eligible weights: Conv2d/Linear weights with more than 2048 elements whose output channels the
group size divides (coremltools skips the rest). Every engine sees the same fp16-rounded values.
Wall and CPU time (all threads) cover the palettization calls only (not building the model,
not measuring the error); on a shared
machine CPU time is the steadier figure. Weight error per layer is
SSE / sum(w^2) against the fp16 weight; "mean rel MSE" averages that over layers.

    .venv/bin/python benchmarks/palettize_speed.py                 # 4-bit g=16 and 8-bit g=4
    .venv/bin/python benchmarks/palettize_speed.py --grid 4:16 6:8 --layers 4 --engines sdwork,coreml

End to end (--package): each grid point as a sweep runs it, sdwork.compress with engine
'sdwork' on a converted fp16 UNet package (make one with
`benchmarks/convert_full_unet.py --keep`): read, palettize, write the package, account its
size. Prints wall and CPU time, peak RSS, the package size and the layers left dense.

    .venv/bin/python benchmarks/palettize_speed.py --package runs/benchmarks/sd21-base-unet/Unet.mlpackage
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from sdwork import paths  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = paths.CONFIGS / "sd21-base" / "unet" / "config.json"
ENGINES = ("sdwork", "ptp", "coreml")


def build_unet(seed: int, group: int, subset: int = 0):
    """The UNet, fp16-rounded; with subset > 0 only its first `subset` eligible layers, in a ModuleDict.

    The subset is built on the meta device and only the chosen layers are materialised
    (default init, seeded per layer), so a loaded machine can still finish a comparison.
    """
    import torch
    from diffusers import UNet2DConditionModel

    config = json.loads(CONFIG.read_text())
    if subset:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        chosen = list(eligible(unet, group))[:subset]
        unet = torch.nn.ModuleDict({n.replace(".", "__"): m for n, m in chosen})
        for i, m in enumerate(unet.values()):
            m.to_empty(device="cpu")
            torch.manual_seed(seed + i)
            m.reset_parameters()
    else:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config)
    unet.eval()
    with torch.no_grad():
        for p in unet.parameters():  # every engine clusters the values Core ML would hold
            p.copy_(p.half().float())
    return unet


def eligible(unet, group: int):
    import torch

    for name, mod in unet.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            w = mod.weight
            if w.numel() > 2048 and w.shape[0] % group == 0:
                yield name, mod


def run_sdwork(unet, nbits, group, layers):
    import numpy as np
    from sdwork.compress import kmeans1d
    from sdwork.coreml.lut import lut_to_dense

    weights = [(n, m.weight.detach().half().numpy()) for n, m in eligible(unet, group)]
    del unet
    kmeans1d.palettize_weight(np.zeros((group, 8), np.float16), nbits, "per_grouped_channel", group)  # JIT warm-up
    rows = []
    for name, w in weights:
        t, c = time.perf_counter(), _cpu_seconds()
        lut, idx = kmeans1d.palettize_weight(w, nbits, "per_grouped_channel", group)
        dt, dc = time.perf_counter() - t, _cpu_seconds() - c
        rows.append(_row(name, w, lut_to_dense(lut, idx), dt, dc))
    return rows


def run_coreml(unet, nbits, group, layers):
    from coremltools.optimize.coreml._quantization_passes import palettize_weights as ct_pass

    weights = spread([(n, m.weight.detach().half().numpy()) for n, m in eligible(unet, group)], layers)
    del unet
    rows = []
    for name, w in weights:
        t, c = time.perf_counter(), _cpu_seconds()
        params = ct_pass.blockwise_compress(w, "KMEANS", nbits, [group] + [0] * (w.ndim - 1), channel_axis=0)
        dt, dc = time.perf_counter() - t, _cpu_seconds() - c
        rows.append(_row(name, w, ct_pass.decompress(params), dt, dc))
    return rows


def spread(items: list, n: int) -> list:
    """n items evenly spaced over the list (first and last included): a subset that samples every
    depth of the UNet, so its time extrapolates to the whole model (the first layers are all small)."""
    if n >= len(items):
        return items
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]


def run_ptp(unet, nbits, group, layers):
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    names = [n for n, _ in eligible(unet, group)]
    originals = {n: m.weight.detach().half().numpy() for n, m in eligible(unet, group)}
    module = {"n_bits": nbits, "granularity": "per_grouped_channel", "group_size": group}
    skip = {n: None for n, m in unet.named_modules() if hasattr(m, "weight") and n not in originals}
    config = PostTrainingPalettizerConfig.from_dict({"global_config": module, "module_name_configs": skip})
    t, c = time.perf_counter(), _cpu_seconds()
    out = PostTrainingPalettizer(unet, config).compress()
    dt, dc = time.perf_counter() - t, _cpu_seconds() - c
    mods = dict(out.named_modules())
    rows = [_row(n, originals[n], mods[n].weight.detach().half().numpy(), 0.0, 0.0) for n in names]
    rows[0]["t"], rows[0]["cpu"] = dt, dc  # only the total is known
    return rows


def _row(name, w, dense, dt, dc):
    import numpy as np

    w64 = w.astype(np.float64)
    return {"name": name, "numel": int(w.size), "t": dt, "cpu": dc,
            "sse": float(np.square(dense.astype(np.float16).astype(np.float64) - w64).sum()),
            "wsq": float(np.square(w64).sum())}


def _cpu_seconds():
    """CPU time of this process's threads and of any child processes it waited for."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def worker(args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # coremltools' k-means can hang with several threads
    unet = build_unet(args.seed, args.group, args.subset)
    run = {"sdwork": run_sdwork, "ptp": run_ptp, "coreml": run_coreml}[args.worker]
    rows = run(unet, args.nbits, args.group, args.layers)
    wall, cpu = sum(r["t"] for r in rows), sum(r["cpu"] for r in rows)  # palettization calls only
    Path(args.out).write_text(json.dumps({"wall": wall, "cpu": cpu, "rows": rows}))


def measure(engine, nbits, group, args):
    """Run one engine in a subprocess; (result dict, peak RSS in GiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, __file__, "--worker", engine, "--nbits", str(nbits), "--group", str(group),
               "--layers", str(args.layers), "--seed", str(args.seed), "--out", str(out),
               "--subset", str(args.subset)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
        log = Path(tmp) / "stderr.log"
        with log.open("wb") as err:  # a file, not a pipe: coremltools logs per layer and would fill a pipe and block
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise RuntimeError(f"{engine} failed:\n{log.read_text(errors='replace')[-3000:]}")
        return json.loads(out.read_text()), usage.ru_maxrss / 2**20


def mean_rel_mse(rows):
    return sum(r["sse"] / r["wsq"] for r in rows) / len(rows)


def report(nbits, group, results, layers):
    print(f"\n== {nbits}-bit per_grouped_channel g={group} ==")
    print(f"{'engine':8s} {'layers':>6s} {'wall s':>9s} {'cpu s':>9s} {'peak GiB':>9s} {'mean rel MSE':>13s}")
    for engine, (res, rss) in results.items():
        print(f"{engine:8s} {len(res['rows']):6d} {res['wall']:9.1f} {res['cpu']:9.1f} {rss:9.2f} "
              f"{mean_rel_mse(res['rows']):13.4e}")
    if "sdwork" not in results:
        return
    sd, sd_rss = results["sdwork"]
    if "ptp" in results:
        pt, pt_rss = results["ptp"]
        print(f"ptp / sdwork: wall {pt['wall'] / sd['wall']:.2f}x  cpu {pt['cpu'] / sd['cpu']:.2f}x  peak memory {pt_rss / sd_rss:.2f}x  "
              f"mean rel MSE {mean_rel_mse(pt['rows']) / mean_rel_mse(sd['rows']):.4f}x")
    if "coreml" in results:
        cm = results["coreml"][0]
        chosen = {r["name"] for r in cm["rows"]}
        sub = [r for r in sd["rows"] if r["name"] in chosen]
        t_sub, c_sub = sum(r["t"] for r in sub), sum(r["cpu"] for r in sub)
        print(f"coreml / sdwork on {len(sub)} layers spread over the model: wall {cm['wall'] / t_sub:.2f}x  "
              f"cpu {cm['cpu'] / c_sub:.2f}x  "
              f"mean rel MSE {mean_rel_mse(cm['rows']) / mean_rel_mse(sub):.4f}x  "
              f"(sdwork {t_sub:.2f} s there; full-model coreml extrapolated "
              f"{cm['wall'] / t_sub * sd['wall']:.0f} s)")


def end_to_end(package: Path, nbits: int, group: int) -> dict:
    """One recipe through sdwork.compress on a converted package, in this process (peak RSS reset first)."""
    from sdwork.compress.apply import compress, uncompressed_layers
    from sdwork.compress.recipe import Recipe

    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS count here
    except OSError:
        pass
    recipe = Recipe(nbits=nbits, granularity="per_grouped_channel", group_size=group, components=("unet",),
                    engine="sdwork")
    with tempfile.TemporaryDirectory(dir=package.parent) as tmp:
        t, c = time.perf_counter(), _cpu_seconds()
        result = compress(recipe, {"unet": package}, tmp, progress=False)
        wall, cpu = time.perf_counter() - t, _cpu_seconds() - c
        dense = uncompressed_layers(result)
        size = result.sizes["unet"].package_bytes
    peak = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 2**20
    return dict(recipe=recipe.name, wall=wall, cpu=cpu, engine_wall=result.seconds, peak_gib=peak,
                size_gib=size / 2**30, fp16_gib=sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) / 2**30,
                dense_layers=len(dense))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", nargs="+", default=["4:16", "8:4"], help="nbits:group_size points")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--layers", type=int, default=6, help="layers for the Core ML side subset (evenly spread over the model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", type=int, default=0,
                    help="every engine on the first N eligible layers only (0: the whole UNet)")
    ap.add_argument("--package", type=Path, help="end to end on this converted fp16 UNet .mlpackage instead")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--nbits", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--group", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.package:
        if not (args.package / "Manifest.json").exists():
            ap.error(f"{args.package} is not an .mlpackage; make one with benchmarks/convert_full_unet.py --keep")
        for point in args.grid:
            r = end_to_end(args.package, *(int(v) for v in point.split(":")))
            print(f"{r['recipe']}: {r['wall']:.1f} s wall ({r['engine_wall']:.1f} s palettize + write), "
                  f"{r['cpu']:.1f} s CPU, peak {r['peak_gib']:.2f} GiB, package {r['fp16_gib']:.2f} -> "
                  f"{r['size_gib']:.3f} GiB, {r['dense_layers']} weights left dense", flush=True)
        return
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    scope = f"first {args.subset} eligible layers of the " if args.subset else ""
    print(f"{scope}SD 2.1-base UNet (random init, seed {args.seed}) from {CONFIG.relative_to(paths.PACKAGE.parent)}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    for point in args.grid:
        nbits, group = (int(v) for v in point.split(":"))
        results = {}
        for engine in engines:
            results[engine] = measure(engine, nbits, group, args)
            res, rss = results[engine]
            print(f"  {engine} done: {len(res['rows'])} layers, wall {res['wall']:.1f} s, cpu {res['cpu']:.1f} s, "
                  f"peak {rss:.2f} GiB, mean rel MSE {mean_rel_mse(res['rows']):.4e}, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
        report(nbits, group, results, args.layers)


if __name__ == "__main__":
    main()
