"""Property tests of every registered attack, generated from the registry, on a tiny trained CNN."""

from __future__ import annotations

import math

import pytest
import torch

from adv.attacks import QueryOracle, get_attack, list_attacks
from adv.attacks.apgd import checkpoints
from adv.attacks.core import cw_loss, dlr_loss, dlr_targeted_loss, project
from adv.attacks.oracle import as_oracle
from adv.attacks.square import p_selection
from adv.errors import ConfigError
from tests.attack_helpers import NUM_CLASSES, synthetic

ALL = list_attacks()
#: Small budgets so the whole matrix runs in seconds; applied where an attack takes the key.
FAST = {"steps": 5, "queries": 60, "binary_steps": 3, "init_evals": 20, "max_evals": 60, "init_trials": 20}
EPS = {"linf": 0.1, "l2": 0.5}


pytestmark = pytest.mark.usefixtures("single_threaded")  # ``model`` (the tiny CNN) comes from conftest.py


@pytest.fixture(scope="module")
def data():
    return synthetic(40, seed=7)


def fast(name: str, **kw) -> dict:
    spec = get_attack(name)
    return {**{k: v for k, v in FAST.items() if k in spec.defaults}, **kw}


def attack(name, model, x, y, **kw):
    """x_adv of any attack (query attacks' counts dropped)."""
    spec = get_attack(name)
    out = spec(model, x, y, **fast(name, **kw))
    return out[0] if spec.family == "query" else out


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def seeded(name: str) -> dict:
    return {"seed": 0} if get_attack(name).randomized else {}


# --- registry ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_spec_metadata_is_consistent(name):
    spec = get_attack(name)
    assert spec.family in ("whitebox", "query")
    assert spec.norms and set(spec.norms) <= {"linf", "l2"}
    assert (spec.oracle in ("probs", "labels")) == (spec.family == "query")
    assert spec.randomized <= ("seed" in spec.defaults)
    assert not {"eps", "norm", "targeted", "y_target"} & set(spec.defaults)


def test_registry_lists_the_issue_attacks_and_variants():
    expected = {"fgsm", "bim", "pgd", "pgd_cw", "stepll", "iter_stepll", "deepfool", "cw", "a3", "a3_stepll",
                "apgd_ce", "apgd_dlr", "square", "hopskipjump"}
    assert expected <= set(ALL)
    assert get_attack("apgd_dlr").defaults["loss"] == "dlr" and get_attack("apgd").defaults["loss"] == "ce"
    assert list_attacks(family="query") == ["hopskipjump", "square", "square_l2"]
    with pytest.raises(ValueError, match="nope"):
        get_attack("nope")
    from adv.attacks import describe_attack

    assert "query" in describe_attack("square") and "l2" in describe_attack("cw")


def test_registry_metadata_is_data_that_list_attacks_filters_on():
    assert list_attacks(detector_aware=True) == ["bim", "fgsm", "pgd"]  # the FGM step and PGD loop
    assert list_attacks(training=True) == ["bim", "fgsm", "pgd"]
    assert list_attacks(a3_base=True) == ["fgsm", "iter_stepll", "pgd", "stepll"]
    iterative = set(list_attacks(family="whitebox", iterative=True))
    assert {"pgd", "apgd_ce", "apgd_t", "fab_t", "bim", "iter_stepll", "cw", "deepfool", "a3"} <= iterative
    assert not {"fgsm", "stepll", "a3_fgsm", "a3_stepll"} & iterative  # variants override the base's metadata
    assert list_attacks("apgd*", iterative=True) == ["apgd", "apgd_ce", "apgd_dlr", "apgd_t"]
    with pytest.raises(ValueError, match="cannot filter attacks by \\['colour'\\]"):
        list_attacks(colour="red")


