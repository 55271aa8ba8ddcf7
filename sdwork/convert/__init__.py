"""Core ML conversion of a diffusers Stable Diffusion pipeline, verified on any platform.

    paths = convert_pipeline(pipe, "runs/convert/tiny")      # TextEncoder/Unet/VAEDecoder/VAEEncoder.mlpackage
    convert_pipeline(pipe, out, attention="split_einsum_v2", chunks=2)   # Neural Engine UNet, in two chunks
    load_weight_map(paths["unet"])                             # {torch parameter: const name}
    package_weights(paths["unet"])                             # {const name: exact (decompressed) values}
    load_packages_into_pipeline(pipe, paths)                   # run a package's weights in PyTorch
"""
from sdwork.convert.components import COMPONENTS, SPECS
from sdwork.convert.export import convert_component, convert_pipeline, unet_chunks
from sdwork.convert.into_torch import PackageMismatchError, load_packages_into_pipeline
from sdwork.coreml.package import PackageError, package_size, package_weights
from sdwork.coreml.tables import io_table, package_table
from sdwork.convert.weightmap import WeightMapError, load_weight_map, read_weight_map

__all__ = [
    "COMPONENTS", "SPECS", "convert_component", "convert_pipeline", "unet_chunks", "load_packages_into_pipeline",
    "PackageError", "PackageMismatchError", "package_size", "package_weights",
    "io_table", "package_table", "WeightMapError", "load_weight_map", "read_weight_map",
]
