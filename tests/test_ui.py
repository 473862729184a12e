"""The web UI through Flask's test client: redirects, sign-in and its cookie, CSRF, the
Content-Security-Policy, escaping of stored values, and each page's rules. The same UI in
a real browser against a real gunicorn is test_ui_browser.py."""

import hashlib
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import sample_images
from conftest import ROOT, make_rows
from test_metrics import grown, scrape

from models import Image, Namespace, Token, User
from namespaces import ensure_namespace

UPLOADS = "imagestore_uploads_total"
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
HOSTILE = '<script>alert("x")</script>"><img src=x onerror=alert(1)>'


def csrf_of(response):
    """The CSRF token in a page's forms."""
    return re.search(r'name="csrf_token" value="([^"]+)"', response.text).group(1)


def sign_in(client, account):
    """Sign in as a person does, through the sign-in form; return a page's CSRF token."""
    token = csrf_of(client.get("/ui/sign-in"))
    response = client.post("/ui/sign-in", data={"token": account.token, "csrf_token": token})
    assert response.status_code == 303
    return csrf_of(client.get("/ui/sign-in"))


def public_namespace(account, path="pub", visibility="public"):
    return ensure_namespace(account.user, tuple(path.split("/")), visibility)


def post_form_upload(client, csrf, data, name="alpine", namespace="", **headers):
    """The upload form's POST, as the browser sends it without script."""
    return client.post("/ui/upload", content_type="multipart/form-data", headers=headers,
                       data={"csrf_token": csrf, "name": name, "namespace": namespace,
                             "file": (io.BytesIO(data), "alpine.qcow2")})


# --- / and the JSON API ------------------------------------------------------------------

def test_a_browser_asking_for_slash_is_sent_to_the_ui(client):
    response = client.get("/", headers=HTML)
    assert response.status_code == 302
    assert response.headers["Location"] == "/ui/"
    assert client.get("/ui", headers=HTML).headers["Location"].endswith("/ui/")


@pytest.mark.parametrize("method, headers", [
    ("GET", {}), ("GET", {"Accept": "*/*"}), ("GET", {"Accept": "application/json"}),
    ("GET", {"Accept": "application/json, text/html;q=0.5"}), ("POST", HTML),
    ("DELETE", HTML), ("OPTIONS", HTML)])
def test_anything_else_at_slash_is_the_api_404_as_before(client, method, headers):
    response = client.open("/", method=method, headers=headers)
    assert response.status_code == 404
    assert response.json == {"message": "Not Found"}


def test_the_session_cookie_does_not_reach_or_sign_in_the_api(client, alice):
    sign_in(client, alice)
    cookie = client.get_cookie("imagestore_ui", path="/ui")
    assert cookie is not None and cookie.path == "/ui"
    response = client.get("/images", headers={"Cookie": f"imagestore_ui={cookie.value}"})
    assert response.status_code == 401
    assert "Set-Cookie" not in response.headers and "Cookie" not in response.vary


def test_the_api_has_no_static_route_of_its_own(client):
    assert client.get("/static/ui.css").status_code == 404
    assert client.get("/ui/static/ui.css").status_code == 200


# --- Content-Security-Policy and what pages may hold ---------------------------------------

class _PageParts(HTMLParser):
    """The scripts, style attributes, style elements and event handlers of a page."""

    def __init__(self):
        super().__init__()
        self.inline = []

    def handle_starttag(self, tag, attrs):
        names = {name for name, _ in attrs}
        if (tag == "script" and "src" not in names) or tag == "style":
            self.inline.append(tag)
        self.inline += [f"{tag} {name}" for name in names if name == "style" or
                        name.startswith("on")]


def inline_parts(html):
    parser = _PageParts()
    parser.feed(html)
    return sorted(parser.inline)


