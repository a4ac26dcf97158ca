"""Everything that flags inputs.

* Per-input detectors compose into a defended model, ``Defended(..., detector=...)``,
  so they are stages of :mod:`adv.defenses` (``kind="detector"`` in the stage registry):
  the encoder-disagreement detector (:mod:`adv.defenses.disagreement`,
  Echeberria-Barrio et al. 2020 Fig. 8) and AdvD on salient/trivial features
  (:mod:`adv.defenses.advd`, Khoshbakht et al. 2024 after Chen et al. 2021).
  They live there so that registering them never makes the defenses import this package.
* Query-stream detectors watch a sequence of queries for query-based attacks:
  the per-user prediction-similarity layer (:mod:`adv.detectors.query_similarity`,
  Echeberria-Barrio et al. 2020 §4.3), the account-agnostic fingerprint index
  (:mod:`adv.detectors.fingerprint`, Li et al. 2022 "Blacklight"), the
  transform-robust feature index (:mod:`adv.detectors.feature_index`), and
  :class:`QueryDetector`, which combines them, is thread-safe and keeps durable
  state (:mod:`adv.detectors.state`). Their evaluation is
  :mod:`adv.evaluate.query_detection`.
"""

from adv.detectors.query_similarity import (
    ACTIONS,
    DEFAULT_THRESHOLDS,
    METRICS,
    PredictionSimilarityLayer,
    QueryDecision,
    QueryHistory,
    SimilarityConfig,
)
from adv.detectors.detector import QUERY_DETECTORS, Decision, DetectorConfig, QueryDetector
from adv.detectors.feature_index import FeatureIndex, FeatureIndexConfig
from adv.detectors.fingerprint import FingerprintIndex, IndexConfig
from adv.detectors.state import StateError

__all__ = [
    "ACTIONS", "DEFAULT_THRESHOLDS", "Decision", "DetectorConfig", "FeatureIndex", "FeatureIndexConfig",
    "FingerprintIndex", "IndexConfig", "METRICS",
    "PredictionSimilarityLayer", "QUERY_DETECTORS", "QueryDecision", "QueryDetector", "QueryHistory",
    "SimilarityConfig", "StateError",
]
