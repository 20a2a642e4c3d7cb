"""API docs that work offline: GET /docs (Swagger UI) and GET /redoc (ReDoc) with their JavaScript, CSS and
favicon served by the app itself, not by a CDN.

FastAPI's default docs pages load their assets from cdn.jsdelivr.net, so on a machine without internet they
are blank. Here the assets come from the `fastapi-offline` wheel (MIT; it ships Swagger UI 5's
swagger-ui-bundle.js and swagger-ui.css, ReDoc's redoc.standalone.js and a favicon); only its asset directory
is used, and the routes follow FastAPI's "Custom Docs UI Static Assets (Self-Hosting)" recipe. The app must be
created with `docs_url=None, redoc_url=None`; then `install_docs(app)` adds the pages and mounts the assets at
ASSETS_URL. None of these routes takes a token.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import fastapi
from fastapi import Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from edgeexit.errors import EdgeExitError

__all__ = ["ASSETS_PACKAGE", "ASSETS_URL", "ASSET_FILES", "DocsAssetsMissing", "asset_dir", "install_docs"]

ASSETS_PACKAGE = "fastapi_offline"  # the import name of the `fastapi-offline` distribution
ASSETS_URL = "/docs-assets"
# The files the pages reference; asset_dir() checks that each is there.
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


class DocsAssetsMissing(EdgeExitError):
    """The Swagger UI / ReDoc files the docs pages need are not installed."""


def asset_dir() -> Path:
    """The directory holding ASSET_FILES (`<fastapi_offline>/static`); DocsAssetsMissing if it or a file is
    missing. Found without importing the package (its import would only build an unused FastAPI helper)."""
    spec = importlib.util.find_spec(ASSETS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DocsAssetsMissing(
            f"the API docs' assets are missing: package {ASSETS_PACKAGE!r} is not installed; "
            "expected it as a dependency of edgeexit (pip install fastapi-offline)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    missing = [name for name in ASSET_FILES if not (folder / name).is_file()]
    if missing:
        raise DocsAssetsMissing(
            f"the API docs' assets are missing: {', '.join(missing)} not found in {folder}; "
            "expected the files shipped by fastapi-offline (reinstall it: pip install --force-reinstall "
            "fastapi-offline)"
        )
    return folder


def install_docs(app: fastapi.FastAPI, assets: Path | None = None) -> None:
    """Add GET /docs, GET /docs/oauth2-redirect and GET /redoc to `app`, all served from `assets` (default:
    asset_dir()) mounted at ASSETS_URL. `app` must have been created with docs_url=None and redoc_url=None.
    URLs are prefixed with the request's root_path, as FastAPI's own docs pages do behind a proxy."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("install_docs needs an app created with docs_url=None and redoc_url=None")
    folder = asset_dir() if assets is None else assets
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"
    app.mount(ASSETS_URL, StaticFiles(directory=folder), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        """Swagger UI for this app's OpenAPI document."""
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + oauth2_redirect_url,
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        """Swagger UI's OAuth2 redirect helper (kept as FastAPI's default docs have it)."""
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        """ReDoc for this app's OpenAPI document; no Google Fonts (they too would need the internet)."""
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
