"""The prediction-similarity layer (Echeberria-Barrio et al. 2020 §4.3): per-user history, distance and prediction
alarms, actions, ageing out, and its evaluation against a query attack, adaptive (Sybil) included."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from skimage.metrics import peak_signal_noise_ratio
from torch import nn

from adv.detectors import PredictionSimilarityLayer, QueryHistory, SimilarityConfig
from adv.evaluate.query_detection import evaluate_query_detection
from tests.test_defenses_helpers import one_thread, sample_batch, trained_classifier  # noqa: F401


class Brightness(nn.Module):
    """Two classes: 0 for dark images, 1 for bright ones; the logit gap grows with the mean pixel."""

    def forward(self, x):
        m = x.flatten(1).mean(1) - 0.5
        return torch.stack([-10 * m, 10 * m], dim=1)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_repeated_near_duplicates_raise_the_distance_alarm_of_that_user_only():
    layer = PredictionSimilarityLayer(Brightness(), SimilarityConfig(metric="mse", distance_alarm_limit=3,
                                                                     action="flag"))
    base = _images(1)
    burst = (base + 0.01 * torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    _, decisions = layer(burst, ["mallory"] * 5)
    assert [d.distance_alarms for d in decisions] == [0, 1, 2, 3, 4]
    assert [d.suspicious for d in decisions] == [False, False, False, True, True]
    assert decisions[0].nearest is None and decisions[1].nearest < 0.003
    _, others = layer(torch.cat([base, _images(3, seed=2)]), ["alice"] * 4)  # same image, another user's history
    assert all(d.distance_alarms == 0 and not d.suspicious for d in others)
    assert decisions[-1].score == pytest.approx(4 / 5)


def test_prediction_alarm_counts_near_duplicates_that_lower_the_earlier_class_probability():
    layer = PredictionSimilarityLayer(Brightness(), SimilarityConfig(metric="psnr", threshold=30,
                                                                     prediction_alarm_limit=2, action="flag"))
    walk = torch.full((4, 1, 8, 8), 0.70) - torch.arange(4).float().view(4, 1, 1, 1) * 0.01  # toward class 0
    _, decisions = layer(walk, ["eve"] * 4)
    assert [d.prediction_alarms for d in decisions] == [0, 1, 2, 3]
    assert [d.suspicious for d in decisions] == [False, False, True, True]
    assert decisions[1].nearest == pytest.approx(peak_signal_noise_ratio(
        walk[0].numpy(), walk[1].numpy(), data_range=1.0), rel=1e-5)
    back = PredictionSimilarityLayer(Brightness(), SimilarityConfig(metric="psnr", threshold=30))
    _, up = back(walk.flip(0), ["eve"] * 4)  # confidence rising: near-duplicates, but no prediction alarm
    assert all(d.prediction_alarms == 0 for d in up) and up[-1].distance_alarms == 3


@pytest.mark.parametrize("action", ["flag", "deceive", "block", "fallback"])
def test_actions_decide_what_a_suspicious_user_is_served(action):
    fallback = nn.Sequential(Brightness(), nn.Flatten())  # same answers as the model, a different object
    cfg = SimilarityConfig(metric="mse", distance_alarm_limit=1, action=action)
    layer = PredictionSimilarityLayer(Brightness(), cfg, fallback=fallback)
    x = torch.full((2, 1, 8, 8), 0.8)
    served, (first, second) = layer(x, ["u", "u"])
    assert first.action == "none" and first.returned == first.predicted == 1
    assert second.suspicious and second.action == action
    truth = Brightness()(x[1:]).softmax(1)[0]
    if action in ("flag", "fallback"):
        assert second.returned == 1 and torch.allclose(served[1], truth)
    elif action == "deceive":  # another class, with the top two probabilities swapped
        assert second.returned == 0 and torch.allclose(served[1], truth.flip(0))
    else:
        assert second.returned == -1 and torch.allclose(served[1], torch.full((2,), 0.5))


def test_alarms_age_out_of_the_bounded_history():
    layer = PredictionSimilarityLayer(Brightness(), SimilarityConfig(metric="mse", history=3, distance_alarm_limit=2))
    same = torch.full((3, 1, 8, 8), 0.3)
    _, burst = layer(same, ["u"] * 3)
    assert burst[-1].suspicious
    _, later = layer(_images(3, seed=5), ["u"] * 3)  # three distinct images push the burst out
    assert [d.distance_alarms for d in later] == [2, 1, 0] and not later[-1].suspicious
    assert len(layer.history) == 1 and layer.history.users() == ["u"]


def test_bad_config_and_bad_queries_are_clear_errors():
    with pytest.raises(ValidationError, match="threshold"):
        SimilarityConfig(metric="ssim", threshold=1.5)
    with pytest.raises(ValidationError, match="extra"):
        SimilarityConfig(metrc="mse")
    with pytest.raises(ValueError, match="fallback model"):
        PredictionSimilarityLayer(Brightness(), SimilarityConfig(action="fallback"))
    layer = PredictionSimilarityLayer(Brightness())
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        layer(torch.rand(8, 8), ["u"])
    with pytest.raises(ValueError, match="users"):
        layer(_images(2), ["u"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        layer(_images(1) * 255, ["u"])
    layer(_images(1), ["u"])
    with pytest.raises(ValueError, match="history holds"):
        layer(torch.rand(1, 3, 8, 8), ["u"])
    assert SimilarityConfig(metric="psnr").threshold == 25.0
    assert QueryHistory(4).capacity == 4


def test_square_attack_is_detected_and_misled_but_enough_sybil_accounts_evade():
    clf = trained_classifier().train()  # the caller's mode comes back as it was (lenet5: no mode-dependent layers)
    x, y = sample_batch(40)
    cfg = SimilarityConfig(metric="mse")
    common = dict(config=cfg, attack="square", eps=0.05, queries=300, benign=x[8:], benign_users=8)
    one = evaluate_query_detection(clf, x[:8], y[:8], **common)
    assert clf.training and all(m.training for m in clf.modules())
    assert one.threat_model.startswith("non-adaptive")
    assert one.detection_rate >= 0.75 and one.median_queries_to_detection <= 2 * cfg.distance_alarm_limit
    assert one.true_success_without_layer > 0
    assert one.true_success_with_layer < one.true_success_without_layer  # deceived attackers stop early
    assert one.false_positive_rate == 0.0
    sybil = evaluate_query_detection(clf, x[:8], y[:8], accounts=300, **common)
    assert sybil.threat_model.startswith("adaptive")
    assert sybil.detection_rate == 0.0 and sybil.true_success_with_layer == sybil.true_success_without_layer
    with pytest.raises(ValueError, match="query-based"):
        evaluate_query_detection(clf, x[:2], y[:2], attack="pgd")