def every_page(client, alice, qcow2_bytes):
    """One answer of each kind of UI page, signed in, with an image and a link."""
    csrf = sign_in(client, alice)
    assert post_form_upload(client, csrf, qcow2_bytes).status_code == 303
    image_id = Image.get().id
    return {
        "list": client.get("/ui/"), "public": client.get("/ui/public"),
        "image": client.get(f"/ui/images/{image_id}"),
        "link": client.post(f"/ui/images/{image_id}/links", data={"csrf_token": csrf}),
        "upload": client.get("/ui/upload"), "delete": client.get(f"/ui/images/{image_id}/delete"),
        "missing": client.get("/ui/images/999"), "unknown": client.get("/ui/no/such/page"),
        "refused": client.post(f"/ui/images/{image_id}/delete"),
        "stylesheet": client.get("/ui/static/ui.css"),
    }


def test_every_ui_answer_has_a_csp_that_allows_no_inline_script_or_style(
        client, alice, qcow2_bytes):
    for kind, response in every_page(client, alice, qcow2_bytes).items():
        csp = response.headers.get("Content-Security-Policy", "")
        assert "script-src 'self'" in csp and "style-src 'self'" in csp, kind
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, kind
        assert "unsafe" not in csp, kind
        assert response.headers["X-Content-Type-Options"] == "nosniff", kind


def test_no_page_holds_an_inline_script_style_or_event_handler(client, alice, qcow2_bytes):
    pages = every_page(client, alice, qcow2_bytes)
    del pages["stylesheet"]
    for kind, response in pages.items():
        assert response.mimetype == "text/html", kind
        assert inline_parts(response.text) == [], kind
    assert inline_parts('<p style="x" onclick="y"><script>z</script>') == [
        "p onclick", "p style", "script"]


def test_pages_that_depend_on_the_session_are_not_cached(client, alice):
    sign_in(client, alice)
    assert client.get("/ui/").headers["Cache-Control"] == "no-store"
    assert client.get("/ui/upload").headers["Cache-Control"] == "no-store"


# --- signing in and out ------------------------------------------------------------------

def set_cookie_of(response):
    return next(v for k, v in response.headers.items()
                if k == "Set-Cookie" and v.startswith("imagestore_ui="))


def sign_in_answer(client, account):
    token = csrf_of(client.get("/ui/sign-in"))
    return client.post("/ui/sign-in", data={"token": account.token, "csrf_token": token})


def test_signing_in_keeps_the_token_in_an_http_only_same_site_strict_cookie(client, alice):
    response = sign_in_answer(client, alice)
    assert response.status_code == 303 and response.headers["Location"] == "/ui/"
    cookie = set_cookie_of(response)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back
    page = client.get("/ui/")
    assert "Signed in as alice." in page.text and "Your images" in page.text


def test_the_cookie_is_secure_when_the_page_came_over_https(app, alice):
    client = app.test_client()
    token = csrf_of(client.get("/ui/sign-in", base_url="https://images.example"))
    response = client.post("/ui/sign-in", base_url="https://images.example",
                           data={"token": alice.token, "csrf_token": token})
    assert "; Secure" in set_cookie_of(response)


def test_the_cookie_is_secure_behind_an_https_public_url(make_app, make_account):
    app = make_app(PUBLIC_URL="https://images.example")
    account = make_account("carol")
    assert "; Secure" in set_cookie_of(sign_in_answer(app.test_client(), account))


def test_a_token_pasted_with_its_bearer_word_and_spaces_is_taken(client, alice):
    token = csrf_of(client.get("/ui/sign-in"))
    response = client.post("/ui/sign-in", data={"token": f"  Bearer {alice.token}\n",
                                                "csrf_token": token})
    assert response.status_code == 303


def test_a_wrong_token_is_refused_on_the_sign_in_page(client, alice):
    token = csrf_of(client.get("/ui/sign-in"))
    response = client.post("/ui/sign-in", data={"token": alice.token + "x", "csrf_token": token})
    assert response.status_code == 400
    assert "That token is not valid." in response.text
    assert "Signed in as" not in client.get("/ui/").text


