"""The live cache page (GET /admin/) in a real headless browser: Debian's Chromium driven by
Selenium (``apt-get install chromium chromium-driver``; nothing is downloaded at run time).

The page loads with no console errors, a running request shows up in the block map, a pin shows
up as pinned, and the lookup box answers. With ``PAGEDSERVE_SCREENSHOT=path`` the test saves a
screenshot of the page there (the README's ``docs/admin-cache-page.png`` comes from it).
"""

import os
import threading
import time

import httpx
import pytest

from blockmgr.manager import BlockManager
from tests.gateway.fakes import fake_app, serve_in_thread

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PROMPT = "The cache page shows this prompt. In a hole in the ground there lived a hobbit, not a nasty, dirty, wet hole. " * 2


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # `arguments` is the options' own list of browser switches.
    opts.arguments.extend(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1400"])
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(predicate, timeout_s=10.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def js(driver, expression):
    """Evaluate in the page in one go (the page redraws every second, so element handles go stale)."""
    return driver.execute_script(f"return {expression};")


def count(driver, executor_id, kind) -> int:
    text = js(driver, f"(document.querySelector('.pool[data-executor=\"{executor_id}\"] .n-{kind}') || {{}}).textContent")
    return int(text) if text else -1


@pytest.mark.slow
def test_cache_page_in_a_real_browser(browser, tok):
    from selenium.webdriver.common.by import By

    app, executors, _ = fake_app(tok, executor_kwargs={"num_blocks": 96, "token_delay_s": 0.03},
                                 manager=BlockManager(watermark=0, pin_share=0.5))
    with serve_in_thread(app) as base:
        browser.get(base + "/admin/")
        assert browser.title == "pagedserve: KV cache"
        wait_for(lambda: count(browser, "executor-0", "u") == 0, what="the empty pool")

        # A request in flight holds blocks: they show up as in use.
        body = {"prompt": PROMPT, "max_tokens": 150, "ignore_eos": True}
        done = threading.Thread(target=lambda: httpx.post(base + "/v1/completions", json=body, timeout=60))
        done.start()
        wait_for(lambda: count(browser, "executor-0", "u") > 0, what="blocks in use in the map")
        done.join()
        wait_for(lambda: count(browser, "executor-0", "u") == 0 and count(browser, "executor-0", "c") > 0,
                 what="the finished request's blocks shown as cached")

        # A pin shows up as pinned, in the map and in the prefix table.
        (pin,) = httpx.post(base + "/admin/cache/pin", json={"prompt": PROMPT}).json()["pins"]
        wait_for(lambda: count(browser, "executor-0", "p") == pin["num_blocks"], what="pinned blocks in the map")
        assert js(browser, "document.querySelectorAll('.pool .map.device .b-p').length") == pin["num_blocks"]
        # The pin holds the prompt's blocks; the cached chain goes on with the generated tokens.
        wait_for(lambda: js(browser, "[...document.querySelectorAll('#prefixes td.pinned')].map(td => td.textContent)")
                 == [f"{pin['num_blocks']} of {(len(tok.encode(PROMPT)) + 150) // 16} blocks"], what="the prefix listed as pinned")
        assert "The cache page shows this prompt" in js(browser, "document.getElementById('prefixes').textContent")

        # The lookup box runs the lookup.
        browser.find_element(By.ID, "q").send_keys(PROMPT)
        browser.find_element(By.CSS_SELECTOR, "#lookup button").click()
        cell = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '#lookupresult tr.hit td.cached'),
                        what="the lookup result")
        cached = int(cell[0].text.split()[0])
        assert cached == pin["num_tokens"] > 0

        # A second request for the same prompt hits the cache: the hit rate goes up.
        for _ in range(3):
            httpx.post(base + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=60)
            time.sleep(1.1)
        wait_for(lambda: len(js(browser, "document.getElementById('hitline').getAttribute('points')").split()) >= 2 and
                 not js(browser, "document.getElementById('hitrate').textContent").startswith("since start: 0.0%"),
                 what="the hit-rate chart")
        if os.environ.get("PAGEDSERVE_SCREENSHOT"):
            browser.save_screenshot(os.environ["PAGEDSERVE_SCREENSHOT"])
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
