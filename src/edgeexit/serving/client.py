"""HTTP client of the cloud server: one keep-alive connection, timeouts, retries with exponential backoff.

Connect errors, timeouts, broken connections and 5xx answers are retried (`retries` times, waiting
`backoff * 2**attempt` seconds before each retry): finishing an inference is idempotent, so sending a body
twice is harmless. A 4xx answer (409 model mismatch, 422 wrong tensor, 401 token...) is something a retry
cannot fix: it raises `OffloadFailed` at once with the server's detail.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from edgeexit.errors import EdgeExitError, UserError
from edgeexit.serving.http import resolve_token

__all__ = ["CloudAnswer", "CloudClient", "OffloadFailed"]

log = logging.getLogger(__name__)


class OffloadFailed(EdgeExitError):
    """The cloud gave no answer: retries exhausted, or a 4xx the edge cannot fix; the message says why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of the last answer, None when none came


@dataclass
class CloudAnswer:
    """The cloud's classification of one offloaded tensor or image."""

    label: int
    class_name: str
    confidence: float
    server_ms: float
    request_id: str


def _detail(r: httpx.Response) -> str:
    """The server's one-line {"detail": ...}, or the start of whatever it sent."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:200].strip() or r.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return body["detail"]
    return str(body)[:200]


def _answer(r: httpx.Response) -> CloudAnswer:
    try:
        body = r.json()
        return CloudAnswer(
            label=int(body["label"]),
            class_name=str(body["class_name"]),
            confidence=float(body["confidence"]),
            server_ms=float(body["server_ms"]),
            request_id=str(body["request_id"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise OffloadFailed(
            f"cloud answered HTTP {r.status_code} with an unexpected body ({type(exc).__name__}: {str(exc)[:80]}); "
            "expected a single-sample answer {label, class_name, confidence, server_ms, request_id}",
            r.status_code,
        ) from None


class CloudClient:
    """Client of one cloud server; safe to share between threads (httpx.Client is)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.05,
    ) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise UserError(f"retries must be an integer >= 0, got {retries!r}")
        if not (timeout > 0 and backoff >= 0):
            raise UserError(f"timeout must be > 0 and backoff >= 0 seconds, got {timeout!r} and {backoff!r}")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise UserError(f"cloud URL {base_url!r}; expected http://host:port or https://host:port")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        token = resolve_token(token)  # None: $EDGEEXIT_TOKEN, the variable the cloud server reads too
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout), headers=headers)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise UserError(
                f"cloud URL {base_url!r} is not valid ({exc}); expected http://host:port"
            ) from None

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request with retries; a 2xx response, or OffloadFailed."""
        last = ""
        status: int | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # connect/read/write errors, timeouts, broken connections
                last, status = f"{type(exc).__name__}: {str(exc)[:120] or 'no detail'}", None
                log.debug("%s %s attempt %d failed: %s", method, path, attempt + 1, last)
                continue
            except httpx.HTTPError as exc:  # e.g. an invalid URL: nothing a retry fixes
                raise OffloadFailed(f"cannot send {method} {path} to {self.base_url} ({exc})") from None
            if r.status_code < 400:
                return r
            status = r.status_code
            if r.status_code < 500:
                raise OffloadFailed(f"cloud answered HTTP {r.status_code}: {_detail(r)}", r.status_code)
            last = f"HTTP {r.status_code}: {_detail(r)}"
            log.debug("%s %s attempt %d answered %s", method, path, attempt + 1, last)
        raise OffloadFailed(
            f"no answer from {self.base_url}{path} after {self.retries + 1} attempts (last: {last})", status
        )

    def offload(self, body: bytes, request_id: str) -> CloudAnswer:
        """POST a `wire.encode_payload` body to /v1/offload; the cloud's answer for its one sample."""
        r = self._request(
            "POST",
            "/v1/offload",
            content=body,
            headers={"Content-Type": "application/octet-stream", "X-Request-ID": request_id},
        )
        return _answer(r)

    def classify(self, image: bytes, content_type: str) -> CloudAnswer:
        """POST image bytes (image/png or image/jpeg) to /v1/classify: the conventional DNN's answer."""
        return _answer(
            self._request("POST", "/v1/classify", content=image, headers={"Content-Type": content_type})
        )

    def model_info(self) -> dict:
        """GET /v1/model: the cloud's specs, hashes, accepted k and tensor shapes."""
        r = self._request("GET", "/v1/model")
        try:
            return r.json()
        except ValueError:
            raise OffloadFailed(
                f"cloud /v1/model answered non-JSON: {r.text[:80]!r}", r.status_code
            ) from None

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CloudClient({self.base_url!r}, retries={self.retries}, backoff={self.backoff})"
