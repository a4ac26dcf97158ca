"""The report (adv.evaluate.report) on hand-made rows: the arithmetic, the flags, the files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from adv.evaluate.report import masking_flags, summarize, write_report

N = 4  # examples


def _rows(spec: dict) -> dict[str, np.ndarray]:
    """``spec[(defense, track, grid)] = (attack, eps, robust per example)``; clean rows use grid -1."""
    cols: dict[str, list] = {k: [] for k in ("index", "label", "shard", "defense", "track", "grid", "attack",
                                             "attack_key", "norm", "eps", "steps", "queries", "gen_seconds",
                                             "l0", "l2", "linf", "mse", "ssim", "psnr", "pred", "correct",
                                             "detected", "robust", "success")}
    clean = {d: r for (d, t, g), (_, _, r) in spec.items() if t == "clean"}
    for (defense, track, grid), (attack, eps, robust) in spec.items():
        for i, ok in enumerate(robust):
            key = "clean" if track == "clean" else f"{attack} linf eps={eps:g}"
            vals = dict(index=i, label=1, shard=0, defense=defense, track=track, grid=grid, attack=attack,
                        attack_key=key, norm="" if track == "clean" else "linf", eps=eps,
                        steps=10 if attack == "pgd" else -1, queries=100 if attack == "square" else -1,
                        gen_seconds=0.5 if track != "clean" and (defense == "none" or track == "adaptive") else 0.0,
                        l0=0.0, l2=0.0 if track == "clean" else 1.0, linf=eps, mse=0.0,
                        ssim=1.0, psnr=math.inf if track == "clean" else 30.0, pred=1 if ok else 0,
                        correct=bool(ok), detected=False, robust=bool(ok),
                        success=track != "clean" and bool(clean[defense][i]) and not ok)
            for k, v in vals.items():
                cols[k].append(v)
    return {k: np.array(v) for k, v in cols.items()}


SPEC = {
    ("none", "clean", -1): ("clean", 0.0, [1, 1, 1, 0]),
    ("none", "non-adaptive", 0): ("fgsm", 0.1, [1, 0, 1, 1]),   # index 3 was wrong clean: never robust
    ("none", "non-adaptive", 1): ("pgd", 0.1, [0, 1, 1, 0]),
    ("dwt", "clean", -1): ("clean", 0.0, [1, 1, 1, 1]),
    ("dwt", "non-adaptive", 0): ("fgsm", 0.1, [1, 1, 1, 1]),
    ("dwt", "non-adaptive", 1): ("pgd", 0.1, [1, 1, 0, 1]),
    ("dwt", "adaptive", 0): ("fgsm", 0.1, [1, 0, 1, 1]),
    ("dwt", "adaptive", 1): ("pgd", 0.1, [0, 0, 1, 1]),
}


@pytest.fixture(scope="module")
def summary():
    return summarize(_rows(SPEC), cells=(), defense_order=["dwt"])


def _acc(summary, defense, track, attack):
    return next(e["robust_accuracy"] for e in summary["attacks"]
                if (e["defense"], e["track"], e["attack"]) == (defense, track, attack))


def test_clean_and_robust_accuracy_follow_autoattack(summary):
    assert summary["clean_acc"] == {"none": 0.75, "dwt": 1.0}
    assert list(summary["clean_acc"]) == ["none", "dwt"]  # undefended first
    assert _acc(summary, "none", "non-adaptive", "fgsm") == 0.5  # index 3 counts as not robust
    assert _acc(summary, "none", "non-adaptive", "pgd") == 0.5
    assert _acc(summary, "dwt", "adaptive", "pgd") == 0.5
    fgsm = next(e for e in summary["attacks"] if e["defense"] == "none" and e["attack"] == "fgsm")
    assert fgsm["success_rate"] == pytest.approx(1 / 3)


def test_worst_case_is_per_example_over_attacks_and_tracks(summary):
    worst = {(w["defense"], w["track"]): w["robust_accuracy"] for w in summary["worst_case"]}
    assert worst[("none", "non-adaptive")] == 0.25       # only index 2 survives fgsm and pgd
    assert worst[("dwt", "non-adaptive")] == 0.75
    assert worst[("dwt", "adaptive")] == 0.5
    assert worst[("dwt", "any")] == 0.25                 # index 2 fails non-adaptive pgd, 0/1 fail adaptive
    assert ("none", "any") not in worst


def test_throughput_comes_from_generation_time(summary):
    fgsm = next(t for t in summary["throughput"] if t["attack_key"].startswith("fgsm") and t["track"] == "non-adaptive")
    assert fgsm["attacked"] == "none" and fgsm["images_per_second"] == pytest.approx(2.0)


def test_flags_from_the_grid():
    entries = [
        {"defense": "d", "track": "adaptive", "grid": 0, "attack": "fgsm", "attack_key": "fgsm", "norm": "linf",
         "eps": 0.1, "steps": -1, "robust_accuracy": 0.2},
        {"defense": "d", "track": "adaptive", "grid": 1, "attack": "pgd", "attack_key": "pgd", "norm": "linf",
         "eps": 0.1, "steps": 10, "robust_accuracy": 0.6},
        {"defense": "d", "track": "adaptive", "grid": 2, "attack": "square", "attack_key": "square",
         "norm": "linf", "eps": 0.1, "steps": 100, "robust_accuracy": 0.1},
        {"defense": "d", "track": "adaptive", "grid": 3, "attack": "pgd", "attack_key": "pgd big", "norm": "linf",
         "eps": 0.3, "steps": 10, "robust_accuracy": 0.7},
        {"defense": "d", "track": "non-adaptive", "grid": 1, "attack": "pgd", "attack_key": "pgd", "norm": "linf",
         "eps": 0.1, "steps": 10, "robust_accuracy": 0.9},
        {"defense": "d", "track": "adaptive", "grid": 4, "attack": "deepfool", "attack_key": "deepfool inf",
         "norm": "l2", "eps": math.inf, "steps": -1, "robust_accuracy": 0.3},
    ]
    for e in entries:
        e["n"] = 100
    names = {f["flag"] for f in masking_flags(entries)}
    assert names == {"one_step_beats_iterative", "eps_not_monotone", "adaptive_much_stronger", "unbounded_not_zero"}
    assert masking_flags([e for e in entries if e["attack"] == "pgd" and e["track"] == "adaptive"
                          and e["eps"] == 0.1]) == []
    more = [dict(entries[1], steps=40, grid=9, attack_key="pgd 40", robust_accuracy=0.8)]
    assert {f["flag"] for f in masking_flags([entries[1], *more])} == {"more_steps_weaker"}


def test_query_beats_whitebox_is_per_example_and_needs_evidence():
    spec = {("none", "clean", -1): ("clean", 0.0, [1, 1, 1, 1]),
            ("none", "non-adaptive", 0): ("pgd", 0.1, [1, 0, 1, 1]),
            ("none", "non-adaptive", 1): ("square", 0.1, [0, 1, 1, 1])}  # fools index 0, which pgd missed
    assert summarize(_rows(spec), cells=())["masking_flags"] == []  # one point is not evidence (issue 11)
    spec = {("none", "clean", -1): ("clean", 0.0, [1] * 10),
            ("none", "non-adaptive", 0): ("pgd", 0.1, [1] * 8 + [0, 0]),
            ("none", "non-adaptive", 1): ("square", 0.1, [0] * 6 + [1] * 4)}  # 6 of pgd's 8 survivors
    flags = summarize(_rows(spec), cells=())["masking_flags"]
    assert [f["flag"] for f in flags] == ["query_beats_whitebox"]
    assert "6 of 8 example(s)" in flags[0]["detail"]


def test_worst_case_and_query_beats_whitebox_helpers_agree_on_numpy_and_torch():
    import torch

    from adv.evaluate.checks import beats_whitebox, check_query_beats_whitebox, worst_case_mask

    alive, index, robust = np.array([1, 1, 0, 1], bool), np.array([0, 1, 3, 1]), np.array([1, 0, 1, 1], bool)
    assert worst_case_mask(alive, index, robust).tolist() == [True, False, False, True]
    t = worst_case_mask(torch.from_numpy(alive), torch.from_numpy(index), torch.from_numpy(robust))
    assert t.tolist() == [True, False, False, True] and alive.tolist() == [True, True, False, True]
    query, white, tried = (np.array(v, bool) for v in ([1, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]))
    assert beats_whitebox(query, white, tried).tolist() == [True, False, False, False]
    assert check_query_beats_whitebox({"square": (0, 10)}) == []
    assert check_query_beats_whitebox({"square": (2, 10)}) == []  # below the minimum count
    details = check_query_beats_whitebox({"square": (8, 10)})[0].details["square"]
    assert (details["fooled"], details["survivors"], details["fires"]) == (8, 10, True)


def test_write_report_files_and_strict_json(tmp_path):
    rows = _rows(SPEC)
    rows["eps"] = np.where(rows["attack"] == "pgd", np.inf, rows["eps"])  # an unbounded attack in the table
    examples = {**{k: v[rows["index"] < 2] for k, v in rows.items()}}
    examples["image"] = np.random.default_rng(0).random((int((rows["index"] < 2).sum()), 1, 8, 8)).astype(np.float32)
    meta = {"name": "t", "key": "abc", "versions": {"adv": "0"}, "seeds": {"attacks": 0},
            "attempts": [{"attempt": 1, "shards": [0], "examples": 4, "wall_seconds": 2.0}],
            "skipped": [["a/bad.jpg", "OSError: truncated"]], "layout": {"classes": ["zero", "one"]},
            "report": {"iou_cells": [], "magnify": 30}, "defenses": ["dwt"]}
    result = write_report(rows, examples, meta, tmp_path)
    for name in ("report.md", "results.json", "accuracy_vs_eps.png", "examples.png"):
        assert (tmp_path / name).is_file(), name
    text = (tmp_path / "results.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    loaded = json.loads(text)
    assert loaded["skipped"]["count"] == 1 and loaded["wall_seconds"] == 2.0
    assert result["clean_acc"]["dwt"] == 1.0
    report = (tmp_path / "report.md").read_text()
    assert "| none | direct | 75.0% [30.1, 95.4] |" in report  # with its 95% Wilson interval (3 of 4)
    assert "95% Wilson intervals" in report
    assert loaded["clean_acc_ci"]["none"] == pytest.approx([0.301, 0.954], abs=1e-3)
    assert "skipped (corrupt or unreadable) images: 1" in report and "a/bad.jpg" in report
    assert "Not computed: add `gradcam`" in report


def test_report_opens_with_three_summary_lines(summary):
    from adv.evaluate.report.markdown import render_markdown

    h = summary["headline"]
    assert (h["norm"], h["eps"], h["best"]["defense"], h["best"]["track"]) == ("linf", 0.1, "dwt", "any")
    lines = render_markdown(summary, {"name": "t"}, {}).splitlines()
    assert lines[0] == "# Robustness report: t" and lines[1] == ""
    best, undefended, flags = lines[2:5]
    # dwt: 1 of 4 survives fgsm and pgd on both tracks; its interval overlaps the undefended one's (also 1 of 4)
    assert best.startswith("- **Best defense**: `dwt`, worst-case robust accuracy 25.0% [4.6, 69.9] against every "
                           "linf eps=0.1 attack (adaptive and non-adaptive; n=4)")
    assert "overlaps the undefended classifier's" in best
    assert undefended.startswith("- **Undefended**: 25.0% [4.6, 69.9]")
    assert "100.0% [51.0, 100.0] with `dwt`" in undefended
    assert flags == "- **Flags**: 2 gradient-masking flags: adaptive_much_stronger ×2 (see the flags section)."
    assert lines[5] == ""


def test_a_non_adaptive_only_winner_is_labelled_so():
    spec = {k: v for k, v in SPEC.items() if k[1] != "adaptive"}
    h = summarize(_rows(spec), cells=(), defense_order=["dwt"])["headline"]
    assert h["best"]["track"] == "non-adaptive" and h["best"]["robust_accuracy"] == 0.75

    from adv.evaluate.report.markdown import summary_lines

    assert "non-adaptive only, no adaptive attack: it may overstate the defense" in summary_lines(
        summarize(_rows(spec), cells=(), defense_order=["dwt"]))[0]


def test_overlapping_intervals_are_one_table_and_the_undefended_track_one_word():
    from adv.evaluate.report.markdown import accuracy_markdown, render_markdown

    spec = {**SPEC, **{(d, t, g + 10): (a, 0.05, r)  # the same outcomes at a second eps: overlaps at both
                       for (d, t, g), (a, _, r) in SPEC.items() if t != "clean"}}
    summary = summarize(_rows(spec), cells=(), defense_order=["dwt"])
    assert len(summary["interval_overlaps"]) == 2  # one per eps: they used to be two bullets
    text = "\n".join(accuracy_markdown(summary))
    assert text.count("overlap") == 1 and "| none ~ dwt | linf eps=0.05, linf eps=0.1 |" in text
    report = render_markdown(summary, {"name": "t"}, {})
    tracks = {line.split(" | ")[1] for line in report.splitlines() if line.startswith("| none | ")}
    assert tracks == {"direct"}  # the accuracy table and the attacks table agree


def test_results_json_uses_clean_acc_and_old_files_still_read():
    from adv.evaluate.report.aggregate import clean_acc

    summary = summarize(_rows(SPEC), cells=(), defense_order=["dwt"])
    assert "clean_accuracy" not in summary and summary["clean_acc"] == {"none": 0.75, "dwt": 1.0}
    old = {"clean_accuracy": {"none": 0.5}, "clean_accuracy_ci": {"none": [0.1, 0.9]}}  # results.json before
    assert clean_acc(old) == ({"none": 0.5}, {"none": [0.1, 0.9]})
    assert clean_acc(summary)[0] == summary["clean_acc"]


def test_one_percentage_formatter_matches_the_formats_it_replaced():
    from adv.evaluate.stats import fmt_ci, pct

    for v in [i / 1000 for i in range(1001)] + [1 / 3, 0.125, 0.005]:
        assert pct(v) == f"{v:.1%}" and pct(v, 0) == f"{v:.0%}" and pct(v, sign=False) == f"{100 * v:.1f}"
    assert pct(None) == pct(float("nan")) == "–" and pct(None, missing="n/a") == "n/a"
    assert fmt_ci(0.51, (0.466, 0.554)) == "51.0% [46.6, 55.4]" and fmt_ci(0.5, None) == "50.0%"
