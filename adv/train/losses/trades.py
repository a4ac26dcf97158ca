"""TRADES (Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy").

``CE(f(x), y) + β·KL(f(x) ‖ f(x_adv))`` with ``x_adv`` the point of the
ε-ball that maximises that KL, found by PGD from ``x + 0.001·N(0, I)`` (the
reference implementation's start). The inner maximisation reuses the PGD
loop of :mod:`adv.attacks.pgd` with the KL as its objective; the model is
in eval mode and frozen while it runs, as for ``at``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from adv.attacks.core import frozen
from adv.attacks.pgd import pgd_loop
from adv.train.loop import LossOutput
from adv.train.losses.at import BudgetParams, batch_logs, current_eps, eval_mode
from adv.train.registry import register_loss


class TradesParams(BudgetParams):
    beta: float = Field(6.0, ge=0, description="weight of the KL robustness term (1/lambda in the paper)")


def kl_rows(p_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-example ``KL(p_clean ‖ softmax(logits_adv))``, shape (N,)."""
    return F.kl_div(F.log_softmax(logits_adv, 1), p_clean, reduction="none").sum(1)


def trades_adversarial(model, x: torch.Tensor, p: TradesParams, epoch: float) -> torch.Tensor:
    eps = current_eps(p, epoch)
    if eps == 0:
        return x
    gen = torch.Generator(device=x.device).manual_seed(int(torch.randint(2**62, (1,))))  # loop-seeded RNG
    with eval_mode(model), frozen(model):
        with torch.no_grad():
            p_clean = model(x).softmax(1)

        def objective(x_adv, rows=None):
            logits = model(x_adv)
            return kl_rows(p_clean if rows is None else p_clean[rows], logits), logits

        start = (x + 0.001 * torch.randn(x.shape, generator=gen, device=x.device)).clamp(0, 1)
        return pgd_loop(objective, x, start, eps=eps, norm="linf", steps=p.steps, step_size=p.step_size * eps / p.eps)


class Trades:
    takes_epoch = True

    def __init__(self, params: TradesParams):
        self.params = params

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, epoch: float = 0.0) -> LossOutput:
        x_adv = trades_adversarial(model, x, self.params, epoch).detach()
        clean, adv = model(torch.cat([x, x_adv])).split(len(x))
        robust = kl_rows(clean.softmax(1), adv).mean()
        loss = F.cross_entropy(clean, y) + self.params.beta * robust
        logs = {**batch_logs(adv, y, current_eps(self.params, epoch)), "kl": robust.item()}
        return LossOutput(loss, clean.detach(), logs)


@register_loss("trades", params=TradesParams,
               description="TRADES (Zhang et al. 2019): CE(x) + beta·KL(f(x) || f(x_adv)), x_adv maximising the KL")
def trades_loss(params: TradesParams) -> Trades:
    return Trades(params)