def test_a_revoked_token_signs_the_browser_out(client, alice):
    sign_in(client, alice)
    Token.delete().execute()
    page = client.get("/ui/")
    assert "Your token no longer works: sign in again." in page.text
    assert "Public images" in page.text and "Signed in as" not in page.text


def test_signing_out_forgets_the_token(client, alice):
    csrf = sign_in(client, alice)
    response = client.post("/ui/sign-out", data={"csrf_token": csrf})
    assert response.status_code == 303
    assert "Signed out." in client.get("/ui/").text
    assert client.get("/ui/upload").headers["Location"].startswith("/ui/sign-in")


def test_signing_in_goes_back_to_the_page_asked_for_but_never_elsewhere(client, alice):
    token = csrf_of(client.get("/ui/sign-in"))
    for target, landing in [("/ui/upload", "/ui/upload"), ("https://evil.example/", "/ui/"),
                            ("//evil.example/ui/", "/ui/"), ("/ui//evil.example", "/ui/")]:
        response = client.post("/ui/sign-in", data={"token": alice.token, "csrf_token": token,
                                                    "next": target})
        assert response.headers["Location"] == landing, target
        token = csrf_of(client.get("/ui/sign-in"))


# --- CSRF ----------------------------------------------------------------------------------

def test_every_form_post_without_the_sessions_csrf_token_is_refused(client, alice, qcow2_bytes):
    csrf = sign_in(client, alice)
    assert post_form_upload(client, csrf, qcow2_bytes).status_code == 303
    image_id = Image.get().id
    for path in ["/ui/sign-in", "/ui/sign-out", "/ui/upload", f"/ui/images/{image_id}/links",
                 f"/ui/images/{image_id}/delete"]:
        for sent in [{}, {"csrf_token": ""}, {"csrf_token": csrf[:-1]}]:
            response = client.post(path, data=sent)
            assert response.status_code == 400, (path, sent)
            assert "This form has expired or did not come from this site" in response.text
    assert Image.select().count() == 1
    assert "Signed in as" in client.get("/ui/").text


def test_a_post_from_a_browser_without_a_session_is_refused(client, alice):
    response = client.post("/ui/sign-in", data={"token": alice.token, "csrf_token": "guess"})
    assert response.status_code == 400
    assert "Set-Cookie" not in response.headers or "token" not in response.headers["Set-Cookie"]


def test_a_csrf_token_of_another_session_is_refused(app, alice):
    first, second = app.test_client(), app.test_client()
    csrf = sign_in(first, alice)
    sign_in(second, alice)
    assert second.post("/ui/sign-out", data={"csrf_token": csrf}).status_code == 400


# --- stored values cannot inject ---------------------------------------------------------

def test_a_hostile_description_user_name_and_image_name_are_shown_as_text(
        client, make_account):
    mallory = make_account("mallory")
    User.update(username=f"m{HOSTILE}", email=f"{HOSTILE}@x").where(
        User.id == mallory.user.id).execute()
    namespace = public_namespace(mallory)
    Namespace.update(description=HOSTILE).where(Namespace.id == namespace.id).execute()
    make_rows(mallory, 1, prefix=HOSTILE)
    Image.update(namespace=namespace).execute()
    image_id = Image.get().id
    sign_in(client, mallory)
    for path in ["/ui/", "/ui/public", f"/ui/images/{image_id}",
                 f"/ui/images/{image_id}/delete", f"/ui/?search={HOSTILE}"]:
        page = client.get(path).text
        assert "<script>alert" not in page and "<img src=x" not in page, path
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&#34;&gt;&lt;img" in page, path
        assert inline_parts(page) == [], path


# --- lists ----------------------------------------------------------------------------------

