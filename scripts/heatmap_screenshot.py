"""Screenshot of the search page's word heatmap (docs/img/heatmap.png in the README).

Starts `emkum serve` on a free loopback port over an indexed data directory, searches in headless
Chromium (Debian's chromium + chromium-driver, as the e2e tests use), clicks one word of the first
result and saves the page. Usage:

    python scripts/heatmap_screenshot.py --model artifacts/emkum-flickr8k --data-dir data/index \\
        --query "a man riding a motorcycle" --word motorcycle --out docs/img/heatmap.png
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.browser import chromium


def main(
    model: Path = typer.Option(..., help="an exported model directory"),
    data_dir: Path = typer.Option(..., help="an indexed data directory (emkum index)"),
    query: str = typer.Option(...),
    word: str = typer.Option(..., help="the word whose heatmap to show"),
    out: Path = typer.Option(Path("docs/img/heatmap.png")),
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EMKUM_MODEL_DIR": str(model), "EMKUM_DATA_DIR": str(data_dir)}
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)], env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        browser = chromium(Path(tempfile.mkdtemp()), window="1100,700")
        try:
            browser.get(url + "/")
            browser.find_element(By.ID, "query").send_keys(query)
            browser.find_element(By.ID, "go").click()
            WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".card")))
            card = browser.find_elements(By.CSS_SELECTOR, ".card")[0]
            chips = [c for c in card.find_elements(By.CSS_SELECTOR, ".word") if c.text == word]
            if not chips:
                raise typer.BadParameter(f"{word!r} is not a word of the first result's explanation")
            chips[0].click()
            WebDriverWait(browser, 30).until(
                lambda b: b.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(out))
            typer.echo(f"{out}: first result {card.get_attribute('data-id')}")
        finally:
            browser.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    typer.run(main)
