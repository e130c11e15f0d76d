"""The viewer page in a real headless Chromium (Debian `chromium` + `chromium-driver`, driven by Selenium),
served by a real `bentoml serve` whose reads need the API key (the page sends it from its key field).

Loads /viewer/, enters the key, selects a version, compares two versions side by side and checks that every
image (sequence GIFs, eigen and deviation images, FID trace) really rendered (naturalWidth > 0), that the
faithfulness/conditioning charts are drawn, and that each panel opens with its verdict banner (versions 1 and 2
have opposite verdicts). Skipped, with the reason, where Chromium is not installed."""
from __future__ import annotations

import shutil

import pytest

from models.verdict import verdict_text
from service_platform import API_KEY, MODEL, shared_platform

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian packages chromium and chromium-driver "
                                       "(apt-get install -y chromium chromium-driver)")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options       # noqa: E402
from selenium.webdriver.chrome.service import Service       # noqa: E402
from selenium.webdriver.common.by import By                 # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait   # noqa: E402

IMAGES_PER_VERSION = 1 + 4 * 2          # FID trace + (GIF, eigen, deviation, attribution) per component (2)


@pytest.fixture(scope="module")
def platform(request, tmp_path_factory):
    return shared_platform(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def served(platform):
    served = platform.served[1].wait_ready()   # reads need the key
    yield served
    served.stop()


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-proxy-server",
                "--window-size=1400,1200"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def images(driver, panel: str) -> list[dict]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' img')).map(i => "
        "({cls: i.className, state: i.dataset.state, width: i.naturalWidth}))", f"#{panel}")


def wait_rendered(driver, panel: str, n: int = IMAGES_PER_VERSION) -> list[dict]:
    WebDriverWait(driver, 30).until(
        lambda d: sum(i["state"] in ("loaded", "error") for i in images(d, panel)) >= n)
    return images(driver, panel)


def banner(driver, panel: str) -> tuple[str, str, str]:
    """(verdict, text, background colour) of the first element of a panel, which must be its verdict banner."""
    return tuple(driver.execute_script(
        "const b = document.querySelector(arguments[0]).firstElementChild; "
        "return [b.classList.contains('verdict') ? b.dataset.verdict : 'no banner', b.textContent, "
        "getComputedStyle(b).backgroundColor];", f"#{panel}"))


def test_viewer_renders_and_compares_versions(served, browser, platform):
    browser.get(f"{served.url}/viewer/")
    WebDriverWait(browser, 30).until(lambda d: "401" in d.find_element(By.ID, "status").text)   # reads need the key
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(API_KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    WebDriverWait(browser, 30).until(lambda d: Select(d.find_element(By.ID, "model")).options)
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.text == MODEL
    labels = [o.text for o in Select(browser.find_element(By.ID, "version-a")).options]
    assert any(label.startswith("v1 (champion") and "— done" in label for label in labels), labels
    assert any(label.startswith("v3") and label.endswith("failed") for label in labels), labels

    Select(browser.find_element(By.ID, "version-a")).select_by_value("1")
    shown = wait_rendered(browser, "panel-a")
    assert len(shown) == IMAGES_PER_VERSION and all(i["state"] == "loaded" and i["width"] > 0 for i in shown), shown
    assert sorted(i["cls"] for i in shown) == ["attribution", "attribution", "deviation", "deviation", "eigen",
                                               "eigen", "fid", "gif", "gif"]
    panel_a = browser.find_element(By.ID, "panel-a")
    assert "v1 (champion)" in panel_a.find_element(By.TAG_NAME, "h2").text
    assert "% of target variance" in panel_a.find_element(By.CSS_SELECTOR, ".component .numbers").text
    assert len(panel_a.find_elements(By.CSS_SELECTOR, "svg.chart polyline")) == 2 * 3   # faithfulness + 2 lines
    want = platform.verdicts["1"]
    assert any(label.startswith("v1 (") and label.endswith(f"— done · checks {want['verdict']}")
               for label in labels), labels
    lineage = panel_a.find_element(By.CSS_SELECTOR, "p.lineage")                      # under the title
    manifest = platform.client.get_model_version(MODEL, "1").tags["figan.manifest_sha256"]
    assert lineage.get_attribute("data-manifest") == manifest
    assert lineage.get_attribute("data-dataset-md5") == platform.lineage["dataset_md5"]
    assert lineage.get_attribute("data-cnn-digest") == platform.lineage["cnn_digest"]
    assert f"manifest sha256 {manifest[:12]}" in lineage.text and "(2026-11-29)" in lineage.text
    verdict_a, text_a, colour_a = banner(browser, "panel-a")
    assert (verdict_a, text_a) == (want["verdict"], f"Explanation checks: {verdict_text(want)}")

    assert not browser.find_element(By.ID, "panel-b").is_displayed()
    Select(browser.find_element(By.ID, "version-b")).select_by_value("2")
    shown_b = wait_rendered(browser, "panel-b")
    assert browser.find_element(By.ID, "panel-b").is_displayed()
    assert all(i["state"] == "loaded" and i["width"] > 0 for i in shown_b), shown_b
    assert "v2" in browser.find_element(By.CSS_SELECTOR, "#panel-b h2").text
    want_b = platform.verdicts["2"]
    verdict_b, text_b, colour_b = banner(browser, "panel-b")
    assert (verdict_b, text_b) == (want_b["verdict"], f"Explanation checks: {verdict_text(want_b)}")
    colours = {verdict_a: colour_a, verdict_b: colour_b}                  # one passes, one fails
    assert colours["pass"] == "rgb(218, 251, 225)" and colours["fail"] == "rgb(255, 235, 233)"   # green, red
    if want_b["verdict"] == "fail":
        assert "failing gates: fid, diversity" in text_b
    assert "b=2" in browser.current_url and "a=1" in browser.current_url

    Select(browser.find_element(By.ID, "version-b")).select_by_value("3")     # a failed version: its status
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#panel-b .error"))
    assert "409" in browser.find_element(By.CSS_SELECTOR, "#panel-b .error").text
    assert "failed" in browser.find_element(By.CSS_SELECTOR, "#panel-b .error").text


def test_viewer_explains_an_uploaded_image(served, browser, platform):
    """The upload panel posts a dataset image to explain-image and shows one sweep per component, saying which
    frame is the image's own score."""
    browser.get(f"{served.url}/viewer/#model={MODEL}&a=1&b=")
    key = browser.find_element(By.ID, "api-key")
    if not key.get_attribute("value"):
        key.send_keys(API_KEY)
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#panel-a .upload-file"))
    browser.find_element(By.CSS_SELECTOR, "#panel-a .upload-file").send_keys(
        str(platform.home / "discs" / "images" / "000000.png"))
    browser.find_element(By.CSS_SELECTOR, "#panel-a .upload-go").click()
    WebDriverWait(browser, 60).until(lambda d: len([i for i in images(d, "panel-a .upload-result")
                                                    if i["state"] == "loaded"]) == 2)
    assert all(i["width"] > 0 for i in images(browser, "panel-a .upload-result"))
    captions = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#panel-a .upload-result figcaption")]
    assert len(captions) == 2 and all("is the image's own score" in c for c in captions), captions
    assert "CNN output" in browser.find_element(By.CSS_SELECTOR, "#panel-a .upload-result .numbers").text
