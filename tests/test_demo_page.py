"""The demo page at / in a real headless browser: Debian's chromium driven by selenium (no downloads)."""

import os
import re
import shutil
import tempfile

import pytest

from coreinfer.server import ServerSettings, create_app, serve_in_thread

pytestmark = pytest.mark.real_model
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
STATS = re.compile(r"(\d+\.\d) tok/s · FFN density (\d\.\d{3})(?: · keep \d\.\d\d)? · done")


def system_chromium() -> tuple[str, str]:
    """Paths of chromium and its driver; CI must have them (.ci/run installs them), elsewhere skip."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        message = "chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return browser, driver


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver_path = system_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    with tempfile.TemporaryDirectory() as profile:
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
        try:
            yield driver
        finally:
            driver.quit()


def test_demo_streams_dense_and_coreinfer_side_by_side(real_engine, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    settings = ServerSettings(keep=0.4, max_tokens=6, max_tokens_limit=16)
    with serve_in_thread(create_app(real_engine, settings)) as url:
        browser.get(url + "/")
        assert "SmolLM2-135M-Instruct" in browser.find_element(By.TAG_NAME, "h1").text
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("What is the capital of France?")
        tokens = browser.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("6")
        browser.find_element(By.ID, "run").click()

        def both_done(driver):
            return all(STATS.search(driver.find_element(By.ID, f"{pane}-stats").text) for pane in ("dense", "sparse"))

        WebDriverWait(browser, 180, poll_frequency=0.2).until(both_done)
        # Beside the speed, how close the sparse answer is to the dense one.
        WebDriverWait(browser, 10, poll_frequency=0.2).until(
            lambda driver: "ROUGE-L vs dense" in driver.find_element(By.ID, "sparse-stats").text
        )
        assert "keep 0.40" in browser.find_element(By.ID, "sparse-stats").text  # the server's default, shown
        for pane, dense in (("dense", True), ("sparse", False)):
            text = browser.find_element(By.ID, f"{pane}-text").text
            rate, density = STATS.search(browser.find_element(By.ID, f"{pane}-stats").text).groups()
            assert text.strip(), pane
            assert float(rate) > 0, pane
            assert (float(density) == 1.0) == dense, (pane, density)
