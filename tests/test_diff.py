"""Explanation diff between two releases: matching, angles, variance change, the new-top flag, the picture."""
import json

import numpy as np
import pytest
from PIL import Image

from models.diff import (DiffConfig, explanation_diff, match_components, plot_matched, principal_angles,
                         score_correlations)
from models.sequences import SweepResult, sweep_values, write_component


def _latent(n=400, k=3, seed=0):
    """k independent latent factors over n images."""
    return np.random.default_rng(seed).standard_normal((n, k))


def test_permutation_and_sign_flip_are_recovered():
    z = _latent()
    rng = np.random.default_rng(1)
    prev = z + 0.2 * rng.standard_normal(z.shape)
    cur = np.column_stack([-z[:, 2], z[:, 0], z[:, 1]]) + 0.2 * rng.standard_normal(z.shape)   # c1 = −prev c3 ...
    d = explanation_diff(prev, cur, [50.0, 30.0, 10.0], [55.0, 25.0, 12.0], previous="v1", current="v2")
    got = {(p["current"], p["previous"], p["sign"]) for p in d["pairs"]}
    assert got == {(1, 3, -1), (2, 1, 1), (3, 2, 1)}
    assert all(p["matched"] and abs(p["r"]) > 0.95 and p["angle_deg"] < 18 for p in d["pairs"])
    by_cur = {p["current"]: p for p in d["pairs"]}
    assert by_cur[1]["delta_pct"] == pytest.approx(55.0 - 10.0)          # matched to previous c3 (10 %)
    assert d["n_matched"] == 3 and d["unmatched_current"] == [] and d["unmatched_previous"] == []
    # the new top (−prev c3) is not among the previous top 2 → flagged; with top_n=3 it is
    assert d["flags"]["new_top_component_unmatched"] and d["top"]["best_previous"] in (1, 2)
    assert not explanation_diff(prev, cur, cfg=DiffConfig(top_n=3))["flags"]["new_top_component_unmatched"]
    json.dumps(d)                                                          # JSON-ready


def test_same_subspace_in_another_basis_has_zero_principal_angles():
    z = _latent(k=2)
    rot = np.array([[np.cos(0.6), -np.sin(0.6)], [np.sin(0.6), np.cos(0.6)]])
    ang = principal_angles(z, z @ rot)
    assert np.allclose(ang, 0.0, atol=1e-5)
    r = score_correlations(z, z @ rot)                                     # individual components mix
    assert 0.5 < abs(r[0, 0]) < 0.9
    indep = principal_angles(z, _latent(k=2, seed=7))
    assert indep.min() > 75                                                # unrelated scores: near-orthogonal


def test_new_top_component_flag_and_threshold():
    z = _latent(k=3)
    prev = z[:, :2]
    cur = np.column_stack([z[:, 2], z[:, 0]])                              # new concept first, old c1 second
    d = explanation_diff(prev, cur)
    assert d["flags"]["new_top_component_unmatched"]
    assert d["top"]["abs_r"] < 0.2
    assert [p["matched"] for p in d["pairs"]] == [False, True]
    assert d["unmatched_current"] == [1] and d["unmatched_previous"] == [2]
    same = explanation_diff(prev, prev + 0.05 * _latent(k=2, seed=3))
    assert not same["flags"]["new_top_component_unmatched"] and same["top"]["abs_r"] > 0.99


def test_hungarian_prefers_the_best_total_match():
    corr = np.array([[0.9, 0.8], [0.85, 0.1]])    # greedy (c1→p1) would leave c2 with 0.1
    pairs = match_components(corr)
    assert [(p["current"], p["previous"]) for p in pairs] == [(1, 2), (2, 1)]


def test_input_errors():
    with pytest.raises(ValueError, match="same images"):
        explanation_diff(np.zeros((10, 2)), np.zeros((11, 2)))
    with pytest.raises(ValueError, match="cur_pct"):
        explanation_diff(_latent(k=2), _latent(k=2), [1, 2], [1, 2, 3])


def _sequences(root, signs=(1.0, 1.0)):
    """Write sequences/component_<j>.npz as the explain stage does: component 1 brightens a disc, component 2
    widens a bar along the sweep (run backwards where the sign is negative)."""
    v = sweep_values(-2, 2, 5)
    yy, xx = np.mgrid[:16, :16]
    for j, sign in enumerate(signs):
        frames = np.zeros((2, len(v), 1, 16, 16), np.float32)
        for f, val in enumerate(sign * v):
            if j == 0:
                img = 0.5 + 0.1 * val * ((xx - 8) ** 2 + (yy - 8) ** 2 < 20)
            else:
                img = 0.2 + 0.6 * (np.abs(xx - 8) < 3 + val)
            frames[:, f, 0] = img
        write_component(root, SweepResult(component=j, values=v, seeds=(0, 1), frames=frames, image_channels=1),
                        pct_variance=40.0 - 10 * j)
    return root


def test_picture_shows_matched_pairs(tmp_path):
    prev_seq = _sequences(tmp_path / "prev", signs=(-1.0, 1.0))     # previous c1 runs the other way
    cur_seq = _sequences(tmp_path / "cur")
    z = _latent(k=2)
    d = explanation_diff(z, np.column_stack([-z[:, 0], z[:, 1]]), [40, 30], [40, 30], previous="v1", current="v2")
    assert d["pairs"][0]["sign"] == -1
    png = plot_matched(d, prev_seq, cur_seq, tmp_path / "diff" / "matched.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 200
    # nothing matched (or no npz files) → no picture
    assert plot_matched(d, tmp_path / "missing", cur_seq, tmp_path / "none.png") is None
