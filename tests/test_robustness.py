"""The AutoAttack-protocol evaluator: worst case, batching, resumable state, sanity flags."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from adv.attacks import get_attack
from adv.evaluate import RobustnessWarning, eps_sweep, robust_accuracy
from adv.evaluate.checks import check_steps
from tests.attack_helpers import synthetic

EPS = 0.08


pytestmark = pytest.mark.usefixtures("single_threaded")  # ``model`` (the tiny CNN) comes from conftest.py


@pytest.fixture(scope="module")
def data():
    return synthetic(60, seed=11)


def quiet(*args, **kw):
    kw.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RobustnessWarning)
        return robust_accuracy(*args, **kw)


def fooled(model, attack, x, y, **kw):
    with torch.no_grad():
        return model(get_attack(attack)(model, x, y, eps=EPS, **kw)).argmax(1) != y


def test_worst_case_is_the_union_of_successes(model, data):
    x, y = data
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    by_hand = clean & ~fooled(model, "fgsm", x, y) & ~fooled(model, "bim", x, y, steps=5)
    res = quiet(model, data, ["fgsm", ("bim", {"steps": 5})], eps=EPS, early_stop=False)
    assert res.n == 60 and res.clean_acc == pytest.approx(clean.float().mean().item())
    assert res.robust_acc == pytest.approx(by_hand.float().mean().item())
    assert [a.label for a in res.attacks] == ["fgsm", "bim(steps=5)"]
    assert res.attacks[0].n_attacked == int(clean.sum())
    assert res.attacks[1].n_attacked == int(clean.sum()) - res.attacks[0].n_fooled
    assert res.attacks[-1].robust_acc_after == pytest.approx(res.robust_acc)
    assert res.attacks[0].robust_acc_after >= res.attacks[1].robust_acc_after
    assert 0 < res.attacks[0].mean_linf <= EPS + 1e-6 and res.attacks[0].mean_l0 > 0


def test_results_do_not_depend_on_batching_or_data_format(model, data):
    x, y = data
    attacks = ["fgsm", ("bim", {"steps": 3})]
    ref = quiet(model, data, attacks, eps=EPS, batch_size=64)
    for source, bs in [(data, 7), ([(x[:25], y[:25]), (x[25:], y[25:])], 10), (iter([(x, y)]), 16)]:
        res = quiet(model, source, attacks, eps=EPS, batch_size=bs)
        assert res.robust_acc == ref.robust_acc and res.n == 60
        assert [a.n_fooled for a in res.attacks] == [a.n_fooled for a in ref.attacks]


def test_randomized_attacks_are_seeded_per_batch(model, data):
    a = quiet(model, data, ["pgd"], eps=EPS, seed=3, batch_size=16)
    b = quiet(model, data, ["pgd"], eps=EPS, seed=3, batch_size=16)
    assert a.robust_acc == b.robust_acc and a.to_dict()["attacks"][0]["n_fooled"] == b.attacks[0].n_fooled


def test_query_attacks_report_queries(model, data):
    res = quiet(model, data, [("square", {"queries": 30})], eps=EPS)
    rep = res.attacks[0]
    assert rep.family == "query" and 1 < rep.mean_queries <= 30


def test_result_is_json_serialisable(model, data):
    res = quiet(model, data, ["fgsm"], eps=EPS)
    d = json.loads(res.to_json())
    assert {"n", "eps", "norm", "clean_acc", "robust_acc", "attacks", "flags", "time_s"} <= set(d)
    assert d["attacks"][0]["success_rate"] == res.attacks[0].success_rate
    assert "fgsm" in str(res)


def test_state_resumes_after_an_interruption(model, data, tmp_path):
    state = tmp_path / "state.json"
    calls = {"n": 0}

    def flaky(m, x, y, *, eps, norm):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return get_attack("fgsm")(m, x, y, eps=eps, norm=norm)

    flaky.__name__ = "fgsm_flaky"
    with pytest.raises(KeyboardInterrupt):
        quiet(model, data, [flaky], eps=EPS, batch_size=20, state_path=str(state))
    saved = json.loads(state.read_text())
    assert len(saved["batch_hashes"]) == 2 and not saved["done"]
    res = quiet(model, data, [flaky], eps=EPS, batch_size=20, state_path=str(state))
    assert calls["n"] == 4  # only the third batch was attacked again
    ref = quiet(model, data, ["fgsm"], eps=EPS, batch_size=20)
    assert res.robust_acc == ref.robust_acc and res.attacks[0].n_fooled == ref.attacks[0].n_fooled
    assert json.loads(state.read_text())["robust_mask"].count("1") == round(res.robust_acc * 60)
    with pytest.raises(ValueError, match="different evaluation"):
        quiet(model, data, [flaky], eps=0.2, batch_size=20, state_path=str(state))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.bias += 0.1
    with pytest.raises(ValueError, match="different evaluation"):
        quiet(other, data, [flaky], eps=EPS, batch_size=20, state_path=str(state))
    x, y = data
    with pytest.raises(ValueError, match="data changed"):
        quiet(model, (x.flip(0), y.flip(0)), [flaky], eps=EPS, batch_size=20, state_path=str(state))


def test_bad_arguments(model, data):
    with pytest.raises(ValueError, match="'l3'"):
        quiet(model, data, ["fgsm"], eps=EPS, norm="l3")
    with pytest.raises(ValueError, match="-1"):
        quiet(model, data, ["fgsm"], eps=-1)
    with pytest.raises(ValueError, match="'linf'"):
        quiet(model, data, ["cw"], eps=EPS)
    with pytest.raises(ValueError, match="bogus"):
        quiet(model, data, [("pgd", {"bogus": 1})], eps=EPS)
    with pytest.raises(ValueError, match="'sigma' was renamed to 'attention_weight'"):
        quiet(model, data, [("a3", {"sigma": 1.0})], eps=EPS)
    with pytest.raises(ValueError, match="nope"):
        quiet(model, data, ["nope"], eps=EPS)
    with pytest.raises(ValueError, match="'sometimes'"):
        quiet(model, data, ["fgsm"], eps=EPS, checks=["sometimes"])


# --- sanity flags ------------------------------------------------------------------------
class Softmaxed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


class Noisy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 0.5 * torch.randn(len(x), 5)


class Masked(nn.Module):
    """Quantised input: zero gradients almost everywhere (shattered gradients, Athalye et al. 2018)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


