"""Grad-CAM heatmaps through pytorch-grad-cam (before/after a defense) and Wu et al. 2022 (AAD)'s attention IoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from adv.attacks import get_attack
from adv.defenses import Defended, create_defense
from adv.explain.cam import grad_cam
from adv.explain.heatmaps import before_after, gradcam_heatmaps, overlay, save_before_after
from adv.explain.iou import attention_iou, attention_iou_table, mask_iou, topn_mask
from tests.test_defenses_helpers import one_thread, sample_batch, trained_classifier  # noqa: F401


# --- attention IoU (Wu et al. 2022 (AAD) eq. 6, Table 3) --------------------------------------------------
def test_topn_mask_keeps_exactly_the_n_highest_cells():
    cam = torch.arange(16.0).view(1, 4, 4)
    mask = topn_mask(cam, 3)
    assert mask.sum() == 3 and mask.flatten()[-3:].all()
    assert topn_mask(cam, 16).sum() == 15  # the zero cell is never "high attention"
    assert not topn_mask(torch.zeros(1, 4, 4), 5).any()
    with pytest.raises(ValueError, match="1..16"):
        topn_mask(cam, 17)
    with pytest.raises(ValueError, match=r"\(N, h, w\)"):
        topn_mask(cam[0], 3)


def test_attention_iou_on_known_maps():
    a = torch.zeros(1, 4, 4)
    a[0, 0, :2] = 1.0  # two hot cells
    b = torch.zeros(1, 4, 4)
    b[0, 0, 1:3] = 1.0  # overlaps a in one cell
    assert attention_iou(a, a, cells=2).item() == 1.0
    assert attention_iou(a, b, cells=2).item() == pytest.approx(1 / 3)  # |∩| = 1, |∪| = 3
    assert attention_iou(a, -a, cells=2).item() == 0.0
    assert attention_iou(a, b, threshold=0.5).item() == pytest.approx(1 / 3)  # eq. 3 areas via cam.attention_area
    assert mask_iou(torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 2, 2, dtype=torch.bool)).isnan().all()
    with pytest.raises(ValueError, match="exactly one"):
        attention_iou(a, b)


def test_attention_iou_table_splits_by_attack_outcome():
    clf = trained_classifier()
    x, y = sample_batch(64)
    x_adv = get_attack("pgd")(clf, x, y, eps=0.1, steps=5, seed=0)
    table = attention_iou_table(clf, x, x_adv, y)
    with torch.no_grad():
        correct = clf(x).argmax(1) == y
        succeed = correct & (clf(x_adv).argmax(1) != y)
    assert table["n_succeed"] == succeed.sum() and table["n_fail"] == (correct & ~succeed).sum()
    assert [r["cells"] for r in table["rows"]] == [5, 10, 20, 30]
    cam_x, cam_a = grad_cam(clf, x, create_graph=False), grad_cam(clf, x_adv, create_graph=False)
    expected = attention_iou(cam_x, cam_a, cells=10)[succeed].nanmean().item()
    assert table["rows"][1]["iou_succeed"] == pytest.approx(expected)
    assert 0 <= table["n_no_attention"] <= int(correct.sum())
    assert table["grid"] == tuple(cam_x.shape[1:])
    same = attention_iou_table(clf, x, x, y)  # no attack: nothing succeeds, maps identical
    assert same["n_succeed"] == 0 and np.isnan(same["rows"][0]["iou_succeed"]) and same["rows"][0]["iou_fail"] == 1
    zero = attention_iou(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), cells=5)
    assert zero.isnan().all()  # no attention on either side: undefined, left out of the means


# --- heatmaps ------------------------------------------------------------------------------------
def test_gradcam_heatmaps_are_normalised_maps_and_release_their_hooks():
    clf = trained_classifier()
    x, _ = sample_batch(4)
    maps = gradcam_heatmaps(clf, x)
    assert maps.shape == (4, 16, 16) and maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1 + 1e-6
    assert not clf.cam_layer._forward_hooks and all(p.grad is None for p in clf.parameters())
    # up to pytorch-grad-cam's resize and normalisation, it is the same Grad-CAM as adv.explain.cam's
    raw = grad_cam(clf, x, create_graph=False)  # (4, 8, 8) at the conv layer
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(maps)[:, None], 2)[:, 0]
    for p, r in zip(pooled, raw):
        if r.max() > 0:
            assert np.corrcoef(p.flatten().numpy(), r.flatten().numpy())[0, 1] > 0.9
    over = overlay(x, maps)
    assert over.shape == (4, 16, 16, 3) and over.dtype == np.uint8


def test_heatmaps_work_behind_non_differentiable_and_frozen_defenses(tmp_path):
    clf = trained_classifier()
    x, y = sample_batch(3)
    for defended in (Defended(create_defense("dwt:level=2"), clf),
                     Defended(None, create_defense("middle_ae", classifier=clf), allow_untrained=True)):
        res = before_after(clf, defended, x)
        assert res["before"].shape == res["after"].shape == (3, 16, 16)
        assert res["after"].max() > 0
    path = save_before_after(tmp_path / "fig" / "cam.png", clf, Defended(create_defense("dwt"), clf), x, y,
                             class_names=[str(i) for i in range(10)], title="t")
    with Image.open(path) as img:
        assert img.size[0] > 200 and img.size[1] > 200
