"""A real browser for the web UI's tests and screenshots: Debian's chromium, headless,
driven by Selenium through Debian's chromedriver.

When either is missing, `bin/setup --browser` installs both with apt-get, as bin/setup
installs qemu-img, where that can work (root, or sudo without a password); elsewhere
`missing_browser()` says why there is none, and the tests say they are skipped for it.
"""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 900  # apt-get fetching chromium on a slow mirror


def _programs():
    return shutil.which("chromium"), shutil.which("chromedriver")


def _can_install():
    """Whether bin/setup --browser could run apt-get here without asking for a password."""
    if shutil.which("apt-get") is None:
        return False
    if os.geteuid() == 0:
        return True
    return shutil.which("sudo") is not None and subprocess.run(
        ["sudo", "-n", "true"], capture_output=True, check=False).returncode == 0


def missing_browser():
    """None when chromium and chromedriver are there (installed now if need be), else why not."""
    if all(_programs()):
        return None
    if not _can_install():
        return ("no chromium and chromium-driver here, and no apt-get to install them without "
                "a password: install Debian's chromium and chromium-driver (bin/setup --browser)")
    result = subprocess.run([str(ROOT / "bin" / "setup"), "--browser"], capture_output=True,
                            text=True, timeout=INSTALL_TIMEOUT, check=False)
    if result.returncode != 0 or not all(_programs()):
        return f"bin/setup --browser could not install chromium: {result.stderr.strip()[-500:]}"
    return None


def chromium(javascript=True, width=1280, height=900):
    """A headless chromium under Selenium; the caller quits it. javascript=False turns
    script off for every page, as a person who blocks it sees the UI."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = _programs()
    options = Options()
    options.binary_location = browser
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", f"--window-size={width},{height}", "--lang=en"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # chromium's sandbox refuses to run as root
    # The console's messages, for the tests' check that no page broke its own CSP.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if not javascript:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2})
    # Selenium is handed Debian's driver: its own manager would try to download one.
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))
