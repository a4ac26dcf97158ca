"""Bring your own model and data (issue 11): one-line errors, per-example results, seeds, intervals, benchmark."""

from __future__ import annotations

import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import adv
from adv.errors import InputError
from adv.evaluate import RobustnessWarning, robust_accuracy
from adv.evaluate.stats import accuracy_ci, beats_whitebox_evidence, overlap_note
from adv.models import Normalize, SelectOutput
from tests.attack_helpers import synthetic

EPS = 0.08


pytestmark = pytest.mark.usefixtures("single_threaded")  # ``model`` (the tiny CNN) comes from conftest.py


@pytest.fixture(scope="module")
def data():
    return synthetic(40, seed=5)


def run(model, data, attacks=("fgsm",), **kw):
    kw.setdefault("progress", False)
    kw.setdefault("eps", EPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RobustnessWarning)
        return robust_accuracy(model, data, list(attacks), **kw)


class TwoOutputs(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), x.flatten(1)


# --- each bad input: one line that names the fix ------------------------------------------------
BAD = {
    "uint8": (lambda x, y: ((x * 255).to(torch.uint8), y), "images must be float in [0, 1]; divide uint8 by 255"),
    "nhwc": (lambda x, y: (x.permute(0, 2, 3, 1), y), "channels-last (N, H, W, C)"),
    "normalized": (lambda x, y: ((x - 0.5) / 0.25, y), "adv.models.Normalize(mean, std)"),
    "0-255 floats": (lambda x, y: (x * 255, y), "divide by 255"),
    "no channel axis": (lambda x, y: (x[:, 0], y), "add the channel axis with x[:, None]"),
    "one-hot labels": (lambda x, y: (x, nn.functional.one_hot(y).float()), "pass y.argmax(1)"),
    "label out of range": (lambda x, y: (x, y + 5), "out of range for a model with 5 outputs"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_input_is_one_line_naming_the_fix(model, data, case):
    make, message = BAD[case]
    with pytest.raises(InputError, match=None) as err:
        run(model, make(*data))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_tuple_model_points_to_select_output_which_fixes_it(model, data):
    with pytest.raises(InputError) as err:
        run(TwoOutputs(model), data)
    assert "adv.models.SelectOutput(model, 0)" in str(err.value) and "\n" not in str(err.value)
    wrapped = run(SelectOutput(TwoOutputs(model), 0), data)
    assert wrapped.robust_acc == run(model, data).robust_acc


def test_linf_eps_above_one_asks_for_a_fraction_of_255(model, data):
    with pytest.raises(InputError, match=r"did you mean 8/255 = 0\.03137\?"):
        run(model, data, eps=8)
    run(model, data, eps=8, norm="l2", attacks=["pgd"])  # an L2 budget of 8 is legitimate


def test_numpy_and_int32_labels_are_converted_to_the_same_result(model, data):
    x, y = data
    as_torch = run(model, (x, y))
    as_numpy = run(model, (x.numpy(), y.numpy().astype(np.int32)))
    assert as_numpy.robust_acc == as_torch.robust_acc and as_numpy.clean_acc == as_torch.clean_acc
    assert torch.equal(as_numpy.per_example.robust, as_torch.per_example.robust)


def test_a_shuffling_dataloader_is_refused_and_an_ordered_one_matches_tensors(model, data):
    ds = torch.utils.data.TensorDataset(*data)
    with pytest.raises(InputError, match="shuffle=False"):
        run(model, torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True))
    loader = run(model, torch.utils.data.DataLoader(ds, batch_size=16))
    assert torch.equal(loader.per_example.robust, run(model, data).per_example.robust)


# --- per-example results ----------------------------------------------------------------------------
def test_the_per_example_masks_agree_with_the_aggregate_numbers(model, data):
    res = run(model, data, ["fgsm", ("pgd", {"steps": 5}), ("square", {"queries": 50})], batch_size=16)
    ex = res.per_example
    assert len(ex.robust) == res.n == 40
    assert ex.clean.float().mean().item() == pytest.approx(res.clean_acc)
    assert ex.robust.float().mean().item() == pytest.approx(res.robust_acc)
    broken = torch.zeros_like(ex.robust)
    for rep in res.attacks:
        assert int(ex.attacked[rep.label].sum()) == rep.n_attacked
        assert int(ex.fooled[rep.label].sum()) == rep.n_fooled
        assert not (ex.fooled[rep.label] & broken).any()  # each attack only ran on the points still standing
        broken |= ex.fooled[rep.label]
    assert torch.equal(ex.robust, ex.clean & ~broken)
    assert ex.x_adv is None  # images only when asked


def test_returned_adversarials_are_in_the_ball_and_reproduce_the_mistakes(model, data):
    x, y = data
    res = run(model, data, ["fgsm", ("pgd", {"steps": 5})], batch_size=16, return_adversarials=True)
    x_adv = res.per_example.x_adv
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().amax() <= EPS + 1e-6
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    assert torch.equal(wrong, ~res.per_example.robust)
    assert int(wrong.sum()) == round((1 - res.robust_acc) * res.n) > 0


# --- seeds follow the example --------------------------------------------------------------------------
def test_appending_an_attack_never_changes_an_earlier_attacks_results(model, data):
    first = [("pgd", {"steps": 3}), ("apgd", {"steps": 5})]
    short = run(model, data, first, batch_size=16).per_example
    long = run(model, data, [*first, ("square", {"queries": 30})], batch_size=16).per_example
    for label in ("pgd(steps=3)", "apgd(steps=5)"):
        assert torch.equal(short.fooled[label], long.fooled[label])
        assert torch.equal(short.attacked[label], long.attacked[label])


def test_a_longer_sequence_is_never_weaker_and_the_batch_size_does_not_matter(model, data):
    pgd = ("pgd", {"steps": 3, "step_size": 0.02})
    alone = run(model, data, [pgd], batch_size=16).per_example
    behind = run(model, data, [("fgsm", {}), pgd], batch_size=7).per_example
    # PGD's start comes from the example's own stream: a point it broke alone, it breaks behind FGSM
    assert not (behind.robust & ~alone.robust).any()
    assert torch.equal(run(model, data, [pgd], batch_size=40).per_example.robust, alone.robust)


# --- confidence intervals --------------------------------------------------------------------------------
def test_every_accuracy_carries_a_wilson_interval(model, data):
    res = run(model, data, ["fgsm", ("pgd", {"steps": 3})])
    k = round(res.robust_acc * res.n)
    assert res.robust_acc_ci == pytest.approx(accuracy_ci(k, res.n))
    lo, hi = res.clean_acc_ci
    assert lo < res.clean_acc <= hi
    for rep in res.attacks:
        lo, hi = rep.robust_acc_after_ci
        assert lo <= rep.robust_acc_after <= hi
    assert "[" in str(res) and "95% intervals" in str(res)
    assert res.to_dict()["robust_acc_ci"] == res.robust_acc_ci


def test_intervals_known_values_and_the_overlap_note():
    # Wilson score interval, z = 1.96: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    lo, hi = accuracy_ci(51, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4135, 0.6058)
    assert overlap_note({"A": accuracy_ci(51, 100), "B": accuracy_ci(55, 100)}).startswith("95% intervals overlap")
    assert overlap_note({"A": accuracy_ci(20, 100), "B": accuracy_ci(80, 100)}) is None


# --- query_beats_whitebox on evidence -----------------------------------------------------------------
def test_the_flag_is_silent_on_one_point_and_fires_on_a_real_gap():
    assert not beats_whitebox_evidence(1, 154)["fires"]
    assert not beats_whitebox_evidence(2, 10)["fires"]  # below the minimum count
    gap = beats_whitebox_evidence(20, 50)
    assert gap["fires"] and gap["p_value"] < 1e-6 and gap["survivors"] == 50 and gap["fooled"] == 20


class Masked(nn.Module):
    """Rounds its input to 8 levels: zero gradients almost everywhere, yet a query attack gets through."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net((x * 8).round() / 8)


def test_the_flag_fires_on_a_masked_model_and_keeps_the_counts(model, data):
    res = run(Masked(model), data, [("pgd", {"steps": 5}), ("square", {"queries": 300})], eps=0.15,
              checks=("query_beats_whitebox",))
    flag = next((f for f in res.flags if f.code == "query_beats_whitebox"), None)
    square = res.attacks[1]
    assert flag is not None, str(res)
    counts = flag.details["square(queries=300)"]
    assert counts["fooled"] == square.n_fooled and counts["survivors"] == square.n_attacked


# --- adv.benchmark ------------------------------------------------------------------------------------------------
def test_benchmark_on_a_tiny_model_with_each_kind_of_data(model, data):
    x, y = data
    kw = dict(eps=EPS, suite=None, attacks=["fgsm"], progress=False)
    on_pair = adv.benchmark(model, (x.numpy(), y.numpy()), n=30, **kw)
    on_loader = adv.benchmark(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                                                 batch_size=7), n=30, **kw)
    assert on_pair.n == on_loader.n == 30 and on_pair.robust_acc == on_loader.robust_acc
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    on_name = adv.benchmark(net, "digits", n=12, **kw)
    assert on_name.n == 12 and len(on_name.per_example.robust) == 12
    with pytest.raises(InputError, match="model.eval()"):
        adv.benchmark(nn.Sequential(nn.Flatten(), nn.Linear(144, 5)), data, **kw)


def test_benchmark_runs_the_standard_suite_and_returns_flags(model, data):
    x, y = data
    res = adv.benchmark(model, (x[:8], y[:8]), eps=0.3, progress=False)  # big eps: APGD-CE leaves nothing
    assert [a.attack for a in res.attacks] == ["apgd_ce", "apgd_t", "fab_t", "square"]
    assert res.robust_acc == 0.0 and isinstance(res.flags, list) and res.robust_acc_ci[0] == 0.0


# --- your own architecture from the CLI and from a Ray job ---------------------------------------------------------
NETS = """
from torch import nn

def make_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """``mypkg.nets:make_net`` in a folder only the driver has on its path, and weights for it."""
    pkg = tmp_path / "code" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(NETS))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    weights = tmp_path / "net.pt"
    torch.save({"state_dict": net.state_dict()}, weights)
    monkeypatch.chdir(tmp_path / "code")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    yield net.eval(), weights
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]


