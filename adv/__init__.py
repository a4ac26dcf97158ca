"""adv: adversarial-robustness evaluation for image classifiers.

The library is pure PyTorch/numpy and never imports Ray; the Ray entrypoints
live in ``jobs/`` and the serving module.
"""

__version__ = "0.1.0"

__all__ = ["benchmark"]


def __getattr__(name: str):
    # Lazy: ``import adv`` stays cheap (no torch import) until the one-call benchmark is used.
    if name == "benchmark":
        from adv.evaluate.benchmark import benchmark

        return benchmark
    raise AttributeError(f"module 'adv' has no attribute {name!r}")
