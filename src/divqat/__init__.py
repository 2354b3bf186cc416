"""divqat: protect quantized image classifiers against model stealing, and measure it.

DivQAT quantization-aware training, output-perturbation defenses behind a black-box query
boundary, and real extraction attacks in front of it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    # Written once, in pyproject.toml; an installed (or editable) divqat carries it.
    __version__ = version("divqat")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"


def load_victim(path, device: str = "cpu", compile=None, key_file=None):
    """Load a victim directory written by ``divqat train``, or a device program written by
    ``divqat export``; see ``divqat.victim.load_victim``."""
    from divqat.victim import load_victim as _load

    return _load(path, device=device, compile=compile, key_file=key_file)


__all__ = ["__version__", "load_victim"]
