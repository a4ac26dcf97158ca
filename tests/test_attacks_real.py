"""Attacks on real pretrained weights (advertorch LeNet5 on MNIST): the numbers the literature reports.

First 1000 MNIST test images. Skips when ../shared/data is absent; kept fast
enough for CI on two cores (one intra-op thread, batches of 250).
"""

from __future__ import annotations

import pytest
import torch

from adv.evaluate import robust_accuracy
from tests.helpers import SHARED_DATA, SHARED_MODELS, needs_shared_data

pytestmark = [needs_shared_data, pytest.mark.usefixtures("single_threaded")]
PGD40 = ("pgd", {"steps": 40, "step_size": 0.01})  # Madry et al.'s MNIST evaluation


@pytest.fixture(scope="module")
def mnist():
    from adv.data import load_dataset

    x, y = load_dataset("mnist", split="test", root=str(SHARED_DATA / "mnist")).tensors()
    return x[:1000], y[:1000]


def lenet5(kind: str):
    from adv.models import load_external

    return load_external("lenet5", SHARED_MODELS / f"mnist_lenet5_{kind}.pt")


def evaluate(model, data, attacks, eps):
    return robust_accuracy(model, data, attacks, eps=eps, batch_size=250, seed=0, progress=False)


@pytest.fixture(scope="module")
def advtrained_pgd40(mnist):
    return evaluate(lenet5("advtrained"), mnist, [PGD40], 0.3)


def test_clean_model_falls_to_pgd40(mnist):
    res = evaluate(lenet5("clntrained"), mnist, [PGD40], 0.3)
    assert res.clean_acc >= 0.98
    assert res.robust_acc <= 0.01


def test_fgsm_at_0_1_is_clearly_below_clean(mnist):
    model = lenet5("clntrained")
    res = evaluate(model, mnist, ["fgsm"], 0.1)
    assert res.robust_acc <= res.clean_acc - 0.1
    assert res.attacks[0].mean_linf == pytest.approx(0.1, abs=1e-5)


def test_advtrained_model_holds_against_pgd40(advtrained_pgd40):
    assert advtrained_pgd40.clean_acc >= 0.98
    assert 0.88 <= advtrained_pgd40.robust_acc <= 0.95
    assert advtrained_pgd40.flags == []


def test_apgd_ce_and_dlr_worst_case_is_no_weaker_than_pgd40(mnist, advtrained_pgd40):
    # 25 iterations each instead of 100, to fit CI on two cores; still at or below PGD-40
    res = evaluate(lenet5("advtrained"), mnist, [("apgd_ce", {"steps": 25}), ("apgd_dlr", {"steps": 25})], 0.3)
    assert res.robust_acc <= advtrained_pgd40.robust_acc
    assert res.attacks[1].n_fooled > 0  # DLR finds points CE missed


def test_models_left_as_found(mnist):
    model = lenet5("advtrained")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, (mnist[0][:50], mnist[1][:50]), ["fgsm", ("pgd", {"steps": 3})], 0.3)
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
