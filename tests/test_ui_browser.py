"""The web UI in a real browser (Debian's chromium, headless, driven by Selenium) against a
real gunicorn: what a person does, click by click, and what they then see.

Skipped, saying why, only where no chromium can be had (tests/browser.py installs it
with bin/setup --browser where apt-get can). After each test the browser's console must
hold no Content-Security-Policy refusal: the pages keep to their own policy.
"""

import hashlib
import json
import shlex
import subprocess
import urllib.error
import urllib.request

import pytest
import sample_images
from browser import chromium, missing_browser
from conftest import make_qcow2, server_with_account

pytestmark = pytest.mark.slow

WAIT = 60  # seconds a page is given to reach a state, on a busy machine


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One gunicorn for the module, with alice's token (all scopes) as server.token_text."""
    reason = missing_browser()
    if reason:
        pytest.skip(reason)
    with server_with_account(tmp_path_factory.mktemp("ui"), "alice") as server:
        server.token_text = server.headers["Authorization"].removeprefix("Bearer ")
        yield server


@pytest.fixture(scope="module")
def driver(live):
    browser = chromium()
    yield browser
    browser.quit()


@pytest.fixture
def person(driver, live):
    """The browser of a person who has not signed in yet; its console checked after."""
    person = Person(driver, live)
    driver.get(live.url + "/ui/sign-in")
    driver.delete_all_cookies()
    driver.execute_script("window.sessionStorage.clear(); window.localStorage.clear()")
    yield person
    refusals = [entry["message"] for entry in driver.get_log("browser")
                if "Content Security Policy" in entry["message"]]
    assert refusals == []


class Person:
    """What a person does in the browser, in the words of the page."""

    def __init__(self, driver, server):
        self.driver, self.server = driver, server

    def go(self, path):
        self.driver.get(self.server.url + path)

    def find(self, css):
        return self.driver.find_element("css selector", css)

    def text(self):
        return self.find("body").text

    def wait_for(self, condition, what, while_loading=False):
        """Wait until condition() holds. A page that is being replaced while the condition
        reads it (the old body gone stale between finding it and reading its text) counts
        as not there yet: the next look reads the new page. while_loading: any error of
        the driver counts so (chromium's, about nodes of a document being left, too)."""
        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait
        ignored = WebDriverException if while_loading else StaleElementReferenceException
        wait = WebDriverWait(self.driver, WAIT, ignored_exceptions=(ignored,))
        return wait.until(lambda d: condition(), what)

    def follow(self, css):
        """Click what css finds, a link or a form's button, and wait until the page it
        leads to has loaded: chromium's driver (156) may return from the click before the
        navigation that the click started, and the old page would be read instead."""
        old = self.find("html").id
        self.find(css).click()
        self.wait_for(lambda: self.find("html").id != old and self.loaded(),
                      f"the page that {css} opens", while_loading=True)

    def loaded(self):
        """Whether the page now shown has loaded."""
        return self.driver.execute_script("return document.readyState") == "complete"

    def wait_for_path(self, pattern):
        """Wait until the page at a path matching pattern is shown and loaded."""
        import re
        self.wait_for(lambda: re.fullmatch(pattern, self.path()) and self.loaded(),
                      f"a page at {pattern}", while_loading=True)

    def path(self):
        return self.driver.current_url.removeprefix(self.server.url)

    def sign_in(self, token=None):
        self.go("/ui/sign-in")
        self.find("#token").send_keys(token or self.server.token_text)
        self.follow("form.stacked button[type=submit]")
        self.wait_for(lambda: "Signed in as" in self.text(), "the signed-in page")

    def upload(self, path, name, namespace="", script=None, new_page=False):
        """Fill in the upload form and send it (after running script in the page);
        new_page: the form is sent without script, and its answer is a new page."""
        self.go("/ui/upload")
        self.find("#name").send_keys(name)
        if namespace:
            self.find("#namespace").send_keys(namespace)
        self.find("#file").send_keys(str(path))
        self.record_progress()
        if script:
            self.driver.execute_script(script)
        if new_page:
            self.follow("#upload-button")
        else:
            self.find("#upload-button").click()

    def record_progress(self):
        """Keep every value the progress bar shows, and the way the upload went, in
        sessionStorage, which outlives the page the upload script leaves for."""
        self.driver.execute_script("""
            const bar = document.getElementById('upload-bar');
            const form = document.getElementById('upload-form');
            new MutationObserver(function () {
              const seen = JSON.parse(sessionStorage.getItem('progress') || '[]');
              seen.push([bar.value, bar.max]);
              sessionStorage.setItem('progress', JSON.stringify(seen));
              sessionStorage.setItem('via', form.dataset.via || '');
            }).observe(bar, {attributes: true});
            new MutationObserver(function () {
              sessionStorage.setItem('via', form.dataset.via || '');
            }).observe(form, {attributes: true});""")

    def recorded(self, key):
        return self.driver.execute_script(f"return sessionStorage.getItem('{key}')")

    def row_of(self, name):
        """The list's row of an image, as {column name: text}."""
        for row in self.driver.find_elements("css selector", "table.images tbody tr"):
            cells = row.find_elements("css selector", "th, td")
            values = {cell.get_attribute("data-label"): cell.text for cell in cells}
            if values["Name"] == name:
                return values
        return None

    def session_cookie(self):
        return self.driver.get_cookie("imagestore_ui")


