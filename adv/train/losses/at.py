"""Adversarial training: Madry et al. 2018 (PGD), Goodfellow et al. 2015 (a clean/adversarial mix) and
Wong et al. 2020, "Fast is better than free" (FGSM from a random start).

Each batch's adversarials are crafted with the registered attacks, the model
in eval mode (so BatchNorm statistics and dropout do not follow the attack)
and its parameters frozen; the loss is ``(1 - mix)·CE(x_adv) + mix·CE(x)``.
``eps_ramp`` grows ε linearly from 0 over that many epochs (the step size
scales with it): Madry training on MNIST at ε = 0.3 can stall at chance
without a ramp. The loss logs the adversarial accuracy and ε of each batch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from adv.attacks import fgsm, pgd
from adv.train.loop import LossOutput
from adv.train.registry import register_loss


class BudgetParams(BaseModel):
    """The inner maximisation's budget, shared by every adversarial training loss."""

    model_config = ConfigDict(extra="forbid")

    eps: float = Field(0.3, ge=0, le=1, description="L-inf budget of the training adversarials")
    steps: int = Field(40, ge=1, description="PGD iterations")
    step_size: float = Field(0.01, gt=0, description="PGD step at the full eps")
    eps_ramp: float = Field(0.0, ge=0, description="epochs over which eps grows linearly from 0")


class ATParams(BudgetParams):
    attack: Literal["pgd", "fgsm", "fgsm_rs"] = Field(
        "pgd", description="pgd (Madry), fgsm, or fgsm_rs (random start, step 1.25·eps; Wong et al. 2020)")
    mix: float = Field(0.0, ge=0, le=1, description="weight of the clean loss (Goodfellow's mix; 0 = Madry)")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode inside, its own mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def current_eps(p: BudgetParams, epoch: float) -> float:
    """ε after ``epoch`` (fractional) epochs of the linear ramp."""
    return p.eps * min(1.0, epoch / p.eps_ramp) if p.eps_ramp > 0 else p.eps


def craft(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, p: ATParams, epoch: float) -> torch.Tensor:
    """Training adversarials for one batch (Shape: x (N, C, H, W) in [0, 1], y (N,) -> like x)."""
    eps = current_eps(p, epoch)
    if eps == 0:
        return x
    # drawn from the global RNG, which the loop seeds and saves with each checkpoint: resumable runs repeat
    seed = int(torch.randint(2**62, (1,)))
    with eval_mode(model):
        if p.attack == "pgd":
            return pgd(model, x, y, eps=eps, steps=p.steps, step_size=p.step_size * eps / p.eps, seed=seed)
        if p.attack == "fgsm":
            return fgsm(model, x, y, eps=eps)
        return pgd(model, x, y, eps=eps, steps=1, step_size=1.25 * eps, seed=seed)  # FGSM-RS is 1-step PGD


class AdversarialTraining:
    """``BatchLoss`` of adversarial training; subclasses change the adversarials (``craft``) or the loss (``combine``).

    Shape: x (N, C, H, W) in [0, 1], y (N,) -> LossOutput(loss, logits on clean x (N, K), logs)
    """

    #: The loop passes ``epoch=`` (fractional epochs done) for the eps ramp.
    takes_epoch = True

    def __init__(self, params: ATParams):
        self.params = params

    def craft(self, model, x, y, epoch: float) -> torch.Tensor:
        return craft(model, x, y, self.params, epoch)

    @property
    def clean_in_graph(self) -> bool:
        """Whether the loss differentiates the clean logits (else they are computed without a graph)."""
        return self.params.mix > 0

    def combine(self, clean: torch.Tensor, adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        mix = self.params.mix
        loss = (1 - mix) * F.cross_entropy(adv, y) + (mix * F.cross_entropy(clean, y) if mix else 0.0)
        return loss, {}

    def logits(self, model, x, x_adv) -> tuple[torch.Tensor, torch.Tensor]:
        if self.clean_in_graph:
            return model(torch.cat([x, x_adv])).split(len(x))
        with torch.no_grad():
            clean = model(x)
        return clean, model(x_adv)

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, epoch: float = 0.0) -> LossOutput:
        x_adv = self.craft(model, x, y, epoch).detach()
        clean, adv = self.logits(model, x, x_adv)
        loss, logs = self.combine(clean, adv, y)
        return LossOutput(loss, clean.detach(), {**batch_logs(adv, y, current_eps(self.params, epoch)), **logs})


def batch_logs(adv_logits: torch.Tensor, y: torch.Tensor, eps: float) -> dict[str, float]:
    return {"adv_acc": (adv_logits.argmax(1) == y).float().mean().item(), "eps": eps}


@register_loss("at", params=ATParams,
               description="adversarial training: Madry PGD, Goodfellow's clean mix, or fast FGSM-RS (Wong et al. "
                           "2020), with an optional eps ramp")
def adversarial_training_loss(params: ATParams) -> AdversarialTraining:
    return AdversarialTraining(params)
