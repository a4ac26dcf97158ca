"""Metrics match their reference implementations (skimage.metrics, sklearn.metrics) and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import roc_auc_score

from adv.metrics import accuracy, attack_success_rate, detection_metrics, image_quality, perturbation_norms


def test_accuracy_and_attack_success_rate_on_known_values():
    y = torch.tensor([0, 1, 2, 3])
    clean = torch.tensor([0, 1, 2, 0])  # 3 of 4 correct
    adv = torch.tensor([1, 1, 0, 0])  # flips 2 of the 3 correct ones
    assert accuracy(clean, y) == 0.75 and math.isnan(accuracy(y[:0], y[:0]))
    assert attack_success_rate(clean, adv, y) == pytest.approx(2 / 3)
    assert attack_success_rate(clean, adv, y, y_target=torch.tensor([1, 0, 0, 0])) == pytest.approx(2 / 3)
    assert math.isnan(attack_success_rate(torch.tensor([1]), torch.tensor([1]), torch.tensor([0])))


def test_perturbation_norms_match_torch_norms():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 8, 8)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] += 0.5
    x_adv[1] += 0.01 * torch.randn(3, 8, 8)
    norms = perturbation_norms(x, x_adv)
    delta = (x_adv - x).flatten(1)
    assert torch.equal(norms["l0"], torch.tensor([1.0, 192.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(norms["l2"], torch.linalg.vector_norm(delta, ord=2, dim=1))
    assert torch.allclose(norms["linf"], torch.linalg.vector_norm(delta, ord=float("inf"), dim=1))


def test_one_perturbation_norm_serves_metrics_checks_and_attacks():
    from adv.attacks.core import perturbation_norm
    from adv.evaluate.checks import check_ball

    x = torch.zeros(2, 1, 2, 2)
    x_adv = x.clone()
    x_adv[0, 0, 0] = 0.3  # two values of 0.3: L2 0.3*sqrt(2), Linf 0.3
    assert {k: v.tolist() for k, v in perturbation_norms(x, x_adv).items()} == {
        k: perturbation_norm(x, x_adv, k).tolist() for k in ("l0", "l2", "linf")}
    assert perturbation_norm(x, x_adv, "l2")[0].item() == pytest.approx(0.3 * math.sqrt(2))
    assert check_ball(x_adv, x, 0.3, "linf", "a") == []
    assert check_ball(x_adv, x, 0.3, "l2", "a")[0].code == "out_of_ball"
    with pytest.raises(ValueError, match="norm must be one of"):
        perturbation_norm(x, x_adv, "l1")


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (3, 3, 32, 32), (2, 1, 5, 5)])
def test_image_quality_matches_skimage(shape):
    rng = np.random.default_rng(0)
    a = rng.random(shape)
    b = np.clip(a + 0.05 * rng.standard_normal(shape), 0, 1)
    q = image_quality(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    for i in range(shape[0]):
        ai, bi = a[i].astype(np.float32).astype(np.float64).transpose(1, 2, 0), b[i].astype(np.float32).astype(
            np.float64).transpose(1, 2, 0)
        win = min(7, shape[2]) - (1 - min(7, shape[2]) % 2)
        assert q["mse"][i] == pytest.approx(mean_squared_error(ai, bi), abs=1e-4)
        assert q["psnr"][i] == pytest.approx(peak_signal_noise_ratio(ai, bi, data_range=1.0), abs=1e-4)
        ref = structural_similarity(ai, bi, data_range=1.0, channel_axis=2, win_size=win)
        assert q["ssim"][i] == pytest.approx(ref, abs=1e-4)


def test_image_quality_known_values_and_errors():
    x = torch.full((2, 1, 8, 8), 0.5)
    q = image_quality(x, x + 0.1)  # MSE 0.01 -> PSNR 20 dB
    assert np.allclose(q["mse"], 0.01) and np.allclose(q["psnr"], 20.0)
    same = image_quality(x, x)
    assert np.all(np.isinf(same["psnr"])) and np.allclose(same["ssim"], 1.0) and np.all(same["mse"] == 0)
    with pytest.raises(ValueError, match="equal shape"):
        image_quality(x, x[:1])


def test_detection_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    is_adv = rng.random(200) < 0.4
    scores = rng.random(200) + 0.5 * is_adv
    flags = scores > 0.7
    m = detection_metrics(scores, is_adv, flags)
    assert m["auroc"] == pytest.approx(roc_auc_score(is_adv, scores))
    assert m["tpr"] == pytest.approx(flags[is_adv].sum() / is_adv.sum())
    assert m["fpr"] == pytest.approx(flags[~is_adv].sum() / (~is_adv).sum())
    one_class = detection_metrics(scores[:5], np.ones(5, bool), flags[:5])
    assert math.isnan(one_class["auroc"]) and math.isnan(one_class["fpr"])