def test_a_visitor_sees_public_images_and_nothing_else(client, alice, bob):
    make_rows(alice, 1, prefix="open")
    make_rows(alice, 1, prefix="internal")
    make_rows(alice, 1, prefix="private")
    make_rows(alice, 1, prefix="personal")
    for prefix, visibility in [("open", "public"), ("internal", "internal"),
                               ("private", "private")]:
        namespace = public_namespace(alice, prefix, visibility)
        Image.update(namespace=namespace).where(Image.name == f"{prefix}0").execute()
    ids = {image.name: image.id for image in Image.select()}
    for path in ["/ui/", "/ui/public"]:
        page = client.get(path).text
        assert "open0" in page and "Public images" in page, path
        assert "internal0" not in page and "private0" not in page and "personal0" not in page
    assert client.get(f"/ui/images/{ids['open0']}").status_code == 200
    for name in ["internal0", "private0", "personal0"]:
        response = client.get(f"/ui/images/{ids[name]}")
        assert response.status_code == 404 and response.mimetype == "text/html", name
        assert "There is no such page." in response.text


def test_a_public_image_of_a_child_namespace_is_public_too(client, alice):
    make_rows(alice, 1, prefix="child")
    Image.update(namespace=public_namespace(alice, "pub/child/deep")).execute()
    assert "child0" in client.get("/ui/public").text


def test_the_signed_in_list_is_the_apis_with_search_and_pages(client, alice, bob):
    make_rows(alice, 30)
    make_rows(bob, 1, prefix="bobs")
    sign_in(client, alice)
    first = client.get("/ui/").text
    assert first.count('data-label="Name"') == 25
    assert ">img29<" in first and ">img5<" in first
    assert ">img4<" not in first and "bobs0" not in first
    assert 'rel="next" href="/ui/?page=2"' in first and 'rel="prev"' not in first
    second = client.get("/ui/?page=2").text
    assert second.count('data-label="Name"') == 5 and 'rel="prev" href="/ui/"' in second
    found = client.get("/ui/?search=IMG2").text
    assert found.count('data-label="Name"') == 11  # img2, img20..img29
    assert "whose name contains “IMG2”" in found
    assert "No image name contains “nothing”." in client.get("/ui/?search=nothing").text


def test_a_row_shows_the_images_sizes_namespace_time_and_short_sha(client, alice, qcow2_bytes):
    csrf = sign_in(client, alice)
    post_form_upload(client, csrf, qcow2_bytes, namespace="team")
    page = client.get("/ui/").text
    sha = hashlib.sha256(qcow2_bytes).hexdigest()
    assert f"<code title=\"{sha}\">{sha[:12]}</code>" in page
    assert "team@alice" in page and "64.0 MiB" in page
    moment = r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d):\d\dZ"
    assert re.search(f'<time datetime="{moment}">\\1 \\2 UTC</time>', page)


# --- upload -------------------------------------------------------------------------------

def test_the_plain_form_upload_stores_the_image_as_the_api_does(client, alice, qcow2_bytes):
    csrf = sign_in(client, alice)
    response = post_form_upload(client, csrf, qcow2_bytes, namespace="team/base")
    image = Image.get()
    assert response.status_code == 303
    assert response.headers["Location"] == f"/ui/images/{image.id}"
    assert "Stored alpine." in client.get(response.headers["Location"]).text
    stored = client.get(f"/images/{image.id}", headers=alice.headers).json
    assert stored["sha256"] == hashlib.sha256(qcow2_bytes).hexdigest()
    assert stored["namespace"]["path"] == "team/base" and stored["virtual_size"] == 64 << 20


def test_a_hostile_image_is_refused_with_its_reason_and_nothing_kept(
        client, alice, tmp_path, store_files):
    hostile = sample_images.with_backing(tmp_path, "/etc/passwd").read_bytes()
    csrf = sign_in(client, alice)
    before = scrape(client)
    response = post_form_upload(client, csrf, hostile, name="sneaky", namespace="new")
    assert response.status_code == 400
    assert grown(before, scrape(client))[UPLOADS, (("outcome", "backing_file"),)] == 1
    assert re.search(r'id="file-error">[^<]*has a backing file', response.text)
    assert 'value="sneaky"' in response.text and 'value="new"' in response.text
    assert Image.select().count() == 0 and Namespace.select().count() == 0
    assert [f for f in store_files() if not f.startswith(".")] == []