def test_spec_run_is_the_family_dispatch(model, data):
    x, y = data
    x_adv, queries = get_attack("fgsm").run(model, x, y, eps=0.1)
    assert queries is None and torch.equal(x_adv, get_attack("fgsm")(model, x, y, eps=0.1))
    x_adv, queries = get_attack("hopskipjump").run(model, x, y, eps=1.0, steps=2, max_evals=20, seed=0)
    assert queries.shape == (len(x),) and (queries > 0).all()  # a fresh counted label oracle of the model


# --- properties of every attack ---------------------------------------------------------
@pytest.mark.parametrize("name,norm", [(n, p) for n in ALL for p in get_attack(n).norms])
def test_output_in_eps_ball_and_unit_range(model, data, name, norm):
    x, y = data
    eps = EPS[norm]
    x_adv = attack(name, model, x, y, eps=eps, norm=norm, **seeded(name))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all(), size.max()


@pytest.mark.parametrize("name", ALL)
def test_eps_zero_is_identity(model, data, name):
    x, y = data
    assert torch.equal(attack(name, model, x, y, eps=0.0, norm=get_attack(name).norms[0]), x)


@pytest.mark.parametrize("name", ALL)
def test_no_mutation_mode_flags_or_global_rng(model, data, name):
    x, y = data
    x0, y0 = x.clone(), y.clone()
    model.train()
    model.conv1.weight.requires_grad_(False)
    rng = torch.get_rng_state()
    try:
        attack(name, model, x, y, eps=EPS[get_attack(name).norms[0]], norm=get_attack(name).norms[0])
        assert all(m.training for m in model.modules())
        assert [p.requires_grad for p in model.parameters()] == [False, True, True, True, True, True]
        assert torch.equal(torch.get_rng_state(), rng)
        assert torch.equal(x, x0) and torch.equal(y, y0)
    finally:
        model.eval()
        model.conv1.weight.requires_grad_(True)


