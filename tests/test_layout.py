"""The explanation folder's names (models.layout) are the format of published runs: they must stay today's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models import layout


def test_component_file_gives_the_published_names_for_every_kind(tmp_path):
    published = {"gif": "component_3.gif", "strip": "component_3_strip.png", "eigen": "component_3_eigen.png",
                 "deviation": "component_3_deviation.png", "attribution": "component_3_attribution.png",
                 "real_cases": "component_3_real_cases.png", "real_cases_json": "component_3_real_cases.json",
                 "npz": "component_3.npz"}
    assert set(layout.COMPONENT_SUFFIXES) == set(published)
    for kind, name in published.items():
        assert layout.component_file(tmp_path, 3, kind) == tmp_path / "sequences" / name
        assert layout.component_file(str(tmp_path), np.int64(3), kind) == tmp_path / "sequences" / name


def test_unknown_kind_or_component_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"kind: 'gifs' is not one of gif, strip, .*real_cases_json"):
        layout.component_file(tmp_path, 1, "gifs")
    with pytest.raises(ValueError, match="component: 0 is below 1"):
        layout.component_file(tmp_path, 0, "gif")
    with pytest.raises(ValueError, match="component: 1.0 is not an integer"):
        layout.component_file(tmp_path, 1.0, "gif")


def test_the_folder_names_a_service_and_a_published_run_rely_on():
    assert layout.SERVICE_ARTIFACTS == ("gan/best", "pls", "sequences", "metrics.json")
    assert set(layout.SERVED_ARTIFACTS) >= {"config.json", "lineage.json", "summary.txt", "fid_trace.png",
                                                "pls_variance.png", "report.html"}
    assert (layout.GENERATOR_META, layout.GENERATOR_WEIGHTS) == ("generator.json", "generator.pt")
    assert (layout.PLS_ARRAYS, layout.PLS_META) == ("pls.npz", "pls.json")
    assert (layout.MANIFEST, layout.CHECKPOINT) == ("audit/manifest.json", "gan/last.pt")
    assert Path(layout.SERVICE_FID_TRACE).parts == (layout.SERVICE_DIR, "fid_trace.png")
