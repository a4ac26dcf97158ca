"""Everything that flags inputs.

* Per-input detectors compose into a defended model, ``Defended(..., detector=...)``,
  and are registered as ``kind="detector"`` in the stage registry: the
  encoder-disagreement detector (:mod:`adv.detectors.disagreement`,
  Echeberria-Barrio et al. 2020 Fig. 8) and AdvD on salient/trivial features
  (:mod:`adv.detectors.advd`, Khoshbakht et al. 2024 after Chen et al. 2021).
* Query-stream detectors watch a sequence of queries for query-based attacks:
  the per-user prediction-similarity layer (:mod:`adv.detectors.query_similarity`,
  Echeberria-Barrio et al. 2020 §4.3). Their evaluation is
  :mod:`adv.evaluate.query_detection`.
"""

from adv.detectors import advd, disagreement  # noqa: F401  (registers the detectors)
from adv.detectors.query_similarity import (
    ACTIONS,
    DEFAULT_THRESHOLDS,
    METRICS,
    PredictionSimilarityLayer,
    QueryDecision,
    QueryHistory,
    SimilarityConfig,
)

__all__ = [
    "ACTIONS", "DEFAULT_THRESHOLDS", "METRICS", "PredictionSimilarityLayer", "QueryDecision", "QueryHistory",
    "SimilarityConfig",
]