def api_upload(server, path, name, namespace=None):
    """Store an image through the JSON API (the pages under test come after)."""
    query = f"name={name}" + (f"&namespace={namespace}" if namespace else "")
    request = urllib.request.Request(f"{server.url}/images?{query}", data=path.read_bytes(),
                                     headers=server.headers, method="POST")
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return json.load(response)


def api_status(server, image_id):
    request = urllib.request.Request(f"{server.url}/images/{image_id}", headers=server.headers)
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def tus_served(server):
    """Whether this server speaks tus at /uploads (it comes with the tus branch)."""
    request = urllib.request.Request(f"{server.url}/uploads", method="OPTIONS")
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return "1.0.0" in response.headers.get("Tus-Version", "")
    except urllib.error.HTTPError:
        return False


@pytest.fixture
def image_file(tmp_path):
    """A real qcow2 of 64 MiB virtual size, made by qemu-img."""
    return make_qcow2(tmp_path / "alpine.qcow2", "64M")


# --- signing in and out --------------------------------------------------------------------

def test_a_person_signs_in_by_pasting_a_token_and_signs_out(person):
    person.go("/")
    assert person.path() == "/ui/"
    assert person.find("h1").text == "Public images"
    person.follow("header a[href='/ui/sign-in']")
    person.find("#token").send_keys(person.server.token_text)
    person.follow("form.stacked button[type=submit]")
    assert "Signed in as alice" in person.find("header").text
    assert person.find("h1").text == "Your images"
    assert person.session_cookie()["httpOnly"] and person.session_cookie()["sameSite"] == "Strict"
    person.follow("header form button")
    assert "Signed out." in person.text() and "Sign in" in person.find("header").text
    person.go("/ui/upload")
    assert person.path().startswith("/ui/sign-in")


def test_a_wrong_token_is_refused(person):
    person.go("/ui/sign-in")
    person.find("#token").send_keys("ims_not-a-token")
    person.follow("form.stacked button[type=submit]")
    assert person.find("#token-error").text == "That token is not valid."
    assert person.find("#token").get_attribute("aria-invalid") == "true"


def test_the_keyboard_alone_signs_in_and_shows_where_it_is(person):
    from selenium.webdriver.common.keys import Keys
    person.go("/ui/sign-in")
    body = person.find("body")
    body.send_keys(Keys.TAB)
    focused = person.driver.switch_to.active_element
    assert focused.text == "Skip to the content"
    assert focused.value_of_css_property("outline-style") != "none"
    person.find("#token").send_keys(person.server.token_text, Keys.ENTER)
    person.wait_for(lambda: "Signed in as" in person.text(), "the signed-in page")


# --- upload --------------------------------------------------------------------------------

def test_an_uploaded_qcow2_shows_its_progress_and_is_listed(person, image_file):
    person.sign_in()
    person.upload(image_file, "alpine-progress", "team")
    person.wait_for_path(r"/ui/images/\d+(\?stored=1)?")
    assert "Stored alpine-progress." in person.text()
    value, maximum = json.loads(person.recorded("progress"))[-1]
    assert value == maximum >= image_file.stat().st_size  # the form's body, or the file (tus)
    assert person.recorded("via") == ("tus" if tus_served(person.server) else "xhr")
    person.follow("header a[href='/ui/']")
    row = person.row_of("alpine-progress")
    assert row["Namespace"] == "team@alice" and row["Virtual size"] == "64.0 MiB"
    assert row["sha256"] == hashlib.sha256(image_file.read_bytes()).hexdigest()[:12]
    assert row["Size"].endswith("KiB") and row["Created"].endswith(" UTC")


def test_a_hostile_image_is_refused_with_its_reason(person, tmp_path):
    hostile = sample_images.with_backing(tmp_path, "/etc/passwd")
    person.sign_in()
    person.upload(hostile, "sneaky")
    error = person.find("#file-error")
    person.wait_for(error.is_displayed, "the file's error")
    assert "has a backing file" in error.text
    assert person.find("#upload-status").text.startswith("The image was not stored:")
    assert person.find("#file").get_attribute("aria-invalid") == "true"
    assert person.path() == "/ui/upload"
    person.go("/ui/")
    assert person.row_of("sneaky") is None


