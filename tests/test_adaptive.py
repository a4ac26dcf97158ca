"""Adaptive evaluation: BPDA is straight-through, EOT averages, gradients flow through whole pipelines,
the detector-aware attack evades the detector, and every evaluation names its threat model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adv.evaluate.adaptive import BPDA, EOT, adaptive_model, detector_aware_attack
from adv.attacks import get_attack
from adv.defenses import Defended, create_defense, save_stage
from adv.evaluate.threat import build_evaluated_model
from tests.test_defenses_helpers import (  # noqa: F401  (one_thread: autouse fixture)
    FAST, digits, one_thread, sample_batch, single_thread, trained_classifier,
)


def _input_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return grad


@pytest.mark.parametrize("spec", ["dwt:level=2", "quantize:bits=3"])
def test_bpda_forward_is_the_stage_and_backward_is_the_identity(spec):
    stage = create_defense(spec)
    x = torch.rand(3, 1, 16, 16, requires_grad=True)
    out = BPDA(stage)(x)
    assert torch.equal(out, stage(x.detach()))
    w = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    assert torch.equal(grad, w)  # d/dx <w, x> = w: straight-through


def test_adaptive_model_gives_gradients_where_the_raw_pipeline_gives_none():
    clf = trained_classifier()
    x, y = sample_batch(16)
    defended = Defended(create_defense("dwt:level=2"), clf)
    raw = x.clone().requires_grad_(True)
    (none,) = torch.autograd.grad(F.cross_entropy(defended(raw), y), raw, allow_unused=True)
    assert none is None  # numpy stage: the graph stops before the input
    grad = _input_grad(adaptive_model(defended), x, y)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    with torch.no_grad():  # BPDA changes only the backward pass
        assert torch.equal(adaptive_model(defended)(x), defended(x))


def test_adaptive_model_differentiates_through_learned_stages():
    clf = trained_classifier()
    x, y = sample_batch(8)
    defended = Defended(create_defense("unet:width=0.25", classifier=clf), clf, allow_untrained=True)
    model = adaptive_model(defended)
    assert not isinstance(model, EOT)
    grad = _input_grad(model, x, y)
    assert grad.shape == x.shape and grad.abs().sum() > 0


def test_eot_is_the_mean_of_seeded_draws_and_the_identity_on_deterministic_models():
    clf = trained_classifier()
    x, y = sample_batch(8)
    assert torch.allclose(_input_grad(EOT(clf, samples=4), x, y), _input_grad(clf, x, y), atol=1e-6)
    defended = Defended(create_defense("noise:noise_std=0.2"), clf)
    model = adaptive_model(defended, eot_samples=5)
    assert isinstance(model, EOT) and model.samples == 5
    torch.manual_seed(3)
    grad = _input_grad(model, x, y)
    torch.manual_seed(3)
    xs = x.clone().requires_grad_(True)
    mean_logits = torch.stack([defended(xs) for _ in range(5)]).mean(0)
    (manual,) = torch.autograd.grad(F.cross_entropy(mean_logits, y), xs)
    assert torch.allclose(grad, manual, atol=1e-6) and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="samples"):
        EOT(clf, samples=0)


def test_adaptive_attack_beats_the_non_adaptive_protocol_on_dwt():
    clf = trained_classifier()
    x, y = sample_batch(128)
    spec = ["dwt:method=VisuShrink,noise_sigma=0.2,level=2"]  # strong enough to help against transferred adversarials
    non_adaptive = build_evaluated_model(clf, spec)
    adaptive = build_evaluated_model(clf, spec, adaptive=True)
    kw = dict(eps=0.1, steps=10, seed=0)
    acc = {}
    for ev in (non_adaptive, adaptive):
        x_adv = ev.attack("pgd", x, y, **kw)
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
        with torch.no_grad():
            acc[ev.threat] = (ev.defended(x_adv).argmax(1) == y).float().mean().item()
    assert acc["adaptive"] < acc["non-adaptive"]
    assert non_adaptive.describe()["threat_model"] == "non-adaptive"
    assert "BPDA" in " ".join(adaptive.describe()["notes"]) and adaptive.describe()["threat_model"] == "adaptive"


def test_non_adaptive_adversarials_are_crafted_on_the_source_model():
    clf, other = trained_classifier(), trained_classifier()
    x, y = sample_batch(16)
    ev = build_evaluated_model(clf, ["quantize"], source=other)
    assert ev.attack_target is other
    assert torch.equal(ev.attack("fgsm", x, y, eps=0.1), get_attack("fgsm")(other, x, y, eps=0.1))


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory):
    clf = trained_classifier()
    with single_thread():
        det = create_defense(f"disagreement:epochs=2,{FAST}", classifier=clf, data=digits("train"))
    return save_stage(tmp_path_factory.mktemp("det") / "det.pt", det)


@pytest.fixture()
def with_detector(detector_file):
    clf = trained_classifier()
    return Defended(None, clf, create_defense(f"disagreement:checkpoint={detector_file}", classifier=clf))


def _evasion(defended, x, x_adv, y) -> float:
    """Fraction of points: classified correctly on x, wrong on x_adv, and not flagged."""
    with torch.no_grad():
        ok = defended(x).argmax(1) == y
        fooled = defended(x_adv).argmax(1) != y
        return (ok & fooled & ~defended.detect(x_adv)).float().mean().item()


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_detector_aware_attack_evades_more_often_than_attacking_the_classifier(with_detector, attack):
    x, y = sample_batch(128, seed=1)
    kw = {"steps": 10, "seed": 0} if attack == "pgd" else {}
    gains = []
    for eps in (0.05, 0.1, 0.2):
        plain = get_attack(attack)(with_detector.classifier, x, y, eps=eps, **kw)
        joint = detector_aware_attack(with_detector, x, y, attack=attack, eps=eps, **kw)
        assert (joint - x).abs().max() <= eps + 1e-6 and 0 <= joint.min() and joint.max() <= 1
        gains.append(_evasion(with_detector, x, joint, y) - _evasion(with_detector, x, plain, y))
    assert min(gains) >= 0 and sum(gains) > 0  # never weaker (worst case per example), stronger somewhere


def test_evaluated_model_routes_adaptive_attacks_to_the_joint_loss(with_detector, detector_file):
    x, y = sample_batch(16)
    clf = with_detector.classifier
    ev = build_evaluated_model(clf, [], adaptive=True, detector=f"disagreement:checkpoint={detector_file}")
    assert ev.describe()["detector"].startswith("disagreement") and "detector-aware" in ev.describe()[
        "adversarials_crafted_on"]
    kw = dict(eps=0.2, steps=5, seed=0)
    assert torch.equal(ev.attack("pgd", x, y, **kw), detector_aware_attack(ev.defended, x, y, attack="pgd", **kw))
    plain = build_evaluated_model(clf, [], detector=f"disagreement:checkpoint={detector_file}")
    assert torch.equal(plain.attack("pgd", x, y, **kw), get_attack("pgd")(clf, x, y, **kw))


def test_craft_is_the_one_dispatch_for_both_families_and_both_threat_models(with_detector, detector_file):
    from adv.evaluate.threat import evaluated_model

    x, y = sample_batch(8)
    clf = with_detector.classifier
    ev = build_evaluated_model(clf, [], adaptive=True, detector=f"disagreement:checkpoint={detector_file}")
    x_adv, queries = ev.craft("square", x, y, eps=0.1, queries=20, seed=0)
    expected, counted = get_attack("square")(ev.defended, x, y, eps=0.1, queries=20, seed=0)
    assert torch.equal(x_adv, expected) and torch.equal(queries, counted)  # queries the defended pipeline
    joint, none = ev.craft("fgsm", x, y, eps=0.1, loss="ce")  # a keyword the joint loss does not take is dropped
    assert none is None and torch.equal(joint, detector_aware_attack(ev.defended, x, y, attack="fgsm", eps=0.1))
    assert ev.joint("pgd") and not ev.joint("pgd_cw") and not ev.on_target("bim") and ev.on_target("deepfool")
    source = evaluated_model(ev.defended, adaptive=False, source=clf)
    assert source.threat == "non-adaptive" and not source.joint("pgd") and not source.on_target("pgd")
    assert torch.equal(source.attack("fgsm", x, y, eps=0.1), get_attack("fgsm")(clf, x, y, eps=0.1))


def test_non_adaptive_query_attacks_in_the_loop_query_the_source_and_report_queries():
    from adv.evaluate import robust_accuracy, robust_accuracy_inputs

    clf = trained_classifier()
    x, y = sample_batch(16)
    ev = build_evaluated_model(clf, ["quantize:bits=2"])
    model, attacks = robust_accuracy_inputs(ev, [("square", {"queries": 20}), ("fgsm", {})])
    res = robust_accuracy(model, (x, y), attacks, eps=0.1, progress=False, checks=())
    square, fgsm = res.attacks
    assert (square.label, square.family, fgsm.label, fgsm.family) == (
        "square@undefended", "query", "fgsm@undefended", "whitebox")
    assert square.n_attacked > 0 and square.mean_queries > 0


def test_detector_aware_attack_rejects_bad_arguments(with_detector):
    x, y = sample_batch(4)
    with pytest.raises(ValueError, match="attack must be one of"):
        detector_aware_attack(with_detector, x, y, attack="cw", eps=0.1)
    with pytest.raises(ValueError, match="disagreement detector"):
        detector_aware_attack(Defended(None, with_detector.classifier), x, y, eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        detector_aware_attack(with_detector, x, y, eps=-1)
    assert torch.equal(detector_aware_attack(with_detector, x, y, eps=0), x)


@pytest.mark.parametrize("adaptive", [False, True])
def test_building_an_evaluation_never_changes_the_callers_classifier_mode(adaptive):
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(64, 10)).train()
    ev = build_evaluated_model(clf, ["quantize:bits=3"], adaptive=adaptive)
    assert clf.training and all(m.training for m in clf.modules())  # the caller's object keeps its mode
    assert not any(m.training for m in ev.defended.modules())  # the evaluation runs in eval mode
    dropouts = [m for m in ev.attack_target.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and not any(m.training for m in dropouts)  # and so does what the attacker differentiates
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(ev.defended(x), ev.defended(x))  # dropout is off: deterministic answers
