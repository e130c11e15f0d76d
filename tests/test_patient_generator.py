"""The patient generator's nuisance parts: pose is estimated on the pixels the scores do not predict, and a pose
that moves only weakly with a component is not shown as part of it, while one that truly goes with it is."""
import numpy as np
import pytest
import torch

from models.patient_generator import PatientGenerator, PatientGeneratorConfig, material_slopes, unexplained_weight

SIZE = 32


def bodies(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Ellipse 'bodies' with a bright 'organ' whose radius grows with score 1; the body's horizontal position
    follows score 2 strongly and score 1 weakly (0.04 SD of its spread per score SD); vertical position random."""
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 1, (n, 2))
    C1 = np.c_[np.ones(n), c]
    independent = lambda v: v - C1 @ np.linalg.lstsq(C1, v, rcond=None)[0]        # no sample correlation with c
    tx = 0.08 * c[:, 1] + 0.004 * c[:, 0] + independent(0.06 * rng.normal(0, 1, n))
    ty = independent(rng.uniform(-0.1, 0.1, n))
    g = (np.arange(SIZE) + 0.5) / SIZE * 2 - 1
    X, Y = np.meshgrid(g, g)
    img = np.empty((n, 1, SIZE, SIZE), np.float32)
    for i in range(n):
        x, y = X - tx[i], Y - ty[i]
        body = (((x / 0.6) ** 2 + (y / 0.75) ** 2) <= 1) * 0.45
        r = 0.2 * (1 + 0.25 * c[i, 0])
        organ = (((x - 0.25) ** 2 + (y + 0.3) ** 2) <= r * r) * 0.4
        img[i, 0] = 0.1 + body + organ + rng.normal(0, 0.02, (SIZE, SIZE))
    return torch.from_numpy(np.clip(img, 0, 1)), torch.tensor(c, dtype=torch.float32), np.stack([tx, ty], 1)


def test_unexplained_weight_is_low_where_the_scores_predict_the_pixel():
    rng = np.random.default_rng(0)
    c = torch.tensor(rng.normal(0, 1, (200, 1)), dtype=torch.float32)
    aligned = torch.tensor(rng.normal(0, 0.1, (200, 1, 4, 4)), dtype=torch.float32)
    aligned[:, 0, 0, 0] += 0.5 * c[:, 0]                     # this pixel is (almost) a function of the score
    w = unexplained_weight(aligned, c, power=4.0)
    assert w.shape == (1, 1, 4, 4) and abs(float(w.mean()) - 1) < 1e-5
    assert float(w[0, 0, 0, 0]) < 0.01 * float(w.flatten()[1:].min())


def test_material_slopes_keep_only_moves_of_at_least_the_threshold():
    slopes = torch.tensor([[0.01, 0.2], [0.1, 0.001]])        # (k=2, p=2)
    kept = material_slopes(slopes, spread=torch.tensor([1.0, 1.0]), span=torch.tensor([4.0, 4.0]), material_sd=0.25)
    assert torch.equal(kept, torch.tensor([[0.0, 0.2], [0.1, 0.0]]))        # moves 0.04, 0.8 / 0.4, 0.004 SD over the range


@pytest.mark.slow
def test_fit_shows_a_pose_that_goes_with_a_component_and_holds_a_weak_one():
    x, c, shift = bodies(300)
    G = PatientGenerator.fit(x, c, np.arange(300), PatientGeneratorConfig(register_iters=60), progress=False)
    tx_slope_2 = np.linalg.lstsq(np.c_[np.ones(300), c.numpy()], shift[:, 0], rcond=None)[0][2]
    assert G.pose_slopes[0].abs().max() == 0                                  # weak: held
    assert abs(float(G.pose_slopes[1, 2]) - tx_slope_2) < 0.25 * tx_slope_2   # strong: shown, about its size
    # a sweep of score 1 grows the organ and leaves the body where it was (its outline pixels unchanged)
    pose, _, trusted = G.place(x[:1])
    values = torch.tensor([[-2.0], [2.0]])
    frames = G.edit_image(x[:1].expand(2, -1, -1, -1), pose.expand(2, -1), c[:1].expand(2, -1),
                          torch.cat([values, c[:1, 1:].expand(2, 1)], 1))
    assert trusted.all()
    outline = lambda f: (f[0] > 0.35).float()
    organ = lambda f: (f[0] > 0.75).float().sum()
    assert organ(frames[1]) > organ(frames[0]) + 10
    body_moved = (outline(frames[1]) - outline(frames[0])).abs()
    assert body_moved[SIZE // 2 + 2:].sum() == 0                           # the lower half, far from the organ: still
