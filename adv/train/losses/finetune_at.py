"""Fine-tuning on known adversarials (Echeberria-Barrio et al., §4.1 "Adversarial Training").

The stored adversarials of an attack on the model (a ``jobs.evaluate`` run
folder with ``store_images``, or a ``.pt`` file holding ``x_adv`` and ``y``)
are added to the training data: every batch is trained on its clean images
and as many known adversarials, drawn in a seeded cycle. Used on a trained
model: ``adv train --checkpoint M --defense finetune_at:adversarials=RUN``.
The paper's metric is the share of the known adversarials classified
correctly afterwards; :func:`known_accuracy` measures it. Fresh
adversarials crafted against the fine-tuned model are the other half of
the story (the paper: "easy to obtain new ones").
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from adv.errors import ConfigError
from adv.train.loop import LossOutput
from adv.train.registry import register_loss


class FinetuneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adversarials: str | None = Field(None, description="jobs.evaluate run folder, or a .pt file with x_adv and y")
    attack_key: str | None = Field(None, description="grid point of a run folder (default: its first)")
    weight: float = Field(0.5, ge=0, le=1, description="weight of the known adversarials' loss")


def load_adversarials(path: str, attack_key: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_adv, y)`` from a run folder or a ``.pt`` file (Shape: (N, C, H, W) in [0, 1], (N,))."""
    p = Path(path)
    if p.is_dir():
        from adv.runs.stored import read_stored_pairs

        _, x_adv, y = read_stored_pairs(str(p), attack_key)
        return x_adv, y
    if not p.is_file():
        raise ConfigError(f"finetune_at: adversarials {path!r} is neither a run folder nor a file")
    blob = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not {"x_adv", "y"} <= set(blob):
        raise ConfigError(f"finetune_at: {path} must hold a dict with x_adv and y tensors")
    return blob["x_adv"].float(), blob["y"].long()


@torch.no_grad()
def known_accuracy(model, x_adv: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Share of the known adversarials the model now classifies correctly (the paper's Table 1 metric)."""
    device = next(model.parameters()).device
    hits = sum(int((model(xb.to(device)).argmax(1).cpu() == yb).sum())
               for xb, yb in zip(x_adv.split(batch_size), y.split(batch_size)))
    return hits / max(len(y), 1)


class KnownAdversarials:
    def __init__(self, params: FinetuneParams):
        if not params.adversarials:
            raise ConfigError("finetune_at needs adversarials=RUN_DIR (or a .pt file with x_adv and y)")
        self.params = params
        self.x_adv, self.y = load_adversarials(params.adversarials, params.attack_key)
        self.order = torch.zeros(0, dtype=torch.long)

    def _draw(self, n: int) -> torch.Tensor:
        """Next ``n`` indices of a cycle through the known set, reshuffled (from the loop-seeded RNG) per pass."""
        while len(self.order) < n:
            self.order = torch.cat([self.order, torch.randperm(len(self.y))])
        idx, self.order = self.order[:n], self.order[n:]
        return idx

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor) -> LossOutput:
        idx = self._draw(len(x))
        xk, yk = self.x_adv[idx].to(x.device), self.y[idx].to(y.device)
        clean, known = model(torch.cat([x, xk])).split(len(x))
        w = self.params.weight
        loss = (1 - w) * F.cross_entropy(clean, y) + w * F.cross_entropy(known, yk)
        return LossOutput(loss, clean.detach(), {"known_acc": (known.argmax(1) == yk).float().mean().item()})


@register_loss("finetune_at", params=FinetuneParams,
               description="fine-tune on stored known adversarials (Echeberria-Barrio et al. §4.1)")
def finetune_at_loss(params: FinetuneParams) -> KnownAdversarials:
    return KnownAdversarials(params)
