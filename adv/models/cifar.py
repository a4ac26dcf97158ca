"""CIFAR-style residual networks and the VGG16 + dense head of Echeberria-Barrio et al. 2020."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from adv.models.base import ImageClassifier
from adv.models.registry import IMAGENET_MEAN_STD, ModelSpec, register_model


class _BasicBlock(nn.Module):
    """3x3-3x3 residual block; ``shortcut`` "A" zero-pads channels (He et al. 2016 option A)."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = 0
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.pad = planes // 4  # parameter-free: subsample, then pad channels on both sides
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:
            skip = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            skip = self.shortcut(x)
        return F.relu(out + skip)


class CifarResNet(ImageClassifier):
    """ResNet for 32x32 inputs: a 3x3 stem and no initial max-pool."""

    def __init__(self, arch, num_classes, input_size, mean, std, widths, depths, shortcut, linear_name="linear"):
        super().__init__(arch, num_classes, input_size, mean, std)
        self.conv1 = nn.Conv2d(input_size[0], widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (planes, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.n_stages = len(widths)
        self.linear = nn.Linear(in_planes, num_classes)
        self.feature_dim = in_planes

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def head(self, features):
        return self.linear(features)

    @property
    def cam_layer(self):
        return getattr(self, f"layer{self.n_stages}")[-1]


class VGG16Dense(ImageClassifier):
    """VGG16 convolutional features plus a trainable dense head (Echeberria-Barrio et al. 2020, Fig. 3).

    Inputs smaller than 32 pixels are upsampled inside the model (VGG's five
    pools need at least 32), which keeps the [0, 1] contract for attacks.
    """

    def __init__(self, arch, num_classes, input_size, mean, std, hidden: int = 256, pretrained: bool = False):
        super().__init__(arch, num_classes, input_size, mean, std)
        from adv.models.imagenet import torchvision_backbone

        vgg = torchvision_backbone("vgg16", pretrained)
        self.features_net = vgg.features
        self.min_side = 32
        self.dense = nn.Sequential(nn.Linear(512, hidden), nn.ReLU(), nn.Dropout(0.5))
        self.classifier = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def forward_features(self, x):
        if x.shape[1] == 1:  # grey input: repeat to RGB so ImageNet features apply
            x = x.expand(-1, 3, -1, -1)
        if min(x.shape[-2:]) < self.min_side:
            x = F.interpolate(x, size=(self.min_side, self.min_side), mode="bilinear", align_corners=False)
        x = F.adaptive_avg_pool2d(self.features_net(x), 1).flatten(1)
        return self.dense(x)

    def head(self, features):
        return self.classifier(features)

    @property
    def cam_layer(self):
        return self.features_net[28]  # last conv of VGG16 (before its final ReLU/pool)


_CIFAR = dict(input_size=(3, 32, 32), default_num_classes=10, mean=IMAGENET_MEAN_STD[0], std=IMAGENET_MEAN_STD[1])


@register_model(ModelSpec(name="resnet20", description="CIFAR ResNet-20, option-A shortcuts (akamaster)", **_CIFAR))
def resnet20(**kw) -> CifarResNet:
    return CifarResNet(widths=(16, 32, 64), depths=(3, 3, 3), shortcut="A", **kw)


@register_model(ModelSpec(name="resnet18", description="ResNet-18, CIFAR variant (3x3 stem, no max-pool)", **_CIFAR))
def resnet18(**kw) -> CifarResNet:
    return CifarResNet(widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), shortcut="B", **kw)


@register_model(
    ModelSpec(
        name="vgg16_dense",
        description="VGG16 features + dense head (Echeberria-Barrio et al. 2020); "
                    "pretrained=True loads ImageNet VGG16 features",
        pretrained="VGG16_Weights.IMAGENET1K_V1",
        **_CIFAR,
    )
)
def vgg16_dense(**kw) -> VGG16Dense:
    return VGG16Dense(**kw)
