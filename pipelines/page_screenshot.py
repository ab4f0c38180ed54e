"""The README's picture of the page at `/` (docs/page.png), taken from the real page in headless chromium.

Inputs: none (the street city and run of pipelines/benchmarks/serve.py: a rendered synthetic city, a random
DINOv2, so the page shows its RANDOM BACKBONE notice). Needs Debian's chromium and chromium-driver and
selenium. Output: docs/page.png. Run from the repository root: `python -m pipelines.page_screenshot`.
"""

import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from pipelines.benchmarks.records import ROOT
from pipelines.benchmarks.serve import free_port, make_run, start_server, stop_server


def main(out: Path = ROOT / "docs" / "page.png") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run, _ = make_run(Path(tmp), hidden=32, layers=2, image_size=56)
        photo = sorted((Path(tmp) / "city" / "test").iterdir())[3]  # a query photo, not a training one
        port = free_port()
        server = start_server(run, port)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            browser.get(f"http://127.0.0.1:{port}/")
            for _ in range(200):
                if "cells of" in browser.find_element("id", "runinfo").text:
                    break
                time.sleep(0.05)
            field = browser.find_element("id", "file")
            browser.execute_script("arguments[0].hidden = false;", field)
            field.send_keys(str(photo))
            browser.execute_script("arguments[0].hidden = true;", field)
            for _ in range(400):
                if browser.find_element("id", "verdict").text.startswith("lat "):
                    break
                time.sleep(0.05)
            out.parent.mkdir(exist_ok=True)
            browser.save_screenshot(str(out))
        finally:
            browser.quit()
            stop_server(server)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