def test_the_upload_form_works_without_javascript(live, image_file, tmp_path):
    browser = chromium(javascript=False)
    try:
        person = Person(browser, live)
        person.sign_in()
        person.go("/ui/upload")
        person.find("#name").send_keys("plain-form")
        person.find("#file").send_keys(str(image_file))
        person.follow("#upload-button")
        assert "Stored plain-form." in person.text()
        assert not person.find("button[data-copy='line-pull']").is_displayed()
        person.upload(sample_images.with_backing(tmp_path, "/etc/passwd"), "plain-hostile",
                      new_page=True)
        assert "has a backing file" in person.find("#file-error").text
        assert "The image was not stored" in person.find("main .flash.error").text
    finally:
        browser.quit()


def test_without_tus_the_page_sends_the_form_in_one_request(person, image_file):
    person.sign_in()
    person.go("/ui/upload")
    person.driver.execute_script("window.tus.isSupported = false")  # as an old browser
    person.find("#name").send_keys("alpine-xhr")
    person.find("#file").send_keys(str(image_file))
    person.record_progress()
    person.find("#upload-button").click()
    person.wait_for_path(r"/ui/images/\d+")
    assert "Stored alpine-xhr." in person.text()
    assert person.recorded("via") == "xhr"
    value, maximum = json.loads(person.recorded("progress"))[-1]
    assert value == maximum > image_file.stat().st_size  # the whole multipart body


# The Upload-Offset of each PATCH the page sends, kept in sessionStorage.
RECORD_OFFSETS = """
    const setHeader = XMLHttpRequest.prototype.setRequestHeader;
    XMLHttpRequest.prototype.setRequestHeader = function (name, value) {
      if (name.toLowerCase() === 'upload-offset') {
        const sent = JSON.parse(sessionStorage.getItem('offsets') || '[]');
        sessionStorage.setItem('offsets', JSON.stringify([...sent, Number(value)]));
      }
      return setHeader.apply(this, arguments);
    };"""
CUT_AFTER_FIRST_PIECE = RECORD_OFFSETS + """
    // Once the first piece is in (204), no PATCH leaves the page (as if the network
    // went down) and the person leaves for another page.
    const open = XMLHttpRequest.prototype.open;
    const send = XMLHttpRequest.prototype.send;
    XMLHttpRequest.prototype.open = function (method) {
      this.isPatch = method === 'PATCH';
      if (this.isPatch) {
        this.addEventListener('load', () => {
          if (this.status === 204 && !sessionStorage.getItem('cut')) {
            sessionStorage.setItem('cut', this.getResponseHeader('Upload-Offset'));
            window.location.assign('/ui/');
          }
        });
      }
      return open.apply(this, arguments);
    };
    XMLHttpRequest.prototype.send = function () {
      if (this.isPatch && sessionStorage.getItem('cut')) {
        return undefined;
      }
      return send.apply(this, arguments);
    };"""


@pytest.fixture
def two_piece_image(tmp_path):
    """A real qcow2 of some 80 MiB of data: two of the upload script's 64 MiB pieces."""
    path = make_qcow2(tmp_path / "big.qcow2", "128M")
    return sample_images.write_data(path, (0, 80 << 20))


def test_a_cut_off_upload_resumes_through_tus_where_it_stopped(person, two_piece_image):
    if not tus_served(person.server):
        pytest.skip("no tus server at /uploads on this branch: the page sends the form "
                    "with XMLHttpRequest (test_without_tus_...) and cannot resume")
    person.sign_in()
    person.upload(two_piece_image, "alpine-tus", script=CUT_AFTER_FIRST_PIECE)
    person.wait_for_path("/ui/")
    cut = int(person.recorded("cut"))
    assert cut == 64 << 20 and json.loads(person.recorded("offsets")) == [0, cut]
    person.driver.execute_script("sessionStorage.removeItem('offsets')")
    # The same file, name and namespace again: the script finds the upload and goes on.
    person.upload(two_piece_image, "alpine-tus", script=RECORD_OFFSETS)
    person.wait_for_path(r"/ui/images/\d+\?stored=1")
    assert "Stored alpine-tus." in person.text()
    assert person.recorded("via") == "tus"
    assert json.loads(person.recorded("offsets")) == [cut]  # only the rest was sent
    image_id = int(person.path().split("/")[-1].split("?")[0])
    request = urllib.request.Request(f"{person.server.url}/images/{image_id}",
                                     headers=person.server.headers)
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        stored = json.load(response)
    assert stored["sha256"] == hashlib.sha256(two_piece_image.read_bytes()).hexdigest()


