"""ternet: Numba-accelerated CPU inference for PROM-quantized CNNs.

    import ternet
    model = ternet.load("efficientnet_lite0_prom")
    model.classify("cat.jpg", top_k=5)

Importing ternet is cheap: numba is imported (never compiled) only when a model is loaded.
"""
from .errors import ModelFormatError

__version__ = "0.1.0"
__all__ = ["load", "convert", "Model", "ModelFormatError", "__version__"]


def load(name_or_path, threads=None, kernels=None):
    """Load a bundled model by name or a model file by path; see `ternet.model.Model`."""
    from .model import load as _load
    return _load(name_or_path, threads=threads, kernels=kernels)


def convert(model, out, **options):
    """Convert a quantized .tflite or ONNX QDQ classifier into a ternet model file (needs the
    `convert` extra); see `ternet.conversion.convert` for the options, docs/convert.md for the rules."""
    from .conversion import convert as _convert
    return _convert(model, out, **options)


def __getattr__(name):
    if name == "Model":
        from .model import Model
        return Model
    raise AttributeError(f"module 'ternet' has no attribute {name!r}")
