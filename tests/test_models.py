import pytest
import torch

from adv.data import load_dataset
from adv.errors import CheckpointError, ConfigError
from adv.models import (
    create_model, get_spec, list_models, load_checkpoint, load_external, save_checkpoint,
)
from adv.train import evaluate_accuracy
from tests.helpers import FASHION_DIR, SHARED_DATA, SHARED_MODELS, needs_shared_data

SMALL = [n for n in list_models() if "imagenet" not in get_spec(n).tags and n != "vgg16_dense"]
IMAGENET = [n for n in list_models() if "imagenet" in get_spec(n).tags]


@pytest.mark.parametrize("name", SMALL)
def test_small_model_forward_features_head(name):
    model = create_model(name).eval()
    x = torch.rand(3, *model.input_size)
    logits = model(x)
    assert logits.shape == (3, 10)
    feats = model.features(x)
    assert feats.shape == (3, model.feature_dim)
    assert torch.allclose(model.head(feats), logits, atol=1e-5)
    assert isinstance(model.cam_layer, torch.nn.Module)


@pytest.mark.parametrize("name", ["lenet", "resnet20"])
def test_small_models_adapt_to_other_inputs(name):
    model = create_model(name, num_classes=7, input_size=(3, 32, 32) if name == "lenet" else (1, 28, 28))
    assert model(torch.rand(2, *model.input_size)).shape == (2, 7)


def test_vgg16_dense_on_grey_28px():
    model = create_model("vgg16_dense", input_size=(1, 28, 28)).eval()
    x = torch.rand(2, 1, 28, 28)
    assert model(x).shape == (2, 10) and model.features(x).shape == (2, model.feature_dim)


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_model_forward_shape(name):
    model = create_model(name).eval()
    c, h, w = model.input_size
    with torch.no_grad():
        logits = model(torch.rand(1, c, h, w))
        feats = model.features(torch.rand(1, c, h, w))
    assert logits.shape == (1, 1000) and feats.shape == (1, model.feature_dim)


def test_imagenet_model_rejects_grey_input():
    with pytest.raises(ValueError, match="needs 3 input channels"):
        create_model("resnet50", input_size=(1, 224, 224))


def test_normalization_lives_inside_the_model():
    model = create_model("resnet20")
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert not any(k.startswith("normalize") for k in model.state_dict())


def test_unknown_model_and_bad_classes():
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ConfigError, match="unknown model 'lenett'; did you mean 'lenet'"):
        create_model("lenett")
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        create_model("lenet", num_classes=1)


def test_pretrained_offline_is_a_clear_error(monkeypatch, tmp_path):
    import torchvision

    def offline(self, *a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(CheckpointError, match="could not download pretrained .*Fix: go online"):
        create_model("mobilenet_v2", pretrained=True)


def test_checkpoint_roundtrip_with_metadata(tmp_path):
    model = create_model("lenet5", num_classes=4, input_size=(1, 16, 16)).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, dataset="digits", metrics={"test_acc": 0.5},
                           train_config={"lr": 0.1})
    raw = torch.load(path, weights_only=True)  # no pickled code needed
    assert raw["arch"] == "lenet5" and raw["input_size"] == [1, 16, 16]
    loaded, meta = load_checkpoint(path)
    assert meta["metrics"]["test_acc"] == 0.5 and meta["dataset"] == "digits"
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))


def test_bad_checkpoints_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an adv checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not match model 'lenet'"):
        load_external("lenet", tmp_path / "foreign.pt")


# --- the five real checkpoints in ../shared/data/models -----------------------
REAL = [
    ("mnist_lenet5_clntrained.pt", "lenet5", "mnist", 0.9889),
    ("mnist_lenet5_advtrained.pt", "lenet5", "mnist", 0.9864),
    ("mnist_convex_wong_kolter.pth", "convsmall", "mnist", 0.9820),
    ("fashion_mnist_convex_wong_kolter.pth", "convsmall", "fashion-mnist", 0.7827),
    ("cifar10_resnet20_akamaster.th", "resnet20", "cifar10", 0.94),
]


@needs_shared_data
@pytest.mark.parametrize("fname,arch,dataset,expected", REAL, ids=[r[0] for r in REAL])
def test_real_checkpoints_reproduce_clean_accuracy(fname, arch, dataset, expected):
    if dataset == "fashion-mnist" and not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian dataset-fashion-mnist not installed")
    model = load_external(arch, SHARED_MODELS / fname)
    data = load_dataset(dataset, split="test", root=SHARED_DATA)
    acc = evaluate_accuracy(model, data, batch_size=1000)
    assert abs(acc - expected) <= 0.003, f"{fname}: {acc:.4f} vs {expected}"


@pytest.mark.parametrize("name", ["lenet", "lenet5"])
def test_pooling_before_the_first_relu_gives_the_layers_own_outputs_and_gradients(name):
    """The two-conv nets pool their first conv's maps before the ReLU (a quarter of the values to rectify):
    bit for bit the outputs and input gradients of ReLU then pooling, the layout the checkpoints were trained in,
    also on constant (tied) regions and at exact zeros."""
    model = create_model(name).eval()
    torch.manual_seed(0)
    x = torch.rand(8, *model.input_size)
    x[:4, :, :10] = 0.0  # MNIST-like blank rows: every pooling window of the conv's maps there is a tie
    fc1, fc2 = (getattr(model, n) for n in model.fc_names)

    def relu_then_pool(v):
        v = torch.max_pool2d(torch.relu(model.conv1(model.normalize(v))), 2)
        v = torch.max_pool2d(model.act2(model.conv2(v)), 2)
        return fc2(torch.relu(fc1(v.flatten(1))))

    outs, grads = [], []
    for f in (model, relu_then_pool):
        xi = x.clone().requires_grad_(True)
        out = f(xi)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out[:, 3].sum() - out[:, 5].sum(), xi)[0])
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("name", ["lenet", "lenet5", "convsmall"])
def test_cam_layer_gives_rectified_maps(name):
    """Grad-CAM hooks the rectified last-conv maps: non-negative activations of the right rank."""
    model = create_model(name).eval()
    seen = []
    handle = model.cam_layer.register_forward_hook(lambda m, i, o: seen.append(o))
    model(torch.rand(2, *model.input_size))
    handle.remove()
    assert seen and seen[0].ndim == 4 and seen[0].min() >= 0


@needs_shared_data
def test_gradcam_maps_of_a_real_model_are_not_blank():
    from adv.explain.cam import grad_cam

    model = load_external("lenet5", SHARED_MODELS / "mnist_lenet5_clntrained.pt")
    x, _ = load_dataset("mnist", split="test", root=SHARED_DATA, n=64).tensors()
    cams = grad_cam(model, x, create_graph=False)
    assert (cams.flatten(1).amax(1) > 0).float().mean() >= 0.95
