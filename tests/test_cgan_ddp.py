"""DDP: the core trainer on 2 gloo CPU processes computes what one process computes with the same global batch."""
import pytest
import torch

from models.cgan import CGAN, CGANConfig
from models.cgan_ddp import spawn_train
from tests.test_cgan import TINY, disc_data


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    data, cond = disc_data(64)
    cfg = CGANConfig(**TINY, steps=8, ckpt_every=4, regressor_steps=20, diffaugment="translation,color")
    single = CGAN(cfg)
    single.train(data, cond, tmp_path / "single", progress=False, log_every=4)
    ref = single.state_dict()
    got = spawn_train(2, cfg, data, cond, tmp_path / "ddp", log_every=4)

    assert got["step"] == ref["step"] == 8
    assert torch.equal(got["rng"], ref["rng"])                 # every rank drew the global batch's numbers
    assert _max_diff(ref["R"], got["R"]) < 1e-5                # R is fitted on the whole data on every rank
    print({k: _max_diff(ref[k], got[k]) for k in ("R", "G", "D", "G_ema")})
    # same trajectory up to floating-point summation order (sharded batch, all-reduced statistics/gradients)
    assert _max_diff(ref["G"], got["G"]) < 1e-4
    assert _max_diff(ref["D"], got["D"]) < 1e-4
    assert _max_diff(ref["G_ema"], got["G_ema"]) < 1e-4       # incl. G's batch-norm running statistics
    for a, b in zip(ref["losses"], got["losses"]):
        assert a["step"] == b["step"]
        for key in ("loss_d", "loss_g", "cond_g"):
            assert abs(a[key] - b[key]) < 1e-4, (a, b)
    # the weights moved far more than the tolerance: the comparison is not vacuous
    assert _max_diff(ref["G"], CGAN(cfg).G.state_dict()) > 1e-3
