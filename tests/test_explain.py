"""The `explain` command end to end on a tiny phantom: artifacts folder complete, metrics schema stable,
re-run reuses features and the finished GAN; the CLI reports bad input clearly."""
import json

import numpy as np
import pytest
from PIL import Image

from models.cli import main
from models.cnn import TrainConfig, save_cnn, train_cnn
from models.explain import ExplainConfig, explain
from models.phantom import PhantomConfig, write_phantom

TINY = ExplainConfig(fid_samples=32, fid_extractor="randconv", frames=4, seeds=(0, 1), n_components=2, check_seeds=8,
                     reader_epochs=2, register_iters=30)
TINY_CGAN = ExplainConfig(generator="cgan", steps=20, ckpt_every=10, ngf=8, ndf=8, z_dim=16, batch_size=16,
                          fid_samples=32, fid_extractor="randconv", frames=4, seeds=(0, 1), n_components=2,
                          check_seeds=4, reader_epochs=1)


@pytest.fixture(scope="module")
def phantom_cnn(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    ds = write_phantom(root / "data", PhantomConfig(n=160, size=32, seed=3))
    model, spec = train_cnn(ds, TrainConfig(epochs=2, width=8), progress=False, log=lambda s: None)
    save_cnn(model, spec, root / "cnn")
    return root, ds, model, spec


@pytest.mark.slow
def test_explain_artifacts(phantom_cnn):
    root, ds, model, spec = phantom_cnn
    out = root / "explanation"
    m = explain(ds, model, out, TINY, task=spec.task, input_shape=tuple(spec.input_shape), cnn_name="tiny")
    for f in ["config.json", "features.npy", "pls/pls.npz", "pls_variance.png", "scores.csv", "gan/pose.pt",
              "gan/best/generator.pt", "gan/best/generator.json", "metrics.json", "summary.txt",
              "sequences/component_1.gif", "sequences/component_2_eigen.png", "sequences/component_1_deviation.png",
              "sequences/component_1_strip.png"]:
        assert (out / f).exists(), f
    with Image.open(out / "sequences/component_1.gif") as gif:
        assert gif.n_frames >= 4
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["schema"] == "figan.metrics/2" and saved == json.loads(json.dumps(m))
    assert "randconv" in saved["fid"]["extractor"].lower() and saved["fid"]["floor"] >= 0
    assert saved["fid"]["n_samples"] == 32 and "sweep" in saved["fid"]["protocol"]
    assert "quantiles" in saved["sweep"]["range"] and len(saved["sweep"]["lo"]) == 2
    c1 = saved["components"][0]
    assert {"faithfulness", "reader", "conditioning", "ground_truth", "sweep"} <= set(c1)
    assert len(c1["faithfulness"]["rho_per_seed"]) == 8               # the checks use check_seeds seeds
    assert {"heart_size", "vascular_fullness", "shift_x", "noise"} <= set(c1["ground_truth"])
    assert len(c1["ground_truth"]["heart_size"]["ci95"]) == 2
    assert set(saved["gates"]) >= {"faithfulness", "reader", "conditioning", "fid", "diversity", "driving_factor",
                                   "nuisance", "all_pass"}
    assert saved["verdict"]["verdict"] == ("pass" if saved["gates"]["all_pass"] else "fail")
    assert len(saved["pls"]["heldout"]["cumulative_pct_cnn_output_variance"]) == 2
    # the published sweep shows the chosen seeds only
    with np.load(out / "sequences/component_1.npz") as z:
        assert z["seeds"].tolist() == [0, 1]
    # real held-out cases, swept around themselves, low → high on each component, shown in report.html
    for j in (1, 2):
        cases = json.loads((out / f"sequences/component_{j}_real_cases.json").read_text())["cases"]
        assert len(cases) == 4 and [c["score"] for c in cases] == sorted(c["score"] for c in cases)
        assert all(c["path"].startswith("images/") for c in cases)
        assert (out / f"sequences/component_{j}_real_cases.png").stat().st_size > 1000
    assert saved["figures"] == {"attribution": [1, 2], "real_cases": [1, 2]}
    assert (out / "sequences/component_1_attribution.png").stat().st_size > 1000       # maps beside the sweep
    from models.report import build_report
    page = build_report(out).read_text()
    assert "real cases: 4" in page and "Where the CNN looks" in page
    # second run: registration reused → identical generator
    before = (out / "gan/best/generator.pt").read_bytes()
    explain(ds, model, out, TINY, task=spec.task, input_shape=tuple(spec.input_shape), cnn_name="tiny")
    assert (out / "gan/best/generator.pt").read_bytes() == before


@pytest.mark.slow
def test_patient_generator_is_the_patient_at_its_own_scores(phantom_cnn):
    """At c = the patient's own scores the edit is the identity; the noise z picks the patient."""
    import torch
    from models.cgan import load_generator
    root, *_ = phantom_cnn
    G, gcfg, _ = load_generator(root / "explanation" / "gan" / "best")
    idx = torch.arange(5)
    own = G.edit(idx, G.pool_scores[idx])
    assert torch.allclose(own, G.pool_images[idx].float() / 255, atol=2e-3)
    moved = G.edit(idx, G.pool_scores[idx] + torch.tensor([2.0, 0.0]))
    assert (moved - own).abs().mean() > 1e-3
    z = torch.tensor([[-3.0], [0.0], [3.0]])
    assert G.patient_index(z).tolist() == sorted(G.patient_index(z).tolist())


@pytest.mark.slow
def test_an_image_outside_the_pool_is_placed_and_edited_around_itself(phantom_cnn):
    """Patient-centred sweeps of any image: a real image moved by a known shift is placed back (its residual
    within the calibrated threshold), at its own scores the edit is the image itself, and an image of another
    kind (noise) is flagged as poorly registered."""
    import torch
    from models.cgan import load_generator
    from models.warp import apply_similarity
    from services.render import patient_sweeps
    root, *_ = phantom_cnn
    G, gcfg, _ = load_generator(root / "explanation" / "gan" / "best")
    x = G.pool_images[:4].float() / 255
    shifted = apply_similarity(x, torch.tensor([[0.0, 0.0, 0.12, -0.08]]).repeat(4, 1)).clamp(0, 1)
    pose, residual, trusted = G.place(x)
    pose_s, _, trusted_s = G.place(shifted)
    assert trusted.all() and trusted_s.all()
    assert torch.allclose(pose_s[:, 2:] - pose[:, 2:], torch.tensor([0.12, -0.08]).expand(4, 2), atol=0.04)
    own = G.pool_scores[:4]
    assert torch.allclose(G.edit_image(shifted, pose_s, own, own), shifted, atol=2e-3)
    values = np.stack([np.linspace(-1, 1, 5), np.linspace(-1, 1, 5)])
    frames, placement = patient_sweeps(G, shifted[:1], own[0].numpy(), values)
    assert frames.shape == (2, 5, 1, 32, 32) and placement["trusted"]
    noise = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert not patient_sweeps(G, noise, own[0].numpy(), values)[1]["trusted"]


@pytest.mark.slow
def test_real_cases_are_spread_over_the_scores_and_are_themselves_at_their_own_score(phantom_cnn):
    from models.cgan import load_generator
    from models.real_cases import pick_cases, sweep_cases
    scores = np.array([5.0, -1.0, 0.0, 3.0, 2.0, 1.0, -2.0, 4.0])
    picked = pick_cases(scores, np.arange(8), 4)
    assert scores[picked].tolist() == sorted(scores[picked].tolist())            # low → high
    assert len(set(picked.tolist())) == 4 and scores[picked].min() <= -1 and scores[picked].max() >= 4
    assert pick_cases(scores, np.array([2, 6]), 4).tolist() == [6, 2]         # fewer candidates than cases
    root, *_ = phantom_cnn
    G, *_ = load_generator(root / "explanation" / "gan" / "best")
    images = G.pool_images[:3].float() / 255
    own = G.pool_scores[:3].numpy().astype(np.float64)
    values = np.sort(np.r_[np.linspace(-1.5, 1.5, 4), own[1, 0]])
    frames, info = sweep_cases(G, images, own, np.array([1]), 0, values)
    k = info[0]["own_score_frame"]
    assert values[k] == own[1, 0] and frames.shape == (1, 5, 1, 32, 32)
    assert np.abs(frames[0, k] - images[1].numpy()).max() < 2e-3                 # the image itself
    assert np.abs(frames[0, 0] - frames[0, -1]).mean() > 1e-3


@pytest.mark.slow
def test_cgan_generator_still_explains(phantom_cnn):
    root, ds, model, spec = phantom_cnn
    out = root / "explanation-cgan"
    m = explain(ds, model, out, TINY_CGAN, task=spec.task, input_shape=tuple(spec.input_shape), cnn_name="tiny")
    assert (out / "gan/last.pt").exists() and (out / "fid_trace.json").exists()
    assert [r["step"] for r in m["fid"]["trace"]] == [10, 20] and m["training"]["generator"] == "cgan"


def test_cli_explain_and_errors(phantom_cnn, tmp_path, capsys):
    root, ds, model, spec = phantom_cnn
    assert main(["components", "--data", str(root / "data"), "--cnn", str(root / "cnn"), "--out", str(tmp_path / "c"),
                 "--n-components", "2"]) == 0
    assert (tmp_path / "c/pls_variance.png").exists() and "pct_target_variance" in capsys.readouterr().out
    rc = main(["explain", "--data", str(tmp_path / "nope"), "--cnn", str(root / "cnn"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["components", "--data", str(root / "data"), "--cnn", str(root / "cnn"), "--out", str(tmp_path / "y"),
               "--layer", "features.99"])
    assert rc == 2 and "features.99" in capsys.readouterr().err
