"""Small CNNs for MNIST-sized data (and anything else small: they adapt).

``lenet`` is the Madry et al. MNIST network; ``lenet5`` and ``convsmall``
reproduce the layouts of the advertorch and Wong-Kolter checkpoints in
``../shared/data/models`` so those files load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from adv.models.base import ImageClassifier
from adv.models.registry import MNIST_MEAN_STD, ModelSpec, register_model


class _TwoConvNet(ImageClassifier):
    """conv32-pool-conv64-pool-fc(hidden)-fc, the layout MadryLeNet and LeNet5 share.

    Subclasses set the kernel size, the hidden width and ``fc_names``: their checkpoints name the two linear layers
    differently (``fc1``/``fc2`` vs advertorch's ``linear1``/``linear2``), so the names stay the files'.
    """

    fc_names: tuple[str, str]

    def __init__(self, arch, num_classes, input_size, mean, std, *, kernel: int, hidden: int):
        super().__init__(arch, num_classes, input_size, mean, std)
        c, h, w = input_size
        self.conv1 = nn.Conv2d(c, 32, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(32, 64, kernel, padding=kernel // 2)
        self.act2 = nn.ReLU()  # a module, so Grad-CAM can hook the rectified maps
        self.add_module(self.fc_names[0], nn.Linear(64 * (h // 4) * (w // 4), hidden))
        self.add_module(self.fc_names[1], nn.Linear(hidden, num_classes))
        self.feature_dim = hidden

    def forward_features(self, x):
        x = torch.relu(torch.max_pool2d(self.conv1(x), 2))  # the same as ReLU then pooling, on a quarter of the values
        x = torch.max_pool2d(self.act2(self.conv2(x)), 2)
        return torch.relu(getattr(self, self.fc_names[0])(x.flatten(1)))

    def head(self, features):
        return getattr(self, self.fc_names[1])(features)

    @property
    def cam_layer(self):
        # Rectified last-conv maps, as Grad-CAM uses them (Selvaraju et al.); on the raw conv
        # output ~40% of a Fashion-MNIST lenet's maps come out all zero.
        return self.act2


class MadryLeNet(_TwoConvNet):
    """conv32(5x5)-pool-conv64(5x5)-pool-fc1024 (Madry et al. 2018, MNIST challenge)."""

    fc_names = ("fc1", "fc2")

    def __init__(self, arch, num_classes, input_size, mean, std):
        super().__init__(arch, num_classes, input_size, mean, std, kernel=5, hidden=1024)


class LeNet5(_TwoConvNet):
    """advertorch's LeNet5: conv32(3x3)-pool-conv64(3x3)-pool-fc200."""

    fc_names = ("linear1", "linear2")

    def __init__(self, arch, num_classes, input_size, mean, std):
        super().__init__(arch, num_classes, input_size, mean, std, kernel=3, hidden=200)


class ConvSmall(ImageClassifier):
    """Wong & Kolter's provably robust "small" net: two stride-2 convs and fc100."""

    def __init__(self, arch, num_classes, input_size, mean, std):
        super().__init__(arch, num_classes, input_size, mean, std)
        c, h, w = input_size
        # Indices match the nn.Sequential the convex_adversarial checkpoints were saved from.
        self.layers = nn.Sequential(
            nn.Conv2d(c, 16, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * (h // 4) * (w // 4), 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )
        self.feature_dim = 100

    def forward_features(self, x):
        return self.layers[:7](x)

    def head(self, features):
        return self.layers[7](features)

    @property
    def cam_layer(self):
        return self.layers[3]  # the ReLU after the last conv: rectified maps

    def load_external_state_dict(self, state_dict):
        self.load_state_dict({f"layers.{k}": v for k, v in state_dict.items()}, strict=True)


_SMALL = dict(input_size=(1, 28, 28), default_num_classes=10, mean=MNIST_MEAN_STD[0], std=MNIST_MEAN_STD[1])


@register_model(ModelSpec(name="lenet", description="Madry MNIST net: conv32-conv64-fc1024", **_SMALL))
def lenet(**kw) -> MadryLeNet:
    return MadryLeNet(**kw)


@register_model(ModelSpec(name="lenet5", description="advertorch LeNet5: conv32-conv64-fc200", **_SMALL))
def lenet5(**kw) -> LeNet5:
    return LeNet5(**kw)


@register_model(ModelSpec(name="convsmall", description="Wong-Kolter small convex-robust net", **_SMALL))
def convsmall(**kw) -> ConvSmall:
    return ConvSmall(**kw)
