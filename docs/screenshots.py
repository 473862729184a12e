"""Make the web UI's screenshots in docs/ (ui-list.png, ui-image.png) from a real service.

    .venv/bin/python docs/screenshots.py

It starts a gunicorn on a temporary instance (harness.start_server), stores a few real
qcow2 images made by qemu-img through the API, signs in with Debian's chromium (headless,
under Selenium, as tests/browser.py starts it) and takes the image list and one image's
page with a signed link made. Nothing is left behind but the two PNG files.
"""

import base64
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from browser import chromium, missing_browser  # noqa: E402

from harness import start_server, stop_server  # noqa: E402

# (name, namespace, virtual size) of the images shown, oldest first.
IMAGES = [("fedora-41", None, "8G"), ("ubuntu-24-04", "djinn/base", "10G"),
          ("debian-12", "djinn/base", "4G"), ("alpine-3-20", "djinn", "1G")]
WIDTH = 1200


def store_images(server, headers, folder):
    """Upload IMAGES through POST /images; return the last one's JSON."""
    image = None
    for name, namespace, size in IMAGES:
        path = folder / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
        query = f"name={name}" + (f"&namespace={namespace}" if namespace else "")
        request = urllib.request.Request(f"{server.url}/images?{query}", method="POST",
                                         data=path.read_bytes(), headers=headers)
        with urllib.request.urlopen(request) as response:
            image = json.load(response)
    return image


def full_page(driver, path):
    """Save the whole page, however tall, as a PNG (chromium's own capture beyond the
    window, through the DevTools protocol)."""
    width, height = driver.execute_script(
        "const e = document.documentElement; return [e.scrollWidth, e.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    print(path)


def take(server, token, image):
    """Sign in, then take the list and the image's page with a signed link."""
    driver = chromium(width=WIDTH, height=700)
    try:
        driver.get(server.url + "/ui/sign-in")
        driver.find_element("id", "token").send_keys(token)
        driver.find_element("css selector", "form.stacked button[type=submit]").click()
        driver.get(server.url + "/ui/")  # without the "Signed in" message
        full_page(driver, DOCS / "ui-list.png")
        driver.get(f"{server.url}/ui/images/{image['id']}")
        driver.find_element("css selector", "form[action$='/links'] button").click()
        full_page(driver, DOCS / "ui-image.png")
    finally:
        driver.quit()


def main():
    reason = missing_browser()
    if reason:
        sys.exit(f"docs/screenshots.py: {reason}")
    with tempfile.TemporaryDirectory() as folder:
        server = start_server(Path(folder) / "instance")
        try:
            token = server.token("alice")
            image = store_images(server, {"Authorization": f"Bearer {token}"}, Path(folder))
            take(server, token, image)
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
