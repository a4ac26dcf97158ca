"""U-Net-like preprocessor of Himbitski et al. 2024 (Himbitski et al., Table III) with its composite loss.

Architecture (channels × ``width``; each conv halves H and W):

    input conv C->32 | encoder 32->64->128->256, LeakyReLU
    hidden: flatten, Linear, reshape, + skip           (the "linear bottleneck")
    decoder ConvT 256->128->64->32, LeakyReLU, + skip from the encoder
    output ConvT 32->C, then clipped to [0, 1]

Inputs are replicate-padded to a multiple of 16 and cropped back, so 28x28
and 32x32 both work. Trained on clean and adversarial pairs with

    L = λ_rec · MSE(u(x̃), x) + λ_cls · CE(f(u(x̃)), y),   x̃ ∈ {x, x_adv}

where ``x_adv`` comes from FGSM/PGD against the frozen classifier ``f``.
Threat model: a learned preprocessing defense; differentiable, so the
adaptive evaluation attacks ``f ∘ u`` end to end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from adv.defenses.registry import register_defense
from adv.defenses.stage import LearnedParams, Stage, StageInfo, crop_to, pad_to_multiple, train_stage
from adv.train.loop import LossOutput

#: Four stride-2 convolutions: inputs are padded to a multiple of 2**4.
DOWNSAMPLING = 16
#: The dense bottleneck has (256·w·H/16·W/16)² weights; refuse sizes that would not fit in memory.
MAX_BOTTLENECK = 16384


class UNetParams(LearnedParams):
    width: float = Field(1.0, gt=0, description="channel multiplier of 32-64-128-256 (the parameter-count knob)")
    lambda_rec: float = Field(1.0, ge=0, description="weight of MSE(u(x_adv), x)")
    lambda_cls: float = Field(0.1, ge=0, description="weight of CE(f(u(x_adv)), y)")
    attacks: list[str] = Field(["fgsm", "pgd"], description="attacks that make the training adversarials")
    train_eps: float = Field(0.2, gt=0, le=1, description="L∞ budget of training adversarials: eps ~ U(0, train_eps]")
    pgd_steps: int = Field(7, ge=1)

    @field_validator("attacks")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        from adv.attacks import list_attacks

        known = list_attacks(training=True)
        bad = [a for a in value if a not in known]
        if bad or not value:
            raise ValueError(f"attacks must be a non-empty subset of {known}, got {value}")
        return value


def _channels(width: float) -> list[int]:
    return [max(1, round(c * width)) for c in (32, 64, 128, 256)]


class UNet(Stage):
    """Himbitski et al. 2024 Table III preprocessor.

    Shape: (N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1]
    """

    def __init__(self, input_size: tuple[int, int, int], params: UNetParams, info: StageInfo | None = None):
        super().__init__(params, info)
        c, h, w = input_size
        c1, c2, c3, c4 = _channels(params.width)
        ph, pw = -(-h // DOWNSAMPLING), -(-w // DOWNSAMPLING)
        flat = c4 * ph * pw
        if flat > MAX_BOTTLENECK:
            raise ValueError(f"input size {h}x{w} with width={params.width} gives a {flat}-wide dense bottleneck "
                             f"(> {MAX_BOTTLENECK}); use smaller images or a smaller width")
        act = nn.LeakyReLU(0.2)
        self.inp = nn.Conv2d(c, c1, 4, stride=2, padding=1)
        self.enc = nn.ModuleList([nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in ((c1, c2), (c2, c3), (c3, c4))])
        self.hidden = nn.Linear(flat, flat)
        self.dec = nn.ModuleList(
            [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1) for a, b in ((c4, c3), (c3, c2), (c2, c1))])
        self.out = nn.ConvTranspose2d(c1, c, 4, stride=2, padding=1)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, size = pad_to_multiple(x, DOWNSAMPLING)
        skips = [self.inp(padded)]
        for conv in self.enc:
            skips.append(self.act(conv(skips[-1])))
        z = skips[-1]
        z = z + self.hidden(z.flatten(1)).view_as(z)
        for deconv, skip in zip(self.dec, reversed(skips[:-1])):
            z = self.act(deconv(z)) + skip
        # Table III ends in ReLU; clamping the top too keeps the [0, 1] image contract
        return crop_to(self.out(z).clamp(0.0, 1.0), size)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@register_defense("unet", params=UNetParams, kind="preprocess", learned=True, needs_classifier=True,
                  description="U-Net-like preprocessor with a composite loss (Himbitski et al. 2024 Table III)")
def unet(params: UNetParams, classifier=None, data=None, info: StageInfo | None = None) -> UNet:
    size = data.input_size if data is not None else classifier.input_size
    model = UNet(tuple(size), params, info)
    if data is not None:
        train_unet(model, classifier, data)
    return model


def training_adversarials(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, p: UNetParams, step: int):
    """FGSM/PGD/BIM adversarials against the frozen classifier, the attack cycling per batch."""
    from adv.attacks import get_attack

    spec = get_attack(p.attacks[step % len(p.attacks)])
    eps = float(torch.empty(()).uniform_(0.1, 1.0)) * p.train_eps  # a spread of budgets, not only the largest
    kw = {"steps": p.pgd_steps} if spec.accepts("steps") else {}
    if spec.randomized:
        kw["seed"] = p.seed * 1_000_003 + step  # PGD's random start: reproducible training
    return spec(classifier, x, y, eps=eps, **kw)


def train_unet(model: UNet, classifier: nn.Module, data, show_progress: bool = False, on_epoch_end=None) -> dict:
    """Composite-loss training on clean + adversarial pairs (Himbitski et al. 2024 §V).

    ``on_epoch_end(epoch, metrics)`` is called after every epoch (the quality-vs-epochs study of Himbitski et al. 2024).
    """
    p: UNetParams = model.params
    counter = {"step": 0}

    def loss_fn(_model, x, y):
        x_adv = training_adversarials(classifier, x, y, p, counter["step"])
        counter["step"] += 1
        inputs, targets, labels = torch.cat([x, x_adv]), torch.cat([x, x]), torch.cat([y, y])
        restored = model(inputs)
        logits = classifier(restored)
        rec, cls = F.mse_loss(restored, targets), F.cross_entropy(logits, labels)
        loss = p.lambda_rec * rec + p.lambda_cls * cls
        adv_acc = (logits[len(x):].argmax(1) == y).float().mean().item()
        return LossOutput(loss, logits[: len(x)].detach(), {"rec": rec.item(), "cls": cls.item(), "adv_acc": adv_acc})

    metrics = train_stage(model, loss_fn, p, data, show_progress=show_progress, on_epoch_end=on_epoch_end,
                          classifier=classifier)
    metrics["parameters"] = parameter_count(model)
    return model.finish_training(metrics)
