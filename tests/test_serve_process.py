"""`utilities.py serve` as a process: SIGHUP swaps the index under load without a failed request, and the page
works in a real browser (Debian's chromium, headless, driven by Selenium through Debian's chromium-driver)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import debian_packages, require_package
from servers import Server, digits_index

from siamese.search import Index

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = (str(debian_packages()[name]) for name in ("chromium", "chromium-driver"))


@pytest.fixture(scope="module")
def index_dir(digits, tmp_path_factory) -> Path:
    return digits_index(digits, tmp_path_factory.mktemp("served"), limit=4)[0]


def test_sighup_swaps_the_index_under_load_without_a_failed_request(digits, tmp_path):
    index, _ = digits_index(digits, tmp_path, limit=3)
    query = Path(Index.load(index).source["image_dir"]) / Index.load(index).filenames[0]
    data = query.read_bytes()
    server = Server(index, "--wait-ms", "1")
    answers, failures, stop = [], [], threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post("/search?k=3", content=data)
                    (answers if r.status_code == 200 else failures).append((r.status_code, r.text))
                    answers.append(c.get("/info").json()["items"])
                except httpx.HTTPError as e:
                    failures.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(1)
        digits_index(digits, tmp_path, limit=6)  # the same folder, replaced whole
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 6 not in answers:
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        output = server.output()
        server.stop()
    assert failures == []
    items = [a for a in answers if isinstance(a, int)]
    assert items[0] == 3 and items[-1] == 6 and sorted(items) == items  # old answers, then only new ones
    assert "reloaded" in output and "POST /search 200" in output


def test_the_page_searches_and_a_click_searches_again_in_chromium(index_dir, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    require_package("chromium", "chromium-driver")
    index = Index.load(index_dir)
    row = index.items.index("digit_2")
    query = tmp_path / "query.png"
    shutil.copy(Path(index.source["image_dir"]) / index.filenames[row], query)
    server = Server(index_dir)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.get(server.url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "images of" in b.find_element(By.ID, "info").text)
        browser.find_element(By.ID, "file").send_keys(str(query))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .card")) == 12)
        cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
        assert cards[0].find_element(By.CLASS_NAME, "item").text == "digit_2"
        assert browser.find_element(By.ID, "results-title").text == "nearest to query.png"
        wait.until(lambda b: b.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        browser.save_screenshot(str(os.environ.get("SIAMESE_SCREENSHOT", tmp_path / "serve.png")))
        clicked = cards[5]
        filename = clicked.find_element(By.TAG_NAME, "img").get_attribute("alt")
        clicked_row = clicked.get_attribute("data-row")
        before = [c.get_attribute("data-row") for c in cards]
        clicked.find_element(By.TAG_NAME, "img").click()
        wait.until(lambda b: b.find_element(By.ID, "results-title").text == f"nearest to {filename}")
        wait.until(lambda b: [c.get_attribute("data-row") for c in b.find_elements(By.CSS_SELECTOR, "#results .card")]
                   not in ([], before))
        assert browser.find_elements(By.CSS_SELECTOR, "#results .card")[0].get_attribute("data-row") == clicked_row
        browser.find_elements(By.CSS_SELECTOR, "#results .item")[0].click()
        wait.until(lambda b: b.find_element(By.ID, "results-title").text.startswith("item digit_"))
        assert browser.find_element(By.ID, "status").text == ""
    finally:
        browser.quit()
        server.stop()