@pytest.mark.parametrize("name", [n for n in ALL if get_attack(n).randomized])
def test_seeded_runs_are_deterministic(model, data, name):
    x, y = data
    norm = get_attack(name).norms[0]
    a = attack(name, model, x, y, eps=EPS[norm], norm=norm, seed=3)
    b = attack(name, model, x, y, eps=EPS[norm], norm=norm, seed=3)
    c = attack(name, model, x, y, eps=EPS[norm], norm=norm, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", ALL)
def test_bad_arguments_raise_value_error_naming_the_value(model, data, name):
    x, y = data
    spec = get_attack(name)
    norm = spec.norms[0]
    with pytest.raises(ValueError, match="-0.5"):
        spec(model, x, y, eps=-0.5, norm=norm)
    with pytest.raises(ValueError, match="'l3'"):
        spec(model, x, y, eps=0.1, norm="l3")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        spec(model, x * 3, y, eps=0.1, norm=norm)
    with pytest.raises(ValueError, match="bogus"):
        spec(model, x, y, eps=0.1, norm=norm, bogus=1)
    with pytest.raises(ValueError, match="shape"):
        spec(model, x, y[:3], eps=0.1, norm=norm)
    if not spec.minimal:
        with pytest.raises(ValueError, match="inf"):
            spec(model, x, y, eps=math.inf, norm=norm)
    if spec.targeted:
        with pytest.raises(ValueError, match="y_target"):
            spec(model, x, y, eps=0.1, norm=norm, targeted=True)
    else:
        with pytest.raises(ValueError, match="targeted"):
            spec(model, x, y, eps=0.1, norm=norm, targeted=True, y_target=y)


@pytest.mark.parametrize("name", [n for n in ALL if get_attack(n).targeted])
def test_targeted_attacks_hit_their_target(model, data, name):
    x, y = data
    spec = get_attack(name)
    norm = spec.norms[0]
    target = (y + 1) % NUM_CLASSES
    kw = {"steps": 20, "queries": 500}
    kw = {k: v for k, v in kw.items() if k in spec.defaults and name != "cw"}  # CW: its own defaults
    out = spec(model, x, y, eps={"linf": 0.5, "l2": 4.0}[norm], norm=norm, targeted=True, y_target=target,
               **kw, **seeded(name))
    x_adv = out[0] if spec.family == "query" else out
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    if name == "pgd_dlr":
        # targeted DLR rewards z_t - z_y over the top-class gap: with fixed PGD steps it can push y to the
        # bottom without lifting t to the top (APGD's step-size control does reach it, see apgd_dlr)
        assert (pred != y).float().mean() >= 0.95 and (pred == target).float().mean() >= 0.3
        return
    hit = (pred == target).float().mean().item()
    assert hit >= (0.7 if name == "fgsm" else 0.95), hit


@pytest.mark.parametrize("name", list_attacks(family="query"))
def test_query_attacks_count_every_query(model, data, name):
    x, y = data
    seen = []

    class Counting(torch.nn.Module):
        def forward(self, inp):
            seen.append(len(inp))
            return model(inp)

    oracle = QueryOracle(Counting(), output=get_attack(name).oracle, batch_size=1000)
    x_adv, n_queries = get_attack(name)(oracle, x, y, eps=EPS[get_attack(name).norms[0]], seed=0,
                                        **fast(name))
    assert n_queries.shape == (len(x),) and n_queries.dtype == torch.long
    assert (n_queries > 0).all()
    assert int(n_queries.sum()) == oracle.total == sum(seen)
    if name == "square":
        assert n_queries.max() <= FAST["queries"]


# --- strength ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bim", "pgd", "pgd_cw", "pgd_dlr", "apgd_ce", "apgd_dlr"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_iterative_attacks_never_weaker_than_fgsm(model, data, name, norm):
    x, y = data
    eps = {"linf": 0.08, "l2": 0.6}[norm]
    steps = {"steps": 10}
    fgsm_acc = accuracy(model, attack("fgsm", model, x, y, eps=eps, norm=norm), y)
    assert accuracy(model, attack(name, model, x, y, eps=eps, norm=norm, **steps, **seeded(name)), y) <= fgsm_acc


def _fgsm_min_l2(model, x, y) -> torch.Tensor:
    """Per example, the smallest L2 budget on a fine grid at which FGSM (L2) fools the model."""
    need = torch.full((len(x),), math.inf)
    for eps in torch.linspace(0.05, 6.0, 120).tolist():
        with torch.no_grad():
            fooled = model(get_attack("fgsm")(model, x, y, eps=eps, norm="l2")).argmax(1) != y
        need = torch.where(fooled & need.isinf(), torch.tensor(eps), need)
    return need


@pytest.mark.parametrize("name", ["cw", "deepfool"])
def test_minimal_attacks_find_smaller_l2_than_fgsm_needs(model, data, name):
    x, y = data
    x_adv = get_attack(name)(model, x, y, eps=math.inf, norm="l2")
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    assert fooled.float().mean() >= 0.95
    need = _fgsm_min_l2(model, x, y)
    both = fooled & need.isfinite()
    l2 = (x_adv - x).flatten(1).norm(dim=1)
    assert both.sum() >= 0.9 * len(x)
    assert l2[both].mean() < need[both].mean()
    assert (l2[both] <= need[both] + 1e-3).float().mean() >= 0.8


def test_hopskipjump_walks_towards_the_boundary(model, data):
    x, y = data
    hsj = get_attack("hopskipjump")
    short, _ = hsj(model, x, y, eps=math.inf, norm="l2", steps=1, init_evals=20, seed=0)
    longer, _ = hsj(model, x, y, eps=math.inf, norm="l2", steps=8, init_evals=20, seed=0)
    with torch.no_grad():
        assert (model(longer).argmax(1) != y).all()
    dist = lambda a: (a - x).flatten(1).norm(dim=1).mean()  # noqa: E731
    assert dist(longer) < dist(short)


def test_early_stop_and_restarts_are_never_weaker(model, data):
    x, y = data
    kw = dict(eps=0.07, steps=10, seed=5)
    plain = accuracy(model, get_attack("pgd")(model, x, y, **kw), y)
    assert accuracy(model, get_attack("pgd")(model, x, y, early_stop=True, **kw), y) <= plain
    assert accuracy(model, get_attack("pgd")(model, x, y, restarts=3, **kw), y) <= plain
    assert accuracy(model, get_attack("apgd")(model, x, y, eps=0.07, steps=10, seed=5, restarts=3), y) <= \
        accuracy(model, get_attack("apgd")(model, x, y, eps=0.07, steps=10, seed=5), y)


def test_bim_is_pgd_without_random_start(model, data):
    x, y = data
    bim = get_attack("bim")(model, x, y, eps=0.1, steps=7, step_size=0.02)
    pgd = get_attack("pgd")(model, x, y, eps=0.1, steps=7, step_size=0.02, rand_init=False)
    assert torch.equal(bim, pgd)


def test_fgsm_follows_eq5_and_eq6(model, data):
    x, y = data
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)[0]
    expected = (x + 0.1 * grad.sign()).clamp(0, 1)
    assert torch.allclose(get_attack("fgsm")(model, x, y, eps=0.1), expected)
    t = (y + 2) % NUM_CLASSES
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), t, reduction="sum"), xg)[0]
    expected = (x - 0.1 * grad.sign()).clamp(0, 1)
    assert torch.allclose(get_attack("fgsm")(model, x, y, eps=0.1, targeted=True, y_target=t), expected)
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert torch.equal(get_attack("fgsm")(model, x, None, eps=0.1), get_attack("fgsm")(model, x, pred, eps=0.1))


