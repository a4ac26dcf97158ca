"""Dimensionality-reduction defenses of Echeberria-Barrio et al. 2020 §4.2 (Echeberria-Barrio et al.).

* **initial autoencoder** (Fig. 7): a conv autoencoder trained on the data,
  inserted before the classifier, whose weights stay as they were;
* **middle autoencoder** (Fig. 5): a dense autoencoder trained on the
  classifier's penultimate features, inserted before the dense head; the
  original CNN and head keep their weights;
* **encoder variant** (Fig. 6): the middle autoencoder's encoder followed by
  a *new* dense head trained on the encoder's output.

Threat model: preprocessing/feature-cleaning defenses against small
perturbations. All three are differentiable, so the adaptive evaluation
attacks straight through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from adv.defenses.registry import register_defense
from adv.defenses.stage import ClassifierStage, LearnedParams, Stage, StageInfo, crop_to, pad_to_multiple, train_stage
from adv.train.loop import LossOutput


# --- initial autoencoder (pixel space) ---------------------------------------------------
class InitialAEParams(LearnedParams):
    width: int = Field(16, ge=1, description="channels of the first conv layer")
    latent: int = Field(8, ge=1, description="channels of the code at 1/4 resolution (C*H*W/latent*H*W/16 = reduction)")
    noise: float = Field(0.1, ge=0, description="std of Gaussian noise added to training inputs (denoising AE)")


class InitialAE(Stage):
    """Conv autoencoder in front of the classifier (Echeberria-Barrio et al. 2020 Fig. 7).

    Shape: (N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1]; code (N, latent, H/4, W/4)
    """

    def __init__(self, channels: int, params: InitialAEParams, info: StageInfo | None = None):
        super().__init__(params, info)
        w, k = params.width, params.latent
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, k, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(k, w, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(w, channels, 4, stride=2, padding=1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, size = pad_to_multiple(x, 4)
        return crop_to(self.decoder(self.encoder(padded)), size)


@register_defense("initial_ae", params=InitialAEParams, kind="preprocess", learned=True,
                  description="conv autoencoder before the classifier, trained on the data "
                              "(Echeberria-Barrio et al. 2020 Fig. 7)")
def initial_ae(params: InitialAEParams, classifier=None, data=None, info: StageInfo | None = None) -> InitialAE:
    channels = data.input_size[0] if data is not None else (classifier.input_size[0] if classifier is not None else 1)
    ae = InitialAE(channels, params, info)
    if data is not None:
        train_initial_ae(ae, data, classifier)
    return ae


def train_initial_ae(ae: InitialAE, data, classifier: nn.Module | None = None, show_progress: bool = False) -> dict:
    """Reconstruction training ``MSE(ae(x + noise), x)``; the classifier (if any) only logs accuracy."""
    p: InitialAEParams = ae.params
    num_classes = getattr(classifier, "num_classes", 1)

    def loss_fn(_model, x, y):
        noisy = (x + p.noise * torch.randn_like(x)).clamp(0, 1) if p.noise else x
        recon = ae(noisy)
        with torch.no_grad():
            logits = classifier(recon) if classifier is not None else x.new_zeros(len(x), num_classes)
        return LossOutput(F.mse_loss(recon, x), logits)

    metrics = train_stage(ae, loss_fn, p, data, show_progress=show_progress, classifier=classifier)
    if classifier is None:
        metrics.pop("train_acc", None)  # no classifier: the loop's accuracy would be of zeros
    return ae.finish_training(metrics)


# --- middle autoencoder (feature space) -----------------------------------------------------
class FeatureAEParams(LearnedParams):
    hidden: int = Field(256, ge=1, description="width of the hidden dense layers")
    bottleneck: int = Field(64, ge=1, description="size of the code (the reduced dimension)")


class FeatureAE(nn.Module):
    """Dense autoencoder on penultimate features: D -> hidden -> bottleneck -> hidden -> D.

    Shape: (N, D) -> (N, D); code (N, bottleneck)
    """

    def __init__(self, dim: int, hidden: int, bottleneck: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, bottleneck))
        self.decoder = nn.Sequential(nn.Linear(bottleneck, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(f))


class MiddleAEClassifier(ClassifierStage):
    """``head(AE(features(x)))`` with the original CNN and head frozen (Echeberria-Barrio et al. 2020 Fig. 5).

    Shape: (N, C, H, W) in [0, 1] -> logits (N, num_classes)
    """

    def __init__(self, classifier: nn.Module, params: FeatureAEParams, info: StageInfo | None = None):
        super().__init__(classifier, params, info)
        self.ae = FeatureAE(classifier.feature_dim, params.hidden, params.bottleneck)

    @property
    def feature_dim(self) -> int:
        return self.classifier.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae(self.classifier.features(x))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.classifier.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _feature_dim(classifier: nn.Module) -> int:
    dim = getattr(classifier, "feature_dim", 0)
    if not dim:
        raise ValueError(f"{type(classifier).__name__} exposes no feature_dim; feature-space defenses need "
                         "an ImageClassifier (features/head)")
    return dim


@register_defense("middle_ae", params=FeatureAEParams, kind="classifier", learned=True, needs_classifier=True,
                  description="dense autoencoder on penultimate features, before the frozen head "
                              "(Echeberria-Barrio et al. 2020 Fig. 5)")
def middle_ae(params: FeatureAEParams, classifier=None, data=None, info: StageInfo | None = None) -> MiddleAEClassifier:
    _feature_dim(classifier)
    model = MiddleAEClassifier(classifier, params, info)
    if data is not None:
        train_middle_ae(model, data)
    return model


def train_middle_ae(model: MiddleAEClassifier, data, show_progress: bool = False) -> dict:
    """``MSE(AE(f), f)`` on the frozen classifier's features ``f``; logs accuracy through the AE."""

    def loss_fn(_model, x, y):
        with torch.no_grad():
            f = model.classifier.features(x)
        recon = model.ae(f)
        return LossOutput(F.mse_loss(recon, f), model.classifier.head(recon).detach())

    return model.finish_training(train_stage(model, loss_fn, model.params, data, show_progress=show_progress))


