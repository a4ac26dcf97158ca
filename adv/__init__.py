"""adv: adversarial-robustness evaluation for image classifiers.

The library is pure PyTorch/numpy and never imports Ray; the Ray entrypoints
live in ``jobs/`` and the serving module.
"""

__version__ = "0.1.0"