def test_stepll_steps_towards_the_least_likely_class(model, data):
    x, y = data
    with torch.no_grad():
        ll = model(x).argmin(1)
        before = model(x).log_softmax(1).gather(1, ll[:, None])
        after = model(get_attack("stepll")(model, x, y, eps=0.05)).log_softmax(1).gather(1, ll[:, None])
    assert (after > before).float().mean() >= 0.9
    iter_ll = get_attack("iter_stepll")(model, x, y, eps=0.5, steps=20)
    with torch.no_grad():
        assert (model(iter_ll).argmax(1) == ll).float().mean() >= 0.9


# --- shared pieces ------------------------------------------------------------------------
def test_losses():
    z = torch.randn(6, NUM_CLASSES)
    y = torch.arange(6) % NUM_CLASSES
    t = (y + 1) % NUM_CLASSES
    assert torch.allclose(dlr_loss(3 * z + 2, y), dlr_loss(z, y), atol=1e-5)
    assert torch.allclose(dlr_targeted_loss(3 * z + 2, y, t), dlr_targeted_loss(z, y, t), atol=1e-5)
    margin = cw_loss(z, y)
    other = z.clone()
    other[torch.arange(6), y] = -math.inf
    assert torch.allclose(margin, other.amax(1) - z[torch.arange(6), y])
    assert (cw_loss(z, y, margin_cap=0.0) <= 0).all()
    with pytest.raises(ValueError, match="3 classes"):
        dlr_loss(torch.randn(2, 2), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_is_onto_the_ball_and_idempotent(norm):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 6, 6, generator=g)
    far = x + torch.randn(8, 1, 6, 6, generator=g)
    p = project(far, x, 0.3, norm)
    size = (p - x).flatten(1).abs().amax(1) if norm == "linf" else (p - x).flatten(1).norm(dim=1)
    assert (size <= 0.3 + 1e-6).all() and p.min() >= 0 and p.max() <= 1
    assert torch.allclose(project(p, x, 0.3, norm), p)


def test_apgd_checkpoints_follow_croce_hein():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert checkpoints(100) == [round(100 * q) for q in p[1:]]


