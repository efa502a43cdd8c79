"""quantkit: post-training quantization, conversion and evaluation of Hugging Face causal LMs."""

from quantkit.version import __version__

__all__ = ["__version__", "quantize", "load"]


def __getattr__(name: str):
    # Lazy: `import quantkit` stays cheap (the CLI imports torch/transformers only when a command needs them).
    if name in ("quantize", "load"):
        from quantkit import api

        return getattr(api, name)
    raise AttributeError(name)