@pytest.mark.parametrize("name, namespace, field, message", [
    ("", "", "name", "Name field required"),
    ("bad name", "", "name", "Name must be 1 to 64"),
    ("ok", "a//b", "namespace", "Namespace path segments must match"),
    ("ok", "x@bob", "namespace", "Namespace permission denied"),
])
def test_a_bad_name_or_namespace_is_shown_beside_its_field(
        client, alice, bob, qcow2_bytes, name, namespace, field, message):
    csrf = sign_in(client, alice)
    response = post_form_upload(client, csrf, qcow2_bytes, name=name, namespace=namespace)
    assert response.status_code == 400
    assert re.search(f'id="{field}-error">[^<]*{re.escape(message)}', response.text)


def test_a_taken_name_and_a_missing_file_are_refused(client, alice, qcow2_bytes):
    csrf = sign_in(client, alice)
    before = scrape(client)
    post_form_upload(client, csrf, qcow2_bytes)
    response = post_form_upload(client, csrf, qcow2_bytes)
    assert response.status_code == 400 and "Name already exists" in response.text
    response = client.post("/ui/upload", content_type="multipart/form-data",
                           data={"csrf_token": csrf, "name": "other"})
    assert response.status_code == 400 and "Choose a QCOW2 image file" in response.text
    uploads = {key[1][0][1]: value for key, value in grown(before, scrape(client)).items()
               if key[0] == UPLOADS}
    assert uploads == {"stored": 1, "name_taken": 1, "no_file": 1}


def test_the_upload_script_gets_json_answers(client, alice, qcow2_bytes, tmp_path):
    csrf = sign_in(client, alice)
    json = {"Accept": "application/json"}
    response = post_form_upload(client, csrf, qcow2_bytes, **json)
    assert response.status_code == 201
    assert response.json == {"location": f"/ui/images/{Image.get().id}"}
    hostile = sample_images.with_backing(tmp_path, "/etc/passwd").read_bytes()
    response = post_form_upload(client, csrf, hostile, name="other", **json)
    assert response.status_code == 400 and "has a backing file" in response.json["file"][0]


def test_the_upload_page_needs_a_token_that_may_write(client, make_account, qcow2_bytes):
    assert client.get("/ui/upload").headers["Location"] == "/ui/sign-in?next=/ui/upload"
    csrf = sign_in(client, make_account("reader", "image:read"))
    assert client.get("/ui/upload").status_code == 403
    response = post_form_upload(client, csrf, qcow2_bytes)
    assert response.status_code == 403 and "lacks the image:write scope" in response.text
    assert "WWW-Authenticate" not in response.headers
    assert Image.select().count() == 0


def test_the_upload_page_hands_the_token_to_its_tus_script_only(client, alice):
    sign_in(client, alice)
    assert f'data-token="{alice.token}"' in client.get("/ui/upload").text
    assert alice.token not in client.get("/ui/").text


# --- one image: its page, links, delete --------------------------------------------------

def test_the_image_page_shows_every_field_and_the_lines_to_fetch_it(client, alice, qcow2_bytes):
    csrf = sign_in(client, alice)
    post_form_upload(client, csrf, qcow2_bytes, namespace="team")
    image = client.get(f"/images/{Image.get().id}", headers=alice.headers).json
    page = client.get(f"/ui/images/{image['id']}").text
    for value in [image["name"], image["sha256"], str(image["size"]), str(image["virtual_size"]),
                  image["url"], image["user"]["email"], "team@alice"]:
        assert value in page, value
    assert ("curl -fL -H &#34;Authorization: Bearer $IMAGESTORE_TOKEN&#34; -H &#39;Accept: "
            f"application/octet-stream&#39; -o alpine.qcow2 {image['url']}") in page
    assert ">imagestore pull alpine --namespace team</code>" in page
    assert "qemu-system-x86_64 -m 1G -drive file=&#34;$(imagestore pull alpine --namespace " \
           "team)&#34;,if=virtio,snapshot=on" in page
    assert 'data-copy="line-pull"' in page


