"""The search page in a real headless Chromium (Debian's chromium and chromedriver; no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import chromium
from tests.images import jpeg
from tests.server import running_server

pytestmark = pytest.mark.e2e
OUTPUT = Path(__file__).resolve().parents[1] / "test-output"


def test_query_results_and_word_heatmap(tiny_model_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with running_server(tiny_model_dir, tmp_path / "d", tmp_path) as srv:
        with srv.client() as c:
            files = [("files", (f"{i}.jpg", jpeg(i, 96), "image/jpeg")) for i in range(4)]
            assert c.post("/items", files=files).status_code == 200
        browser = chromium(tmp_path / "chrome")
        try:
            browser.get(srv.url + "/")
            browser.find_element(By.ID, "query").send_keys("a red square on grass")
            browser.find_element(By.ID, "go").click()
            wait = WebDriverWait(browser, 30)
            wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".card")))
            cards = browser.find_elements(By.CSS_SELECTOR, ".card")
            assert len(cards) == 4
            words = [w.text for w in cards[0].find_elements(By.CSS_SELECTOR, ".word")]
            assert words == ["a", "red", "square", "on", "grass"]
            cards[0].find_elements(By.CSS_SELECTOR, ".word")[2].click()
            canvas = cards[0].find_element(By.CSS_SELECTOR, "canvas.heatmap")
            assert canvas.get_attribute("data-word") == "square"
            painted = browser.execute_script(
                "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return [c.width, n];",
                canvas,
            )
            assert painted[0] == 4 and painted[1] > 0  # a 4x4 patch grid with coloured cells
            wait.until(
                lambda b: b.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
            )
            assert "results in" in browser.find_element(By.ID, "status").text
            OUTPUT.mkdir(exist_ok=True)
            browser.save_screenshot(str(OUTPUT / "web_page.png"))
            assert (OUTPUT / "web_page.png").stat().st_size > 1000
        finally:
            browser.quit()