def test_square_p_schedule():
    assert p_selection(0.8, 0, 10000) == 0.8
    assert p_selection(0.8, 11, 10000) == 0.4
    assert p_selection(0.8, 600, 10000) == 0.8 / 16
    assert p_selection(0.8, 9000, 10000) == 0.8 / 512
    assert p_selection(0.8, 60, 1000) == 0.8 / 16  # rescaled to the budget


def test_query_oracle(model, data):
    x, y = data
    oracle = QueryOracle(model, output="probs")
    probs = oracle(x[:4], torch.tensor([0, 0, 3, 9]))
    assert torch.allclose(probs.sum(1), torch.ones(4))
    assert oracle.used(10).tolist() == [2, 0, 0, 1, 0, 0, 0, 0, 0, 1] and oracle.total == 4
    labels = QueryOracle(model, output="labels")(x[:4])
    assert labels.dtype == torch.long and torch.equal(labels, probs.argmax(1))
    with pytest.raises(ValueError, match="'logits'"):
        QueryOracle(model, output="logits")
    with pytest.raises(ValueError, match="'labels'"):
        as_oracle(QueryOracle(model, output="labels"), "probs")


# --- Grad-CAM and A3Attack -------------------------------------------------------------------
def test_grad_cam_is_differentiable_and_releases_its_hooks(model, data):
    from adv.explain import grad_cam

    x, y = data
    xg = x[:6].clone().requires_grad_(True)
    cam = grad_cam(model, xg, class_idx=y[:6])
    assert cam.shape == (6, 6, 6) and (cam >= 0).all() and cam.sum() > 0
    (g,) = torch.autograd.grad(cam.sum(), xg)
    assert g.abs().sum() > 0
    assert not model.conv2._forward_hooks
    detached = grad_cam(model, x[:6], class_idx=y[:6], create_graph=False)
    assert not detached.requires_grad and torch.allclose(detached, cam.detach(), atol=1e-6)


def test_grad_cam_releases_hooks_when_the_forward_fails(model):
    from adv.explain import grad_cam

    with pytest.raises(RuntimeError):
        grad_cam(model, torch.rand(2, 3, 12, 12))  # wrong channel count
    assert not model.conv2._forward_hooks
    with pytest.raises(ValueError, match="cam_layer"):
        grad_cam(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 5)), torch.rand(2, 1, 12, 12))


def test_grad_cam_matches_pytorch_grad_cam(model, data):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from adv.explain import grad_cam, normalize_cam

    x, y = data
    ours = normalize_cam(grad_cam(model, x[:5], class_idx=y[:5], create_graph=False))
    ours = torch.nn.functional.interpolate(ours[:, None], size=x.shape[-2:], mode="bilinear")[:, 0]
    with pgc.GradCAM(model=model, target_layers=[model.conv2]) as cam:
        theirs = cam(input_tensor=x[:5], targets=[ClassifierOutputTarget(int(c)) for c in y[:5]])
    ours = ours - ours.amin((1, 2), keepdim=True)
    ours = ours / ours.amax((1, 2), keepdim=True).clamp_min(1e-7)
    assert torch.allclose(ours, torch.as_tensor(theirs), atol=2e-2)


def test_attention_area():
    from adv.explain import attention_area

    cam = torch.tensor([[[0.0, 1.0], [3.0, 4.0]]])
    assert attention_area(cam).tolist() == [[[0.0, 0.0], [1.0, 1.0]]]  # mean 2
    assert attention_area(cam, threshold=0.5).tolist() == [[[0.0, 1.0], [1.0, 1.0]]]
    soft = attention_area(cam, soft=True)
    assert ((soft > 0.5) == attention_area(cam).bool()).all() and ((soft > 0) & (soft < 1)).all()
    with pytest.raises(ValueError, match="'median'"):
        attention_area(cam, threshold="median")


