"""report.html (and an Evidently drift page) in a real headless Chromium, offline: every image decodes and
paints, nothing is fetched, no console error.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the Python package ``selenium``; skipped with
the reason when any of them is missing. The driver path is given explicitly, so Selenium Manager never tries to
download one.
"""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="headless Chromium needs the Debian packages chromium and chromium-driver "
                                       "(apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,2000", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"):
        opts.add_argument(arg)                      # a dead proxy: any attempt to fetch from the network fails
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from test_report import LINEAGE, make_artifacts
    from models.diff import explanation_diff
    from models.report import build_report

    art = make_artifacts(tmp_path_factory.mktemp("browser"))
    z = np.random.default_rng(0).standard_normal((200, 2))
    diff = explanation_diff(z, z[:, ::-1], [60, 30], [55, 35], previous="v2", current="v3")
    return build_report(art, lineage=LINEAGE, diff=diff)


def _load(driver, path: Path) -> None:
    driver.get_log("browser")                      # drop earlier messages
    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")


def _severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_report_renders_offline(browser, report):
    _load(browser, report)
    imgs = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.src.slice(0, 15)])")
    assert len(imgs) >= 9                        # variance chart + gif, eigen, strip, deviation per component
    bad = [i for i in imgs if not (i[1] and i[2] > 0 and i[3].startswith("data:image/"))]
    assert not bad, bad
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'))")
    assert fetched == []
    for section in ("cautions", "lineage", "variance", "components", "fid", "checks", "drift", "diff"):
        el = browser.find_element("id", section)
        assert el.is_displayed() and el.size["height"] > 20, section
    # the GIFs are shown at a readable size and the page lays out without horizontal overflow
    gif = browser.find_element("css selector", "img.gif")
    assert gif.size["width"] >= 150
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert browser.title.startswith("FIGAN explanation")
    assert _severe(browser) == []


def test_evidently_drift_page_renders_offline(browser, tmp_path):
    from flows.drift import STAT_COLUMNS, data_drift

    rng = np.random.default_rng(0)
    ref = pd.DataFrame(rng.normal(size=(120, len(STAT_COLUMNS))), columns=STAT_COLUMNS)
    cur = pd.DataFrame(rng.normal(0.8, size=(120, len(STAT_COLUMNS))), columns=STAT_COLUMNS)
    out = tmp_path / "drift" / "data_drift.html"
    data_drift(ref, cur, out_html=out)
    _load(browser, out)
    WebDriverWait(browser, 30).until(lambda d: "Dataset Drift" in d.find_element("tag name", "body").text)
    assert "Drifted Columns" in browser.find_element("tag name", "body").text
    assert _severe(browser) == []
