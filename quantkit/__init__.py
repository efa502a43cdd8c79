"""quantkit: post-training quantization, conversion and evaluation of Hugging Face causal LMs."""

from quantkit.version import __version__

__all__ = ["__version__", "quantize", "load"]


def __getattr__(name: str):
    # Lazy: `import quantkit` stays cheap (the CLI imports torch/transformers only when a command needs them).
    if name == "quantize":
        from quantkit.api import quantize

        return quantize
    if name == "load":
        from quantkit.loading import load

        return load
    raise AttributeError(name)
