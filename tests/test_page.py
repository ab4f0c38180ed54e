"""The page at `/` in a real headless browser: Debian's chromium driven by Selenium (skipped without them)."""

import shutil
import time

import pytest

from dcfeat.localizer import Localizer
from dcfeat.serve import ServeConfig, create_app
from tests.conftest import jpeg_bytes, live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver are not "
                                "installed (apt-get install chromium chromium-driver)")


def open_browser(width: int = 1280, height: int = 860):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)


def wait_for(browser, condition, what: str, tries: int = 600):
    """Poll the page until `condition(browser)` is truthy (bounded in tries, not in seconds)."""
    for _ in range(tries):
        value = condition(browser)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"the page never showed {what}: {browser.find_element('id', 'error').text!r}")


def drop_photo(browser, path) -> None:
    """What a person does: choose a photo (the file input behind the drop zone)."""
    field = browser.find_element("id", "file")
    browser.execute_script("arguments[0].hidden = false;", field)
    field.send_keys(str(path))


# Counts of the canvas's pixels by colour: the cells (grey-blue), top-k cells (orange), the answer (red or grey).
COUNT_PIXELS = """
const g = document.getElementById('map').getContext('2d'), c = g.canvas;
const d = g.getImageData(0, 0, c.width, c.height).data, n = {cells: 0, topk: 0, red: 0};
for (let i = 0; i < d.length; i += 4) {
  const [r, gr, b] = [d[i], d[i + 1], d[i + 2]];
  if (r === 0xc9 && gr === 0xd3 && b === 0xde) n.cells++;
  if (r > 200 && gr > 100 && gr < 200 && b < 80) n.topk++;
  if (r > 180 && gr < 40 && b < 40) n.red++;
}
return n;
"""


@pytest.fixture(scope="module")
def page(calibrated_run):
    with live_server(create_app(Localizer.from_run(calibrated_run, device="cpu"), ServeConfig(max_wait_ms=1))) as url:
        browser = open_browser()
        try:
            browser.get(url + "/")
            wait_for(browser, lambda b: "cells of" in b.find_element("id", "runinfo").text, "the run")
            yield browser
        finally:
            browser.quit()


def test_the_page_draws_the_city_and_says_the_backbone_is_random(page):
    assert page.find_element("id", "notice").is_displayed()
    assert page.find_element("id", "notice").text.startswith("RANDOM BACKBONE")
    info = page.find_element("id", "runinfo").text
    assert "calibrated on 'val' at 150 m" in info and "training complete" in info
    assert page.execute_script(COUNT_PIXELS)["cells"] > 0  # the cells, drawn with no map tile


def test_a_dropped_photo_shows_its_answer_circle_confidence_and_top_k(page, tmp_path):
    photo = tmp_path / "street.jpg"
    photo.write_bytes(jpeg_bytes(7))
    page.find_element("id", "minconf").clear()
    drop_photo(page, photo)
    wait_for(page, lambda b: b.find_element("id", "verdict").text.startswith("lat "), "an answer")
    details = page.find_element("id", "details").text
    assert "confidence 0." in details and "(probability within 150 m)" in details and "90 % radius" in details
    rows = page.find_elements("css selector", "#topk tbody tr")
    classes = page.execute_script("return state.run.classes")
    assert len(rows) == min(int(page.find_element("id", "k").get_attribute("value")), classes)
    pixels = page.execute_script(COUNT_PIXELS)
    assert pixels["topk"] > 0 and pixels["red"] > 0  # top-k cells and the answer with its circle


def test_an_abstention_is_shown_as_such(page, tmp_path):
    photo = tmp_path / "other.jpg"
    photo.write_bytes(jpeg_bytes(8))
    page.find_element("id", "minconf").send_keys("1")
    drop_photo(page, photo)
    verdict = wait_for(page, lambda b: (lambda t: t if t.startswith("ABSTAINED") else "")(
        b.find_element("id", "verdict").text), "the abstention")
    assert "no answer given" in verdict
    assert "abstained" in page.find_element("id", "answer").get_attribute("class")
    assert page.execute_script(COUNT_PIXELS)["red"] == 0  # the run's guess is grey, not an answer


def test_an_unusable_photo_shows_the_reason(page, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    page.find_element("id", "minconf").clear()
    drop_photo(page, broken)
    error = wait_for(page, lambda b: b.find_element("id", "error").text, "the error")
    assert error.startswith("422:") and "broken.jpg" in error
