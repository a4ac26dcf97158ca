"""Salient feature extraction (SFE): a coupled GAN on penultimate features, and re-identification.

Khoshbakht et al. 2024, "A Novel Defense Approach Against Natural Adversarial
Examples in ImageNet Dataset" (§3.2), after Chen et al. 2021, "Salient Feature
Extractor for Adversarial Defense on Deep Neural Networks". The frozen target
model's penultimate features ``f = features(x)`` go into two generators of the
same shape, the positive generator PG (salient features, SF) and the negative
generator NG (trivial features, TF), which share one discriminator D. The
defended prediction is the **re-identification** ``head(PG(features(x)))``; the
AdvD detector on ``concat(SF, TF)`` is :mod:`adv.defenses.advd`.

Threat model: the paper's is *natural* adversarial examples (ImageNet-A)
seen by a fixed, pretrained target model; Chen et al.'s is synthetic
perturbations (PGD and the like) crafted on the undefended model. The stage is
differentiable, so the adaptive evaluation attacks ``head ∘ PG ∘ features``
end to end.

Choices the papers leave open, with the reason for each:

* **Generators** (PG, NG): ``depth`` hidden fully connected layers of width
  ``hidden`` with ReLU, D -> hidden -> ... -> D, *not* residual. The paper
  only says "stacked fully connected layers"; a narrower hidden layer is what
  lets PG drop directions of the feature space, and without a skip the
  identity is not free. Inputs are standardized with the benign training
  features' mean and std (kept in the stage file) so one set of loss weights
  serves 1024-d LeNet and 2048-d ResNet/Inception features; outputs are mapped
  back and passed through ReLU because every registered model's penultimate
  features are post-ReLU (the head never sees a value it was not trained on).
* **Discriminator** D: D -> ``disc_hidden`` -> ``disc_hidden``/2 -> 1 logit. Its
  "true" samples are the target model's own features (benign and adversarial),
  its "false" ones are everything PG and NG generate; one D serves both GANs
  (the paper's shared parameters). Non-saturating BCE (Goodfellow et al. 2014),
  the usual stable choice; the paper names no adversarial loss.
* **Objectives** (all MSE in the standardized space, as the paper says):
  PG: ``MSE(PG(f_adv), target) + MSE(PG(f_benign), f_benign)``: the SF of an
  adversarial example and of its benign counterpart are indistinguishable and
  anchored to the benign features (without the anchor, a constant SF would be
  optimal). NG: ``MSE(NG(f), f)`` for benign and adversarial ``f``: the TF
  match the input features. Each generator adds ``lambda_gan`` times its GAN
  loss; 0.01 keeps the reconstruction terms in charge (the paper's "MSE
  objective") while D still shapes the output distribution.
* **Pairs vs sets.** Synthetic adversarials (PGD, ...) come with their benign
  original: ``target`` is that original's features. Natural adversarial
  examples (ImageNet-A, ``adv data filter``) have no counterpart, so the
  objective works on sets, class by class: ``target`` is the mean benign
  feature vector of the example's labelled class (first moments of the benign
  and natural-adversarial sets matched per class; D matches the rest of the
  distribution). This uses the natural set's labels, as the paper's 80/20
  protocol must have, which is why the re-test compares it with a linear probe.
* **Alternation:** one D step, then one step of PG and NG, per batch (the paper:
  "PG and D updated alternately"); Adam, ``lr`` for all three.
* **Which adversarials.** Attack-crafted pairs are kept only where the attack
  succeeded on a correctly classified image (Chen et al. train on adversarial
  examples, not on failed attempts).

Shape:
    x: (N, C, H, W) in [0, 1] -> logits (N, num_classes); f, SF, TF: (N, D)
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from adv.defenses.registry import register_defense
from adv.defenses.sfe_sources import FeatureSet, training_features
from adv.defenses.stage import ClassifierStage, LearnedParams, StageInfo
from adv.errors import ConfigError
from adv.progress import progress

SOURCES = ("attack", "natural", "stored")


class SFEParams(LearnedParams):
    """The coupled GAN, the AdvD and where the adversarial training examples come from."""

    #: An ``advd`` stage file holds the same networks (one training run writes both).
    accepts_files_of: ClassVar[tuple[str, ...]] = ("advd",)

    epochs: int = Field(30, ge=1, description="SFE (GAN) epochs; feature-space training is cheap")
    hidden: int = Field(512, ge=1, description="width of the PG/NG hidden layers")
    depth: int = Field(2, ge=1, description="hidden layers of PG and NG")
    disc_hidden: int = Field(256, ge=2, description="first hidden width of D (then halved)")
    lambda_gan: float = Field(0.01, ge=0, description="weight of each generator's GAN loss against D")
    advd_hidden: int = Field(256, ge=8, description="first hidden width of AdvD's five layers (then halved)")
    advd_epochs: int = Field(20, ge=1, description="AdvD epochs, trained after the SFE")
    threshold: float = Field(0.5, gt=0, lt=1, description="AdvD flags inputs with P(adversarial) above this")
    source: Literal["attack", "natural", "stored"] = Field("attack", description="where the adversarials come from")
    attack: str = Field("pgd", description="source=attack: registered attack crafting the adversarials on the fly")
    eps: float = Field(0.1, gt=0, description="source=attack: L∞ budget")
    attack_steps: int = Field(10, ge=1, description="source=attack: iterations, for attacks that iterate")
    natural: str | None = Field(None, description="source=natural: image folder (adv data filter output, ImageNet-A)")
    label_space: Literal["folder", "imagenet1k", "imagenet-a", "imagenet-o"] = Field(
        "folder", description="source=natural on image folders; imagenet-a/-o add the 200-class logit mask")
    stored: str | None = Field(None, description="source=stored: a jobs.evaluate run folder (images stored)")
    stored_attack: str | None = Field(None, description="source=stored: attack_key to use (default: the first)")

    @field_validator("attack")
    @classmethod
    def _registered(cls, value: str) -> str:
        from adv.attacks.registry import ATTACKS

        if value not in ATTACKS:
            raise ValueError(ATTACKS.unknown(value))
        return value

    @model_validator(mode="after")
    def _source_given(self):
        needs = {"natural": self.natural, "stored": self.stored}
        if self.source in needs and not needs[self.source]:
            raise ValueError(f"source={self.source} needs {self.source}=DIR")
        return self


# --- networks ---------------------------------------------------------------------------------
def mlp(widths: list[int]) -> nn.Sequential:
    """Fully connected layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SFENets(nn.Module):
    """PG, NG, the shared D and AdvD, with the feature standardization they work in.

    Shape: f (N, D) -> SF, TF (N, D); D logits (N,); AdvD logits (N,)
    """

    def __init__(self, dim: int, p: SFEParams):
        super().__init__()
        gen = [dim] + [p.hidden] * p.depth + [dim]
        self.pg, self.ng = mlp(gen), mlp(gen)
        self.d = mlp([dim, p.disc_hidden, p.disc_hidden // 2, 1])
        h = p.advd_hidden  # five fully connected layers (Khoshbakht et al. §3.2)
        self.advd = mlp([2 * dim, h, h // 2, h // 4, h // 8, 1])
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def standardize(self, f: torch.Tensor) -> torch.Tensor:
        return (f - self.mean) / self.std

    def generate(self, gen: nn.Module, f: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.mean + self.std * gen(self.standardize(f)))

    def salient(self, f: torch.Tensor) -> torch.Tensor:
        return self.generate(self.pg, f)

    def trivial(self, f: torch.Tensor) -> torch.Tensor:
        return self.generate(self.ng, f)

    def advd_logit(self, f: torch.Tensor) -> torch.Tensor:
        """AdvD on ``concat(SF, TF)`` (standardized); > 0 leans adversarial."""
        both = torch.cat([self.standardize(self.salient(f)), self.standardize(self.trivial(f))], 1)
        return self.advd(both).squeeze(1)


def feature_dim(classifier: nn.Module) -> int:
    """The classifier's penultimate width; a clear error when it has no ``features``/``head``."""
    dim = getattr(classifier, "feature_dim", 0)
    if not dim or not all(callable(getattr(classifier, m, None)) for m in ("features", "head")):
        raise ConfigError(f"SFE needs penultimate features: {type(classifier).__name__} exposes no "
                          "features(x)/head(f)/feature_dim (use an adv ImageClassifier)")
    return int(dim)


class SFEStage(ClassifierStage):
    """What the ``sfe`` stage and the ``advd`` detector share: the frozen classifier and the SFE networks."""

    def __init__(self, classifier: nn.Module, params: SFEParams, info: StageInfo | None = None):
        dim = feature_dim(classifier)
        super().__init__(classifier, params, info)
        # the initial weights come from params.seed, not the global RNG: the same spec trains the same stage
        # whatever ran before it in the process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            self.sfe = SFENets(dim, params)

    def load_stage_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        dim = self.sfe.mean.numel()
        stored = state_dict.get("sfe.mean")
        if stored is not None and stored.numel() != dim:
            raise RuntimeError(f"feature width mismatch: the file's SFE takes {stored.numel()}-d features, "
                               f"the classifier gives {dim}-d")
        super().load_stage_state_dict(state_dict)


class SFEClassifier(SFEStage):
    """Re-identification: ``head(PG(features(x)))`` (Khoshbakht et al. §3.2, "defense via re-identification").

    Shape: (N, C, H, W) in [0, 1] -> logits (N, num_classes)
    """

    @property
    def feature_dim(self) -> int:
        return self.classifier.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.sfe.salient(self.classifier.features(x))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.classifier.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --- training ---------------------------------------------------------------------------------
def _batches(n: int, batch_size: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def gan_step(nets: SFENets, opt_g, opt_d, fb, fa, target, lambda_gan: float) -> dict[str, float]:
    """One alternating update: D on real vs generated features, then PG and NG.

    Shape: fb (B, D) benign, fa (B', D) adversarial, target (B', D) SF target of ``fa``
    """
    real = torch.cat([fb, fa])
    sf, tf = nets.salient(real), nets.trivial(real)  # one forward serves the D step (detached) and the G step
    s = nets.standardize
    d_real, d_fake = nets.d(s(real)), nets.d(s(torch.cat([sf, tf]).detach()))
    loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
              + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()

    pg_rec = F.mse_loss(s(sf[len(fb):]), s(target)) + F.mse_loss(s(sf[:len(fb)]), s(fb))
    ng_rec = F.mse_loss(s(tf), s(real))
    gan = [F.binary_cross_entropy_with_logits(z, torch.ones_like(z)) for z in (nets.d(s(sf)), nets.d(s(tf)))]
    loss_pg, loss_ng = pg_rec + lambda_gan * gan[0], ng_rec + lambda_gan * gan[1]
    opt_g.zero_grad(set_to_none=True)
    (loss_pg + loss_ng).backward()
    opt_g.step()
    return {"d": loss_d.item(), "pg": loss_pg.item(), "ng": loss_ng.item(), "pg_rec": pg_rec.item(),
            "ng_rec": ng_rec.item()}


def train_sfe(nets: SFENets, feats: FeatureSet, p: SFEParams, show_progress: bool = False) -> dict:
    """Train PG, NG and D on ``feats`` (standardization fitted on the benign features); per-epoch mean losses."""
    with torch.no_grad():
        nets.mean.copy_(feats.benign.mean(0))
        nets.std.copy_(feats.benign.std(0).clamp_min(1e-3 * float(feats.benign.std(0).max()) + 1e-8))
    gen = torch.Generator().manual_seed(p.seed)
    opt_g = torch.optim.Adam([*nets.pg.parameters(), *nets.ng.parameters()], lr=p.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(nets.d.parameters(), lr=p.lr, betas=(0.5, 0.999))
    history = []
    nets.train()
    for _ in progress(range(p.epochs), desc="SFE (coupled GAN)", disable=not show_progress):
        adv_batches = _batches(len(feats.adv), p.batch_size, gen)
        ben_batches = _batches(len(feats.benign), max(1, len(feats.benign) * p.batch_size // len(feats.adv)), gen)
        logs = [gan_step(nets, opt_g, opt_d, feats.benign[ib], feats.adv[ia], feats.target[ia], p.lambda_gan)
                for ia, ib in zip(adv_batches, ben_batches)]
        history.append({k: sum(d[k] for d in logs) / len(logs) for k in logs[0]})
    nets.eval()
    return {"history": history, **{f"final_{k}": v for k, v in history[-1].items()}}


def train_advd(nets: SFENets, benign: torch.Tensor, adv: torch.Tensor, p: SFEParams) -> dict:
    """AdvD on ``concat(SF, TF)``: benign 0, adversarial 1, after the SFE (Khoshbakht et al. §3.2).

    The classes are weighted to balance (``pos_weight``); the SFE stays fixed.
    """
    f = torch.cat([benign, adv])
    is_adv = torch.cat([torch.zeros(len(benign)), torch.ones(len(adv))])
    pos_weight = torch.tensor(len(benign) / max(1, len(adv)))
    gen = torch.Generator().manual_seed(p.seed + 1)
    opt = torch.optim.Adam(nets.advd.parameters(), lr=p.lr)
    history = []
    nets.advd.train()
    for _ in range(p.advd_epochs):
        losses = []
        for idx in _batches(len(f), p.batch_size, gen):
            loss = F.binary_cross_entropy_with_logits(nets.advd_logit(f[idx]), is_adv[idx], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
    nets.eval()
    with torch.no_grad():
        acc = ((nets.advd_logit(f) > 0).float() == is_adv).float().mean().item()
    return {"advd_history": history, "advd_final_loss": history[-1], "advd_train_acc": acc}


def fit_sfe(stage: SFEStage, feats: FeatureSet, show_progress: bool = False) -> dict:
    """The whole training: the coupled GAN, then AdvD on its outputs; the classifier never changes."""
    p: SFEParams = stage.params
    metrics = train_sfe(stage.sfe, feats, p, show_progress)
    metrics.update(train_advd(stage.sfe, feats.benign, feats.adv, p))
    metrics.update(n_benign=len(feats.benign), n_adversarial=len(feats.adv), paired=feats.paired)
    return stage.finish_training(metrics)


def build_sfe_stage(cls: type[SFEStage], params: SFEParams, classifier, data,
                    info: StageInfo | None = None) -> SFEStage:
    """What both registry builders do: build, and train from ``data`` (benign images) when given."""
    stage = cls(classifier, params, info)
    if data is not None:  # features come back on the CPU: the feature-space training runs there
        fit_sfe(stage, training_features(classifier, data, params))
    return stage


@register_defense("sfe", params=SFEParams, kind="classifier", learned=True, needs_classifier=True,
                  description="re-identification head(PG(features(x))) of salient feature extraction "
                              "(Khoshbakht et al. 2024 after Chen et al. 2021)")
def sfe(params: SFEParams, classifier=None, data=None, info: StageInfo | None = None) -> SFEClassifier:
    return build_sfe_stage(SFEClassifier, params, classifier, data, info)
