"""Detectors that watch a stream of queries rather than one input.

The per-input encoder-disagreement detector (seed 002 Fig. 8) composes into a
defended model, so it lives with the defenses (:mod:`adv.defenses.detectors`).
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
from adv.detectors.query_eval import MonitoredOracle, QueryDetectionResult, evaluate_query_detection

__all__ = [
    "ACTIONS", "DEFAULT_THRESHOLDS", "METRICS", "MonitoredOracle", "PredictionSimilarityLayer", "QueryDecision",
    "QueryDetectionResult", "QueryHistory", "SimilarityConfig", "evaluate_query_detection",
]
