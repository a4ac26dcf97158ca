"""Training that silently fails (issue 21): an epoch at chance-level training accuracy warns in one line that
names the likely fix."""

from __future__ import annotations

import pytest

from adv.cli import main
from adv.train import TrainingStallWarning
from adv.train.loop import cross_entropy_loss, stall_warning
from adv.train.losses import training_loss


def test_adversarial_training_that_stalls_at_chance_says_eps_ramp(tmp_path, capsys, single_threaded):
    """FGSM at eps=1 leaves nothing to learn from (every pixel pushed to 0 or 1): accuracy stays at chance."""
    code = main(["train", "--dataset", "digits", "--model", "lenet", "--n", "256", "--n-test", "50", "--epochs", "1",
                 "--batch-size", "32", "--defense", "at:attack=fgsm,eps=1", "--quiet", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0
    lines = [line for line in err.splitlines() if "not learning" in line]
    assert len(lines) == 1 and lines[0].startswith("adv: warning: epoch 1: training accuracy ")
    assert "within 2 points of chance (10.0% for 10 classes)" in lines[0] and "eps_ramp=1" in lines[0]
    assert "on its adversarials" in lines[0] and "uniform guess: 2.303" in lines[0]


def test_the_stall_check_speaks_only_near_chance_and_names_the_fix_for_the_loss():
    at = training_loss("at:eps=0.3").loss_fn
    ramped = training_loss("at:eps=0.3,eps_ramp=1").loss_fn
    stalled = {"epoch": 2, "train_acc": 0.108, "train_loss": 2.302}
    assert "eps_ramp=1" in stall_warning(stalled, 10, at)
    assert "eps_ramp" not in stall_warning(stalled, 10, ramped) and "--lr" in stall_warning(stalled, 10, ramped)
    assert "--lr" in stall_warning(stalled, 10, cross_entropy_loss)
    assert stall_warning({**stalled, "train_acc": 0.125}, 10, at) is None
    assert stall_warning({**stalled, "train_acc": 0.52}, 2, at) is not None  # chance is 50% for two classes
    # Madry at eps=0.3 on 6,000 MNIST images, no ramp: 20% on clean inputs, 11% on adversarials, a uniform guess
    madry = {"epoch": 1, "train_acc": 0.2015, "train_adv_acc": 0.110, "train_loss": 2.305}
    assert "(11.0% on its adversarials)" in stall_warning(madry, 10, at)
    assert stall_warning({**madry, "train_loss": 1.9}, 10, at) is None  # learning, only not robust yet
    assert stall_warning({**stalled, "train_acc": 0.9}, 10, at) is None


def test_fit_raises_the_stall_as_a_warning_class_callers_can_filter(single_threaded):
    import torch

    from adv.data import load_dataset
    from adv.models import create_model
    from adv.train import LossOutput, TrainConfig, fit

    def learns_nothing(model, x, y):  # constant logits: the accuracy is class 0's share, about 10% of digits
        logits = model(x) * 0
        return LossOutput(torch.nn.functional.cross_entropy(logits, y), logits)

    data = load_dataset("digits", split="train")
    model = create_model("lenet", num_classes=10, input_size=data.input_size)
    with pytest.warns(TrainingStallWarning, match=r"epoch 1: .* chance .*--lr"):
        fit(model, data, None, TrainConfig(epochs=1, batch_size=256), learns_nothing, show_progress=False)