# --- an image's page -------------------------------------------------------------------------

def read_clipboard(person):
    """What the page copied, read back through the browser's own clipboard."""
    return person.driver.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], e => arguments[0]('error ' + e))")


def test_a_link_copied_from_the_page_opens_in_qemu_img_over_http(person, image_file):
    image = api_upload(person.server, image_file, "alpine-link")
    person.driver.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": person.server.url,
        "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    person.sign_in()
    person.go(f"/ui/images/{image['id']}")
    person.find("#expires_in option[value='86400']").click()
    person.follow("form[action$='/links'] button")
    assert "A link that works until" in person.find("#new-link").text
    button = person.find("button[data-copy='link-qemu-img']")
    button.click()
    person.wait_for(lambda: button.text == "Copied", "the copy button to say Copied")
    assert person.find("#copy-status").text.startswith("Copied: Look into it with qemu-img")
    line = read_clipboard(person)
    assert line == person.find("#link-qemu-img").text
    assert line.startswith("qemu-img info 'json:")
    info = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=WAIT,
                          check=True).stdout
    assert "file format: qcow2" in info and "virtual size: 64 MiB" in info


def test_the_page_shows_the_lines_to_fetch_and_boot_the_image(person, image_file):
    image = api_upload(person.server, image_file, "alpine-lines", "ci")
    person.sign_in()
    person.go(f"/ui/images/{image['id']}")
    assert person.find("#line-pull").text == "imagestore pull alpine-lines --namespace ci"
    assert image["url"] in person.find("#line-curl").text
    assert "snapshot=on" in person.find("#line-qemu").text
    assert image["sha256"] in person.text()
    assert all(b.is_displayed() for b in person.driver.find_elements("css selector",
                                                                     "button[data-copy]"))


def test_deleting_asks_first_then_the_image_is_gone(person, image_file):
    image = api_upload(person.server, image_file, "alpine-delete")
    person.sign_in()
    person.go(f"/ui/images/{image['id']}")
    person.follow("a.button.danger")
    assert person.find("h1").text == "Delete alpine-delete?"
    assert api_status(person.server, image["id"]) == 200
    person.follow("main form button.danger")
    assert "Deleted alpine-delete." in person.text() and person.path() == "/ui/"
    assert person.row_of("alpine-delete") is None
    assert api_status(person.server, image["id"]) == 404


# --- CSRF -------------------------------------------------------------------------------------

def test_a_form_sent_without_its_csrf_token_is_refused(person, image_file):
    image = api_upload(person.server, image_file, "alpine-csrf")
    person.sign_in()
    person.go(f"/ui/images/{image['id']}/delete")
    person.driver.execute_script(
        "document.querySelector('main form input[name=csrf_token]').remove()")
    person.follow("main form button.danger")
    assert person.find("h1").text.startswith("400: This form has expired")
    # The same POST sent by another program with the person's cookie, and no token.
    cookie = person.session_cookie()
    request = urllib.request.Request(
        f"{person.server.url}/ui/images/{image['id']}/delete", data=b"", method="POST",
        headers={"Cookie": f"{cookie['name']}={cookie['value']}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=WAIT)
    assert refused.value.code == 400
    assert refused.value.headers.get_content_type() == "text/html"
    assert api_status(person.server, image["id"]) == 200


# --- without signing in, and on a phone ---------------------------------------------------

def test_public_images_are_browsable_without_signing_in(person, image_file):
    person.server.flask("namespace", "create", "pub", "--owner", "alice",
                        "--visibility", "public")
    shown = api_upload(person.server, image_file, "alpine-public", "pub")
    hidden = api_upload(person.server, image_file, "alpine-private", "secret")
    person.go("/")
    assert person.row_of("alpine-public")["Namespace"] == "pub@alice"
    assert person.row_of("alpine-private") is None
    person.follow(f"table.images a[href='/ui/images/{shown['id']}']")
    assert person.find("h1").text == "alpine-public"
    assert "Authorization" not in person.find("#line-curl").text
    person.go(f"/ui/images/{hidden['id']}")
    assert person.find("h1").text == "404: There is no such page."


def test_the_pages_fit_a_phone_screen(person, image_file):
    image = api_upload(person.server, image_file, "alpine-phone")
    person.sign_in()
    person.driver.set_window_size(390, 844)
    try:
        for path in ["/ui/", f"/ui/images/{image['id']}", "/ui/upload"]:
            person.go(path)
            overflow = person.driver.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, path
    finally:
        person.driver.set_window_size(1280, 900)