# --- encoder variant -------------------------------------------------------------------------
class EncoderParams(FeatureAEParams):
    head_hidden: int = Field(128, ge=0, description="hidden width of the new dense head (0: linear head)")
    ae_checkpoint: str | None = Field(None, description="a middle_ae stage file whose encoder to reuse")


class EncoderClassifier(ClassifierStage):
    """``new_head(encoder(features(x)))``: the middle AE's encoder and a new dense head (Echeberria-Barrio et al.
    2020 Fig. 6).

    Shape: (N, C, H, W) in [0, 1] -> logits (N, num_classes); code (N, bottleneck)
    """

    def __init__(self, classifier: nn.Module, params: EncoderParams, info: StageInfo | None = None):
        super().__init__(classifier, params, info)
        dim, k = _feature_dim(classifier), params.bottleneck
        self.encoder = FeatureAE(dim, params.hidden, k).encoder
        n = classifier.num_classes
        self.new_head = (nn.Sequential(nn.Linear(k, params.head_hidden), nn.ReLU(), nn.Linear(params.head_hidden, n))
                         if params.head_hidden else nn.Linear(k, n))

    @property
    def feature_dim(self) -> int:
        return self.params.bottleneck

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.classifier.features(x))

    def head(self, code: torch.Tensor) -> torch.Tensor:
        return self.new_head(code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_defense("encoder", params=EncoderParams, kind="classifier", learned=True, needs_classifier=True,
                  description="middle-AE encoder + a new dense head trained on its code "
                              "(Echeberria-Barrio et al. 2020 Fig. 6)")
def encoder(params: EncoderParams, classifier=None, data=None, info: StageInfo | None = None) -> EncoderClassifier:
    model = EncoderClassifier(classifier, params, info)
    if data is not None:
        train_encoder_variant(model, data)
    return model


def train_encoder_variant(model: EncoderClassifier, data, show_progress: bool = False) -> dict:
    """Get a trained middle-AE encoder (load ``ae_checkpoint`` or train one), freeze it, train the new head."""
    from adv.defenses.registry import create_defense

    p: EncoderParams = model.params
    if p.ae_checkpoint:
        middle = create_defense(("middle_ae", {"checkpoint": p.ae_checkpoint}), classifier=model.classifier)
    else:
        ae_params = FeatureAEParams(**{k: getattr(p, k) for k in FeatureAEParams.model_fields if k != "checkpoint"})
        middle = middle_ae(ae_params, classifier=model.classifier, data=data)
    if (middle.ae.encoder[0].in_features != model.encoder[0].in_features
            or middle.ae.encoder[-1].out_features != p.bottleneck):
        raise ValueError(f"{p.ae_checkpoint} has a different encoder shape than hidden={p.hidden}, "
                         f"bottleneck={p.bottleneck}")
    model.encoder.load_state_dict(middle.ae.encoder.state_dict())
    for q in model.encoder.parameters():
        q.requires_grad_(False)

    def loss_fn(_model, x, y):
        with torch.no_grad():
            code = model.features(x)
        logits = model.new_head(code)
        return LossOutput(F.cross_entropy(logits, y), logits.detach())

    metrics = train_stage(model, loss_fn, p, data, show_progress=show_progress)
    metrics["middle_ae"] = {k: v for k, v in middle.train_metrics.items() if k != "history"}
    return model.finish_training(metrics)