def test_model_factory_from_the_cli(user_package, capsys):
    import json

    from adv.cli import main

    net, weights = user_package
    argv = ["eval", "--model-factory", "mypkg.nets:make_net", "--weights", str(weights), "--dataset", "digits",
            "--n", "20", "--attack", "fgsm", "--eps", "8/255", "--quiet", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from adv.data import load_dataset

    x, y = load_dataset("digits", n=20).tensors()
    with torch.no_grad():
        assert res["clean_acc"] == pytest.approx((net(x).argmax(1) == y).float().mean().item())
    assert res["model"] == "mypkg.nets:make_net" and res["eps"] == pytest.approx(8 / 255)
    assert main([*argv[:2], "mypkg.nets:nope", *argv[3:]]) == 2
    assert "has no 'nope'" in capsys.readouterr().err
    assert main([*argv[:-4], "--eps", "8", "--quiet"]) == 2
    assert "did you mean 8/255" in capsys.readouterr().err


@pytest.mark.ray
def test_model_factory_from_a_jobs_evaluate_config_on_the_local_cluster(ray_cluster, user_package, tmp_path):
    """``ray job submit --working-dir CODE``: the job's working directory carries mypkg to driver and workers."""
    import time
    import uuid

    import yaml
    from ray.job_submission import JobStatus, JobSubmissionClient

    from adv.data import load_dataset
    from adv.runs.store import RunStore
    from tests.pipeline_helpers import on_this_cluster, submit_when_agent_ready

    net, weights = user_package
    out = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "name": "byom", "dataset": {"name": "digits", "n": 8, "seed": 0},
        "model": {"factory": "mypkg.nets:make_net", "weights": str(weights)},
        "attacks": [{"name": "fgsm", "eps": [0.1]}], "adaptive": False, "features": ["logits"], "shards": 2,
        "resources": {"actors": 1, "batch_size": 4}, "output": {"path": str(tmp_path / "runs")},
    }))
    url = ray_cluster.dashboard_url
    client = JobSubmissionClient(url if "://" in url else f"http://{url}")
    code = tmp_path / "code"
    # a new package per attempt: a failed submit can release the uploaded one (same hash) under the next
    sid = submit_when_agent_ready(
        client, lambda: (code / "attempt.txt").write_text(uuid.uuid4().hex),
        entrypoint=on_this_cluster(f"{sys.executable} -m jobs.evaluate --config {config} --out {out}"),
        runtime_env={"working_dir": str(code), "env_vars": {"ADV_NO_PROGRESS": "1"}},
        submission_id=f"adv-byom-test-{uuid.uuid4().hex[:8]}")
    deadline = time.time() + 300
    while client.get_job_status(sid) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            client.stop_job(sid)
            break
        time.sleep(2)
    assert client.get_job_status(sid) == JobStatus.SUCCEEDED, client.get_job_logs(sid)[-3000:]

    import ray.data  # noqa: F401  (tensor extension types)

    table = RunStore(str(out)).read_table([0, 1], columns=["index", "track", "correct"])
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    clean = rows["track"] == "clean"
    order = np.argsort(rows["index"][clean])
    x, y = load_dataset("digits", n=8, seed=0).tensors()
    with torch.no_grad():
        expected = (net(x).argmax(1) == y).numpy()
    assert len(order) == 8 and (rows["correct"][clean][order] == expected).all()


