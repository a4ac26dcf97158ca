"""torchvision ImageNet classifiers behind the ``ImageClassifier`` contract.

The torchvision network is kept whole as ``backbone`` except its last linear
layer, which moves to ``fc_head`` so ``features``/``head`` can be called apart.
Pretrained weights come from torchvision when online; offline, the error names
the cache folder to put the file in.
"""

from __future__ import annotations

from torch import nn

from adv.errors import CheckpointError
from adv.models.base import ImageClassifier
from adv.models.registry import IMAGENET_MEAN_STD, ModelSpec, register_model

# name -> (weights enum, dotted path of the final linear layer, dotted path of the Grad-CAM layer, input side)
_TORCHVISION = {
    "resnet50": ("ResNet50_Weights.IMAGENET1K_V2", "fc", "layer4", 224),
    "inception_v3": ("Inception_V3_Weights.IMAGENET1K_V1", "fc", "Mixed_7c", 299),
    "mobilenet_v2": ("MobileNet_V2_Weights.IMAGENET1K_V2", "classifier.1", "features", 224),
    "densenet169": ("DenseNet169_Weights.IMAGENET1K_V1", "classifier", "features", 224),
    "vgg16": ("VGG16_Weights.IMAGENET1K_V1", "classifier.6", "features", 224),
}


def torchvision_backbone(name: str, pretrained: bool) -> nn.Module:
    """Build ``torchvision.models.<name>``, downloading weights when asked.

    Raises CheckpointError (not a URLError traceback) when the download fails.
    """
    import torchvision  # here, not at module level: it costs ~2 s (torch._dynamo) in every process that lists models

    weights_name = _TORCHVISION[name][0]
    kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    if not pretrained:
        return getattr(torchvision.models, name)(weights=None, **kwargs)
    weights = torchvision.models.get_weight(weights_name)
    try:
        state_dict = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, socket timeouts, hash mismatch
        import torch.hub

        raise CheckpointError(
            f"could not download pretrained {weights_name} from {weights.url} ({exc.__class__.__name__}: {exc}). "
            f"Fix: go online, or copy {weights.url.rsplit('/', 1)[-1]} into {torch.hub.get_dir()}/checkpoints/, "
            f"or load your own file with adv.models.load_external('{name}', PATH)"
        ) from None
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    if name == "inception_v3":  # torchvision's file carries the auxiliary head; it is training-only
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}
    model.load_state_dict(state_dict)
    return model


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = _get(module, parent_path) if parent_path else module
    if leaf.isdigit():
        parent[int(leaf)] = value
    else:
        setattr(parent, leaf, value)


class TorchvisionClassifier(ImageClassifier):
    def __init__(self, name, arch, num_classes, input_size, mean, std, pretrained: bool = False):
        super().__init__(arch, num_classes, input_size, mean, std)
        _, self._head_path, self._cam_path, _ = _TORCHVISION[name]
        self.backbone = torchvision_backbone(name, pretrained)
        last = _get(self.backbone, self._head_path)
        self.fc_head = last if last.out_features == num_classes else nn.Linear(last.in_features, num_classes)
        _set(self.backbone, self._head_path, nn.Identity())
        self.feature_dim = last.in_features

    def forward_features(self, x):
        # Penultimate features: torchvision's forward with the last linear layer removed.
        return self.backbone(x)

    def head(self, features):
        return self.fc_head(features)

    @property
    def cam_layer(self):
        layer = _get(self.backbone, self._cam_path)
        return layer[-1] if isinstance(layer, nn.Sequential) else layer

    def load_external_state_dict(self, state_dict):
        """Accept a plain torchvision state_dict (``fc.weight``...) or one of ours."""
        if any(k.startswith("backbone.") for k in state_dict):
            return self.load_state_dict(state_dict, strict=True)
        prefix = self._head_path + "."
        renamed = {
            (f"fc_head.{k[len(prefix):]}" if k.startswith(prefix) else f"backbone.{k}"): v
            for k, v in state_dict.items()
            if not k.startswith("AuxLogits.")
        }
        self.load_state_dict(renamed, strict=True)


def _register(name: str, description: str) -> None:
    weights, _, _, side = _TORCHVISION[name]
    spec = ModelSpec(
        name=name,
        input_size=(3, side, side),
        default_num_classes=1000,
        mean=IMAGENET_MEAN_STD[0],
        std=IMAGENET_MEAN_STD[1],
        description=description + f"; pretrained=True loads {weights}",
        pretrained=weights,
        adapts_to_input=False,
        tags=("imagenet",),
    )

    @register_model(spec)
    def build(**kw):
        return TorchvisionClassifier(name, **kw)


_register("resnet50", "torchvision ResNet-50")
_register("inception_v3", "torchvision Inception-v3 (299x299)")
_register("mobilenet_v2", "torchvision MobileNetV2")
_register("densenet169", "torchvision DenseNet-169")
_register("vgg16", "torchvision VGG16")