def test_a_public_image_is_named_with_its_owner_and_fetched_without_a_token(client, alice):
    make_rows(alice, 1, prefix="open")
    Image.update(namespace=public_namespace(alice)).execute()
    page = client.get(f"/ui/images/{Image.get().id}").text
    assert ">imagestore pull open0 --namespace pub@alice</code>" in page
    assert "Authorization" not in page and "Make a link" not in page


def test_a_link_made_on_the_page_serves_the_file(client, alice, qcow2_bytes):
    csrf = sign_in(client, alice)
    post_form_upload(client, csrf, qcow2_bytes)
    image_id = Image.get().id
    page = client.post(f"/ui/images/{image_id}/links",
                       data={"csrf_token": csrf, "expires_in": "86400"}).text
    url = re.search(r'<code id="link-url">(http://localhost(/links/[^<]+))</code>', page)
    assert url, page
    assert client.get(url.group(2)).data == qcow2_bytes
    assert "qemu-img info &#39;json:{&#34;driver&#34;:&#34;qcow2&#34;" in page
    assert f"file.url={url.group(1)}" in page


def test_a_link_with_a_bad_expiry_says_why(client, alice, qcow2_bytes):
    csrf = sign_in(client, alice)
    post_form_upload(client, csrf, qcow2_bytes)
    response = client.post(f"/ui/images/{Image.get().id}/links",
                           data={"csrf_token": csrf, "expires_in": "99999999"})
    assert response.status_code == 400 and "whole number of seconds" in response.text


def test_deleting_asks_first_then_removes_the_image(client, alice, qcow2_bytes):
    csrf = sign_in(client, alice)
    post_form_upload(client, csrf, qcow2_bytes)
    image_id = Image.get().id
    assert f'href="/ui/images/{image_id}/delete"' in client.get(f"/ui/images/{image_id}").text
    confirm = client.get(f"/ui/images/{image_id}/delete")
    assert "This cannot be undone." in confirm.text and Image.select().count() == 1
    response = client.post(f"/ui/images/{image_id}/delete", data={"csrf_token": csrf})
    assert response.status_code == 303 and response.headers["Location"] == "/ui/"
    assert "Deleted alpine." in client.get("/ui/").text
    assert client.get(f"/images/{image_id}", headers=alice.headers).status_code == 404


def test_someone_elses_image_cannot_be_seen_or_deleted(client, alice, bob):
    make_rows(bob, 1, prefix="bobs")
    image_id = Image.get().id
    csrf = sign_in(client, alice)
    assert client.get(f"/ui/images/{image_id}").status_code == 404
    assert client.get(f"/ui/images/{image_id}/delete").status_code == 404
    assert client.post(f"/ui/images/{image_id}/delete",
                       data={"csrf_token": csrf}).status_code == 404
    assert Image.select().count() == 1


def test_a_reader_of_a_public_image_gets_no_delete_button(client, alice, bob):
    make_rows(bob, 1, prefix="open")
    Image.update(namespace=public_namespace(bob)).execute()
    sign_in(client, alice)
    page = client.get(f"/ui/images/{Image.get().id}").text
    assert "open0" in page and "Delete this image" not in page


def test_an_unknown_ui_page_is_an_html_404(client):
    response = client.get("/ui/nothing/here")
    assert response.status_code == 404 and response.mimetype == "text/html"
    assert "404: There is no such page." in response.text


# --- the vendored tus client ---------------------------------------------------------------

def test_the_vendored_tus_client_is_the_published_file():
    vendor = ROOT / "static" / "vendor"
    listed = re.search(r"this file, sha256 \| `([0-9a-f]{64})`",
                       (vendor / "README.md").read_text()).group(1)
    script = Path(vendor / "tus-js-client-4.3.1.min.js").read_bytes()
    assert hashlib.sha256(script).hexdigest() == listed
    assert "tus-js-client-4.3.1.min.js" in (ROOT / "templates" / "upload.html").read_text()
    assert "MIT License" in (vendor / "tus-js-client-LICENSE").read_text()