def test_a3_needs_a_conv_layer(data):
    x, y = data
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, NUM_CLASSES))
    with pytest.raises(ValueError, match="cam_layer"):
        get_attack("a3")(flat, x, y, eps=0.1)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(400, NUM_CLASSES))
    x_adv = get_attack("a3")(conv, x, y, eps=0.1, layer=conv[0], steps=2, seed=0)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_a3_with_attention_weight_zero_is_its_base_attack(model, data):
    x, y = data
    a3 = get_attack("a3")
    assert torch.allclose(a3(model, x, y, eps=0.1, attention_weight=0.0, steps=5, seed=1),
                          get_attack("pgd")(model, x, y, eps=0.1, steps=5, seed=1), atol=1e-6)
    assert torch.allclose(get_attack("a3_stepll")(model, x, y, eps=0.1, attention_weight=0.0),
                          get_attack("stepll")(model, x, y, eps=0.1), atol=1e-6)
    assert torch.allclose(get_attack("a3_fgsm")(model, x, y, eps=0.1, attention_weight=0.0),
                          get_attack("fgsm")(model, x, y, eps=0.1), atol=1e-6)


@pytest.mark.parametrize("attack,old,new", [
    ("cw", "kappa", "confidence"), ("a3", "sigma", "attention_weight"), ("a3_fgsm", "kappa", "attention_threshold"),
])
def test_renamed_hyperparameters_fail_naming_the_new_name(model, data, attack, old, new):
    x, y = data
    with pytest.raises(ConfigError, match=f"'{old}' was renamed to '{new}'"):
        get_attack(attack)(model, x, y, eps=0.1, **{old: 1.0})


def test_a3_moves_the_attention_away(model, data):
    from adv.explain import attention_area, grad_cam, normalize_cam

    x, y = data
    att = attention_area(grad_cam(model, x, class_idx=y, create_graph=False))

    def deviation(x_adv):
        return (att - normalize_cam(grad_cam(model, x_adv, class_idx=y, create_graph=False))).abs().mean()

    # iterated (one sign step from x barely moves the max-normalised map on this model)
    plain = get_attack("a3")(model, x, y, eps=0.1, attention_weight=0.0, steps=5, seed=0)
    with_att = get_attack("a3")(model, x, y, eps=0.1, attention_weight=10.0, steps=5, seed=0)
    assert deviation(with_att) > deviation(plain) + 0.01


# --- fast paths ----------------------------------------------------------------------------
def test_channels_last_and_autocast_paths(model, data):
    from adv.evaluate import fast_model

    x, y = data
    cl = fast_model(model, channels_last=True)
    assert model.conv1.weight.is_contiguous()  # the caller's model is untouched
    with torch.no_grad():
        assert torch.allclose(cl(x), model(x), atol=1e-5)
    assert torch.allclose(get_attack("pgd")(cl, x, y, eps=0.1, steps=5, seed=0),
                          get_attack("pgd")(model, x, y, eps=0.1, steps=5, seed=0), atol=1e-5)
    bf16 = fast_model(model, amp="bf16")
    with torch.no_grad():
        out = bf16(x)
    assert out.dtype == torch.float32 and torch.allclose(out, model(x).detach(), atol=0.1, rtol=0.05)
    assert abs(accuracy(model, get_attack("pgd")(bf16, x, y, eps=0.1, steps=5, seed=0), y)
               - accuracy(model, get_attack("pgd")(model, x, y, eps=0.1, steps=5, seed=0), y)) <= 0.1
    with pytest.raises(ValueError, match="'fp8'"):
        fast_model(model, amp="fp8")


def test_hopskipjump_with_no_adversarial_start_returns_the_input():
    """A constant model has no decision boundary: no start is found, and a finite eps must not crash."""
    model = torch.nn.Linear(16, 3)
    torch.nn.init.zeros_(model.weight)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    x = torch.rand(2, 1, 4, 4)
    flat = torch.nn.Sequential(torch.nn.Flatten(), model)
    x_adv, queries = get_attack("hopskipjump")(flat, x, torch.zeros(2, dtype=torch.long), eps=0.1, norm="linf",
                                               init_trials=3, steps=2)
    assert torch.equal(x_adv, x) and (queries > 0).all()