def codes(res) -> set[str]:
    return {f.code for f in res.flags}


def test_clean_model_raises_no_flags(model, data):
    res = quiet(model, data, ["fgsm", ("pgd", {"steps": 8})], eps=EPS, checks="all")
    assert codes(res) == set()


def test_softmax_and_randomness_are_flagged(model, data):
    assert "softmax_output" in codes(quiet(Softmaxed(model), data, ["fgsm"], eps=EPS))
    assert "randomized_model" in codes(quiet(Noisy(model), data, ["fgsm"], eps=EPS))


def test_masked_gradients_are_flagged(model, data):
    masked = Masked(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = robust_accuracy(masked, data, [("pgd", {"steps": 8}), ("square", {"queries": 200})], eps=0.3,
                              checks="all", progress=False)
    expected = {"zero_gradients", "query_beats_whitebox", "eps_not_to_zero"}
    assert expected <= codes(res)
    warned = {str(w.message).split(":")[0] for w in caught if w.category is RobustnessWarning}
    assert expected <= warned and all(w.filename == __file__ for w in caught)


def test_warnings_point_at_the_users_call_however_deep_the_library_ran(model, data):
    import adv

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adv.benchmark(Softmaxed(model).eval(), data, eps=EPS, suite=None, attacks=["fgsm"], progress=False)
        eps_sweep(Softmaxed(model).eval(), data, ["fgsm"], [EPS], checks=("softmax_output",))
    warned = [w for w in caught if w.category is RobustnessWarning]
    assert len(warned) == 2 and all("softmax_output" in str(w.message) for w in warned)
    assert [w.filename for w in warned] == [__file__, __file__]  # not adv/evaluate/benchmark.py or sweep.py


def test_to_pandas_per_attack_and_per_example(model, data, monkeypatch):
    import sys

    res = quiet(model, data, ["fgsm", ("bim", {"steps": 5})], eps=EPS, early_stop=False)
    attacks = res.to_pandas()
    assert attacks["label"].tolist() == ["fgsm", "bim(steps=5)"]
    assert attacks["n_fooled"].tolist() == [a.n_fooled for a in res.attacks]
    assert attacks["robust_acc_after"].iloc[-1] == res.robust_acc
    assert (attacks["robust_acc_after_lo"] <= attacks["robust_acc_after"]).all()
    ex = res.to_pandas("example")
    assert len(ex) == res.n and ex["robust"].mean() == pytest.approx(res.robust_acc)
    broken = (ex["fgsm"] == "fooled") | (ex["bim(steps=5)"] == "fooled")
    assert broken.sum() == (ex["clean"] & ~ex["robust"]).sum() > 0
    assert (ex.loc[~ex["clean"], "fgsm"] == "not attacked").all()  # wrong already: never attacked
    assert (ex.loc[ex["fgsm"] == "fooled", "bim(steps=5)"] == "not attacked").all()  # broken by the first
    with pytest.raises(ValueError, match="per must be"):
        res.to_pandas("batch")
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if not installed
    with pytest.raises(ImportError, match="needs pandas: pip install pandas"):
        res.to_pandas()


def test_custom_attack_outside_the_ball_is_flagged_and_projected(model, data):
    def cheat(m, x, y, *, eps, norm):
        return (x + 3 * eps).clamp(0, 1)

    res = quiet(model, data, [cheat], eps=EPS)
    assert "out_of_ball" in codes(res)
    assert res.attacks[0].mean_linf is None or res.attacks[0].mean_linf <= EPS + 1e-6


def test_step_check():
    assert check_steps(0.5, 0.6, 10, 40, 100)[0].code == "more_steps_weaker"
    assert check_steps(0.5, 0.5, 10, 40, 100) == []


def test_eps_sweep(model, data):
    sweep = eps_sweep(model, data, [("pgd", {"steps": 8})], [0.0, 0.05, 0.1, 1.0])
    assert sweep.robust_acc[0] == sweep.clean_acc
    assert sweep.robust_acc == sorted(sweep.robust_acc, reverse=True) and sweep.robust_acc[-1] == 0.0
    assert sweep.flags == []
    with pytest.warns(RobustnessWarning, match="eps_not_to_zero"):
        masked = eps_sweep(Masked(model), data, [("pgd", {"steps": 8})], [0.05, 1.0])
    assert "eps_not_to_zero" in {f.code for f in masked.flags}
    with pytest.raises(ValueError, match="ascending"):
        eps_sweep(model, data, ["fgsm"], [0.2, 0.1])


def test_non_differentiable_model_is_flagged_not_crashed(model, data):
    from adv.evaluate.checks import check_zero_gradients

    class NumpyStage(nn.Module):  # like a pywt DWT stage: the graph is cut
        def forward(self, x):
            return torch.from_numpy(x.detach().numpy().copy())

    x, y = data.tensors() if hasattr(data, "tensors") else data
    flags = check_zero_gradients(nn.Sequential(NumpyStage(), model), x[:8], y[:8])
    assert [f.code for f in flags] == ["no_gradient"] and "BPDA" in flags[0].message
    assert check_zero_gradients(model, x[:8], y[:8]) == []
