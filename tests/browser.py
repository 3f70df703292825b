"""Headless Debian Chromium for the page tests and scripts/heatmap_screenshot.py: the flags this
closed network needs (no background networking, updates or sync) in one place."""

from __future__ import annotations

import shutil
from pathlib import Path


def chromium(profile: Path, window: str = "1200,900"):
    """A selenium Chrome driver on /usr/bin/chromium and chromedriver (Debian packages; no download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "install Debian's chromium and chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={window}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)
