"""The defense bundle: round trip, hashes, missing files, schema version, URIs (Ray-free)."""

from __future__ import annotations

import json

import pytest
import torch

from adv.bundle import BundleError, load_bundle, write_bundle
from adv.data import load_dataset
from adv.defenses.registry import create_defense, save_stage
from adv.errors import AdvError
from adv.numbers import accuracy_number
from tests.pipeline_helpers import random_checkpoint


def _numbers():
    subset = "digits test[seed=0,n=40]"
    return {"clean": accuracy_number(36, 40, label="clean", subset=subset),
            "non_adaptive": accuracy_number(20, 40, label="non-adaptive (pgd, eps=0.1)", subset=subset),
            "adaptive": accuracy_number(10, 40, label="adaptive (BPDA+pgd, eps=0.1)", subset=subset)}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A random classifier checkpoint and a learned stage file trained one epoch on a few digits."""
    d = tmp_path_factory.mktemp("parts")
    ckpt = random_checkpoint(d / "model.pt")
    data = load_dataset("digits", split="train", n=64, seed=0)
    stage = create_defense("initial_ae:epochs=1,width=4,latent=2", data=data)
    stage_file = save_stage(d / "ae.pt", stage)
    return ckpt, stage_file


@pytest.fixture()
def bundle(parts, tmp_path):
    ckpt, stage_file = parts
    return write_bundle(tmp_path / "b", checkpoint=str(ckpt),
                        stages=[f"initial_ae:checkpoint={stage_file}", "dwt:wavelet=db2,level=1"],
                        query_detector={"action": "block", "index": None}, numbers=_numbers(),
                        provenance={"sweep": "t", "trial": "x"})


def test_round_trip_rebuilds_the_same_model(parts, bundle):
    ckpt, stage_file = parts
    m = bundle.manifest
    assert m["schema_version"] == 1 and m["stages"][0] == "initial_ae:checkpoint=stages/00-initial_ae.pt"
    assert set(m["files"]) == {"classifier.pt", "stages/00-initial_ae.pt"}
    assert m["numbers"]["adaptive"]["value"] == 0.25 and m["numbers"]["adaptive"]["ci95"][0] < 0.25
    again = load_bundle(bundle.root)
    model = again.build()
    assert model.specs[1] == "dwt:wavelet=db2" and model.preprocess[0].trained
    from adv.defenses.compose import build_defended
    from adv.models.checkpoint import load_checkpoint

    ref = build_defended(load_checkpoint(ckpt)[0], [f"initial_ae:checkpoint={stage_file}", "dwt:wavelet=db2"])
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(model(x), ref.eval()(x))
    qd = again.query_detector  # stored complete (defaults filled in), as Serve will read it
    assert qd["action"] == "block" and qd["index"] is None and qd["per_user"]["candidates"] == 4
    public = again.public_manifest()
    assert public["query_detector"] == {"enabled": True}
    assert "candidates" not in json.dumps(public) and "files" not in public and public["numbers"]


def test_loading_and_building_a_bundle_parses_each_spec_once(parts, tmp_path, spec_parses):
    """Issue 23: the loaded bundle holds its specs parsed (once, when the manifest is checked); ``specs()`` and
    ``build`` pass the parsed objects on."""
    from adv.models.checkpoint import load_checkpoint

    ckpt, stage_file = parts
    det_file = save_stage(tmp_path / "det.pt", create_defense("disagreement:hidden=8,bottleneck=4",
                                                              classifier=load_checkpoint(ckpt)[0]))
    write_bundle(tmp_path / "b", checkpoint=str(ckpt), detector=f"disagreement:checkpoint={det_file}",
                 stages=[f"initial_ae:checkpoint={stage_file}", "dwt:wavelet=db2,level=2"], numbers=_numbers(),
                 provenance={})
    spec_parses.clear()
    b = load_bundle(tmp_path / "b")
    model = b.build()
    assert sorted(spec_parses) == sorted([*b.stages, b.detector]), (len(spec_parses), spec_parses)  # 3 parses
    assert b.stages == ["initial_ae:checkpoint=stages/00-initial_ae.pt", "dwt:wavelet=db2,level=2"]
    assert b.detector == "disagreement:checkpoint=detector/disagreement.pt"
    stages, det = b.specs()
    assert [str(s) for s in stages] == [f"initial_ae:checkpoint={b.root / 'stages/00-initial_ae.pt'}",
                                        "dwt:wavelet=db2,level=2"]
    assert str(det) == f"disagreement:checkpoint={b.root / 'detector/disagreement.pt'}"
    assert model.specs[1] == "dwt:wavelet=db2,level=2" and model.detector.trained and len(spec_parses) == 3


def test_tampered_file_is_rejected_and_named(bundle):
    path = bundle.root / "stages/00-initial_ae.pt"
    data = path.read_bytes()
    path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one flipped bit
    with pytest.raises(BundleError, match="00-initial_ae.pt does not match its sha256"):
        load_bundle(bundle.root)
    assert load_bundle(bundle.root, verify=False).manifest["stages"]


def test_missing_and_added_files(bundle):
    (bundle.root / "classifier.pt").rename(bundle.root / "elsewhere.bin")
    with pytest.raises(BundleError, match="missing: .*classifier.pt"):
        load_bundle(bundle.root)
    (bundle.root / "elsewhere.bin").rename(bundle.root / "classifier.pt")
    (bundle.root / "stages/extra.pt").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.pt is not listed"):
        load_bundle(bundle.root)


def _edit(bundle, change) -> None:
    path = bundle.root / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("where", ["files", "classifier", "stage"])
@pytest.mark.parametrize("target", ["../outside.pt", "/etc/passwd", "stages/../classifier.pt", "symlink"])
def test_no_path_leaves_the_bundle_and_the_classifier_is_hashed(bundle, tmp_path, where, target):
    """Issue 25: ``files`` entries, ``classifier.file`` and stage files must be plain files inside the bundle
    (no '..', absolute path or symlink), and the classifier must be among the hashed files."""
    outside = bundle.root.parent / "outside.pt"
    outside.write_bytes((bundle.root / "classifier.pt").read_bytes())
    if target == "symlink":
        (bundle.root / "link.pt").symlink_to(outside)
        target = "link.pt"

    def change(m):
        if where == "files":
            m["files"][target] = m["files"]["classifier.pt"]
        elif where == "classifier":
            m["classifier"]["file"] = target
        else:
            m["stages"][0] = f"initial_ae:checkpoint={target}"

    _edit(bundle, change)
    for verify in (True, False):
        with pytest.raises(BundleError, match="not a plain file inside the bundle|not among the hashed"):
            load_bundle(bundle.root, verify=verify)


def test_an_unhashed_classifier_file_is_refused(bundle):
    (bundle.root / "other.bin").write_bytes((bundle.root / "classifier.pt").read_bytes())
    _edit(bundle, lambda m: m["classifier"].update(file="other.bin"))
    with pytest.raises(BundleError, match="classifier.file 'other.bin' is not among the hashed 'files'"):
        load_bundle(bundle.root, verify=False)


def test_public_manifest_is_an_allow_list(parts, tmp_path):
    """Issue 25: no path, host, commit, version, threshold or file hash reaches a client."""
    ckpt, stage_file = parts
    b = write_bundle(tmp_path / "leaky", checkpoint=str(ckpt), stages=[f"initial_ae:checkpoint={stage_file}",
                     "dwt:wavelet=db2,threshold=0.123"], detector=None,
                     query_detector={"action": "block"}, numbers=_numbers(),
                     provenance={"run": "/home/secret/run", "versions": {"torch": "9.9.9-secret"},
                                 "commit": "deadbeefcafe", "kernel": "Linux 6.1 secret-host",
                                 "candidate": {"detector": "disagreement:threshold=0.4242"}})
    public = b.public_manifest()
    text = json.dumps(public)
    for leak in ("secret", "deadbeef", "0.4242", "0.123", "stages/", "sha", "provenance", "files", "block",
                 str(tmp_path)):
        assert leak not in text, leak
    assert public["stages"] == ["initial_ae", "dwt"] and public["query_detector"] == {"enabled": True}
    assert public["classifier"]["num_classes"] == 10 and public["numbers"]["adaptive"]["subset"]


def test_bad_schema_version_and_not_a_bundle(bundle, tmp_path):
    manifest = bundle.root / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        load_bundle(bundle.root)
    with pytest.raises(AdvError, match="no manifest.json"):
        load_bundle(tmp_path / "nothing")


def test_a_manifest_from_numbers_equals_the_one_from_their_dicts(parts, tmp_path):
    """write_bundle takes Numbers (a sweep's) and mappings (a file's, a user's) and writes the same bytes."""
    ckpt, _ = parts
    numbers = _numbers()
    as_dicts = json.loads(json.dumps({k: v.model_dump(mode="json") for k, v in numbers.items()}))
    texts = []
    for name, given in (("typed", numbers), ("dicts", as_dicts)):
        b = write_bundle(tmp_path / name, checkpoint=str(ckpt), stages=["dwt:wavelet=haar"], numbers=given,
                         provenance={"sweep": "t"})
        texts.append((b.root / "manifest.json").read_text().replace(b.manifest["created"], "CREATED"))
    assert texts[0] == texts[1]
    assert json.loads(texts[0])["numbers"]["adaptive"] == {
        "value": 0.25, "ci95": list(numbers["adaptive"].ci95), "n": 40, "label": "adaptive (BPDA+pgd, eps=0.1)",
        "subset": "digits test[seed=0,n=40]"}


def test_bad_inputs_fail_before_writing(parts, tmp_path):
    ckpt, _ = parts
    with pytest.raises(BundleError, match=r"^bundle query_detector: threshold: unknown key \(keys: "):
        write_bundle(tmp_path / "q", checkpoint=str(ckpt), stages=[], numbers=_numbers(), provenance={},
                     query_detector={"threshold": 0.25, "window": 10})
    assert not (tmp_path / "q").exists()
    with pytest.raises(BundleError, match=r"numbers.adaptive: ci95"):
        write_bundle(tmp_path / "x", checkpoint=str(ckpt), stages=[], numbers={
            **_numbers(), "adaptive": {"value": 0.5, "ci95": [0.6, 0.4], "n": 4, "label": "a", "subset": "s"}},
            provenance={})
    with pytest.raises(AdvError, match="dwt"):
        write_bundle(tmp_path / "y", checkpoint=str(ckpt), stages=["dwt:level=0"], numbers=_numbers(), provenance={})
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_uri_bundle_is_downloaded_and_verified(parts, tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path / "cache"))
    ckpt, stage_file = parts
    uri = f"file://{tmp_path}/remote"  # written and read through pyarrow.fs, like s3://
    b = write_bundle(uri, checkpoint=str(ckpt), stages=[f"initial_ae:checkpoint={stage_file}"],
                     numbers=_numbers(), provenance={})
    assert (tmp_path / "remote/manifest.json").is_file() and (tmp_path / "remote/stages/00-initial_ae.pt").is_file()
    assert b.root.is_relative_to(tmp_path / "cache") and b.build().preprocess[0].trained
    (tmp_path / "remote/classifier.pt").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="classifier.pt does not match"):
        load_bundle(uri)


def test_adv_bundle_create_then_adv_eval_bundle(parts, tmp_path, capsys):
    from adv.cli import main as adv_main

    ckpt, stage_file = parts
    out = tmp_path / "made"
    assert adv_main(["bundle", "create", "--checkpoint", str(ckpt), "--defense", f"initial_ae:checkpoint={stage_file}",
                     "--dataset", "digits", "--n", "12", "--attack", "fgsm", "--eps", "0.1", "--out", str(out)]) == 0
    m = load_bundle(out).manifest
    assert set(m["numbers"]) == {"clean", "non_adaptive", "adaptive"} and m["numbers"]["clean"]["n"] == 12
    assert m["evaluation"]["n"] == 12 and m["provenance"]["made_by"] == "adv bundle create"
    capsys.readouterr()
    assert adv_main(["eval", "--bundle", str(out), "--attack", "fgsm", "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 12 and res["eps"] == 0.1 and res["clean_acc"] == pytest.approx(m["numbers"]["clean"]["value"])
    assert adv_main(["eval", "--bundle", str(out), "--checkpoint", str(ckpt), "--attack", "fgsm"]) == 2
    assert "drop --checkpoint" in capsys.readouterr().err
