"""The API docs work offline: /docs (Swagger UI) and /redoc (ReDoc) reference only assets the server itself
serves (from the fastapi-offline wheel), never a CDN; they and /openapi.json stay open with a token set.

Whether the page really renders is checked by hand in headless Chromium (see serving.docs); CI needs no
browser.
"""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser

import fastapi
import httpx
import pytest

from edgeexit.serving import docs
from edgeexit.serving.docs import DocsAssetsMissing
from edgeexit.serving.http import new_app
from edgeexit.serving.server import start_server

pytestmark = pytest.mark.slow  # starts real servers

TOKEN = "s3cret"
DOC_PAGES = ("/docs", "/redoc")
# What each referenced asset must be served as, and its least plausible size (the real files are far larger).
EXPECTED = {
    ".js": ("text/javascript", 100_000),
    ".css": ("text/css", 10_000),
    ".png": ("image/png", 100),
}


class _Refs(HTMLParser):
    """Collects the URLs a page loads: <script src>, <link href>, <img src>."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.urls.append(value)


def _refs(html: str) -> list[str]:
    parser = _Refs()
    parser.feed(html)
    return parser.urls


def _app(token: str | None) -> fastapi.FastAPI:
    app, api = new_app("t", None, token)

    @api.get("/v1/secret")
    async def secret() -> dict[str, str]:
        return {"ok": "yes"}

    app.include_router(api)
    return app


@pytest.fixture(scope="module", params=[None, TOKEN], ids=["open", "token"])
def token(request: pytest.FixtureRequest) -> str | None:
    """Every test runs against a server without and with a bearer token."""
    return request.param


@pytest.fixture(scope="module")
def http(token: str | None) -> Iterator[httpx.Client]:
    """A real server from new_app with bearer token `token`, and a client that sends no token."""
    with start_server(_app(token)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        yield c


@pytest.mark.parametrize("page", DOC_PAGES)
def test_doc_pages_reference_only_local_assets(http: httpx.Client, page: str) -> None:
    r = http.get(page)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    urls = _refs(html)
    assert any(u.endswith(".js") for u in urls), urls
    for url in urls:
        # Same-origin paths only: no scheme, no protocol-relative //host.
        assert url.startswith("/") and not url.startswith("//"), url
    lowered = html.lower()
    for remote in ("http://", "https://", "cdn", "unpkg", "jsdelivr", "fonts.googleapis"):
        assert remote not in lowered, f"{page} mentions {remote!r}"
    assert "/openapi.json" in html


def test_swagger_page_loads_the_bundle_and_css(http: httpx.Client) -> None:
    urls = _refs(http.get("/docs").text)
    names = {u.rsplit("/", 1)[-1] for u in urls}
    assert {"swagger-ui-bundle.js", "swagger-ui.css"} <= names, urls


@pytest.mark.parametrize("page", DOC_PAGES)
def test_every_referenced_asset_is_served(http: httpx.Client, page: str) -> None:
    urls = _refs(http.get(page).text)
    assert urls
    for url in urls:
        r = http.get(url)
        assert r.status_code == 200, (url, r.status_code)
        ext = url[url.rfind(".") :]
        content_type, least = EXPECTED[ext]
        assert r.headers["content-type"].split(";")[0].strip() == content_type, (url, r.headers)
        assert len(r.content) >= least, (url, len(r.content))


def test_openapi_json_still_works(http: httpx.Client) -> None:
    r = http.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] == "t"
    assert "/v1/secret" in doc["paths"]
    assert "/healthz" in doc["paths"]
    # The docs' own routes are not API routes.
    assert not any(p.startswith(("/docs", "/redoc")) for p in doc["paths"])


def test_oauth2_redirect_helper_is_served(http: httpx.Client) -> None:
    r = http.get("/docs/oauth2-redirect")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")


def test_docs_stay_open_while_the_api_needs_the_token(http: httpx.Client, token: str | None) -> None:
    for path in (*DOC_PAGES, "/openapi.json", "/healthz", "/docs/oauth2-redirect"):
        assert http.get(path).status_code == 200, path
    for url in _refs(http.get("/docs").text):
        assert http.get(url).status_code == 200, url
    secret = http.get("/v1/secret")
    if token is None:
        assert secret.status_code == 200
    else:
        assert secret.status_code == 401
        authed = http.get("/v1/secret", headers={"Authorization": f"Bearer {token}"})
        assert authed.status_code == 200


def test_missing_assets_package_fails_at_app_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docs, "ASSETS_PACKAGE", "edgeexit_no_such_package")
    with pytest.raises(DocsAssetsMissing, match="not installed.*pip install fastapi-offline"):
        new_app("t", None, None)


def test_missing_asset_file_fails_at_app_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docs, "ASSET_FILES", (*docs.ASSET_FILES, "no-such-file.js"))
    with pytest.raises(DocsAssetsMissing, match="no-such-file.js not found in"):
        new_app("t", None, None)