@pytest.mark.ray
def test_model_factory_in_process_on_the_shared_cluster(ray_cluster, tmp_path):
    """``jobs.evaluate.run`` with ``model.factory``: the actors import it from the driver's working directory."""
    from adv.data import load_dataset
    from jobs.config import parse_config
    from jobs.evaluate import run as run_job
    from adv.runs.store import RunStore
    from tests.byom_nets import make_net

    torch.manual_seed(1)
    net = make_net().eval()
    weights = tmp_path / "net.pt"
    torch.save(net.state_dict(), weights)
    cfg = parse_config({
        "name": "byom-inproc", "dataset": {"name": "digits", "n": 8, "seed": 0},
        "model": {"factory": "tests.byom_nets:make_net", "weights": str(weights)},
        "attacks": [{"name": "fgsm", "eps": [0.1]}], "adaptive": False, "features": ["logits"], "shards": 2,
        "resources": {"actors": 1, "batch_size": 4}, "output": {"path": str(tmp_path / "runs")},
    })
    result = run_job(cfg, report=False)
    import ray.data  # noqa: F401  (tensor extension types)

    table = RunStore(result.run_dir).read_table([0, 1], columns=["index", "track", "correct"])
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    clean = rows["track"] == "clean"
    x, y = load_dataset("digits", n=8, seed=0).tensors()
    with torch.no_grad():
        expected = (net(x).argmax(1) == y).numpy()
    assert (rows["correct"][clean][np.argsort(rows["index"][clean])] == expected).all()


def test_model_factory_config_errors_name_the_key():
    from adv.errors import ConfigError
    from jobs.config import parse_config

    base = {"dataset": {"name": "digits", "n": 8}, "attacks": [{"name": "fgsm", "eps": [0.1]}]}
    with pytest.raises(ConfigError, match="model.factory: a model factory is 'package.module:function'"):
        parse_config({**base, "model": {"factory": "mypkg.nets"}})
    with pytest.raises(ConfigError, match="not both"):
        parse_config({**base, "model": {"factory": "a:b", "arch": "lenet"}})


def test_normalize_inside_the_model_accepts_what_the_normalized_data_was_refused_for(model, data):
    x, y = data
    mean, std = 0.5, 0.25
    with pytest.raises(InputError, match="Normalize"):
        run(model, ((x - mean) / std, y))
    inner = nn.Sequential(Normalize([mean], [std]), nn.Sequential(nn.Identity()), _Denormalized(model, mean, std))
    assert run(inner, data).robust_acc == run(model, data).robust_acc


class _Denormalized(nn.Module):
    """A net trained on normalized inputs (here: the tiny model behind an inverse normalization)."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net, self.mean, self.std = net, mean, std

    def forward(self, z):
        return self.net(z * self.std + self.mean)
