"""Attention-based adversarial defense, AAD (Wu et al. 2022, "Attention, Please!", §4.2, eq. 7-10).

On top of a base loss ``L_c`` (``at`` or ``alp``):
``L_total = L_c + α·L_r + β·L_p`` (eq. 10), where

* the rectification loss (eq. 7-8) masks each image's attention area,
  ``x_m = x ⊙ (1 − Att(x))``, and rewards a large L2 distance between the
  soft labels of ``x`` and ``x_m`` (and of ``x_adv`` and ``x_adv_m``):
  ``L_r = −[‖f(x) − f(x_m)‖₂ + ‖f(x_adv) − f(x_adv_m)‖₂]``;
* the preservation loss (eq. 9) is the L1 distance between the Grad-CAM
  maps of ``x`` and ``x_adv``: ``L_p = ‖g(x) − g(x_adv)‖₁``.

``Att(x)`` is the Grad-CAM map of the true class binarised at κ = mean(g(x))
(eq. 3), upsampled to the image. The maps come from the differentiable
Grad-CAM of :mod:`adv.explain` (the one A3 uses), scaled to max 1 so the L1
term does not reward shrinking activations. With α = β = 0 the loss is the
base loss, exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from adv.explain.cam import attention_area, grad_cam_and_logits, normalize_cam
from adv.train.loop import LossOutput
from adv.train.losses.alp import ALPParams, LogitPairing
from adv.train.losses.at import AdversarialTraining, ATParams, batch_logs, current_eps
from adv.train.registry import register_loss

#: The base losses AAD can sit on: name -> (params, loss).
BASES = {"at": (ATParams, AdversarialTraining), "alp": (ALPParams, LogitPairing)}


class AADParams(ATParams):
    base: Literal["at", "alp"] = Field("at", description="base loss: at (Madry) or alp (Kannan)")
    alpha: float = Field(0.01, ge=0, description="weight of the rectification loss L_r (eq. 10)")
    beta: float = Field(0.01, ge=0, description="weight of the preservation loss L_p (eq. 10)")
    mix: float | None = Field(None, ge=0, le=1, description="the base's clean-loss weight (default: at 0, alp 0.5)")
    lam: float | None = Field(None, ge=0, description="alp's logit-pairing weight (base=alp only; default 0.5)")

    @model_validator(mode="after")
    def _lam_needs_alp(self):
        if self.lam is not None and self.base != "alp":
            raise ValueError(f"lam is a key of base=alp, got base={self.base}")
        return self

    def base_params(self) -> ATParams:
        keys = {k: getattr(self, k) for k in ("attack", "eps", "steps", "step_size", "eps_ramp", "mix", "lam")}
        cls = BASES[self.base][0]
        return cls(**{k: v for k, v in keys.items() if v is not None and k in cls.model_fields})


def attention_mask(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``Att(x)``: the cells with ``g >= mean(g)`` (eq. 3), upsampled to ``size``; shape (N, 1, H, W), 0/1."""
    return F.interpolate(attention_area(cam.detach(), "mean")[:, None], size=size, mode="nearest")


def aad_terms(model, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor):
    """``(L_r, L_p, clean logits, adversarial logits)`` from one Grad-CAM forward of ``[x; x_adv]``.

    Shape: x, x_adv (N, C, H, W) in [0, 1]; y (N,)
    """
    both = torch.cat([x, x_adv])
    cam, logits = grad_cam_and_logits(model, both, torch.cat([y, y]), create_graph=True)
    masked = both * (1 - attention_mask(cam, x.shape[-2:]))  # eq. 7
    gap = (logits.softmax(1) - model(masked).softmax(1)).norm(dim=1)
    n = len(x)
    rectification = -(gap[:n].mean() + gap[n:].mean())  # eq. 8
    g = normalize_cam(cam)
    preservation = (g[:n] - g[n:]).abs().flatten(1).sum(1).mean()  # eq. 9, L1 over the map
    return rectification, preservation, logits[:n], logits[n:]


class AttentionDefense:
    takes_epoch = True

    def __init__(self, params: AADParams):
        self.params = params
        self.base = BASES[params.base][1](params.base_params())

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor, epoch: float = 0.0) -> LossOutput:
        p = self.params
        if p.alpha == 0 and p.beta == 0:
            return self.base(model, x, y, epoch)
        x_adv = self.base.craft(model, x, y, epoch).detach()
        rect, pres, clean, adv = aad_terms(model, x, x_adv, y)
        loss, logs = self.base.combine(clean, adv, y)
        logs = {**batch_logs(adv, y, current_eps(self.base.params, epoch)), **logs,
                "rectification": rect.item(), "preservation": pres.item()}
        return LossOutput(loss + p.alpha * rect + p.beta * pres, clean.detach(), logs)


@register_loss("aad", params=AADParams,
               description="attention-based adversarial defense (Wu et al. 2022): base at/alp + alpha·L_r "
                           "(attention rectification) + beta·L_p (Grad-CAM preservation)")
def aad_loss(params: AADParams) -> AttentionDefense:
    return AttentionDefense(params)
