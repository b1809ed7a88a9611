"""Every HTML page the server serves loads only the server's own files: nothing reaches outside the walls, and the
pages work without internet."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from bs4 import BeautifulSoup
from starlette.routing import Route

pytestmark = pytest.mark.slow

URL = re.compile(r"""https?://[^\s"'`<>)]+""")


def html_pages(app) -> list[str]:
    """The paths of the app's GET routes without parameters that answer with HTML (walked, not listed by hand)."""
    return [r.path for r in app.routes if isinstance(r, Route) and "GET" in (r.methods or ()) and "{" not in r.path]


def references(html: str) -> set[str]:
    """Every URL the page names: src/href attributes, and URLs written in its inline scripts and styles."""
    soup = BeautifulSoup(html, "html.parser")
    found = {tag.get(attr) for attr in ("src", "href") for tag in soup.find_all(attrs={attr: True})}
    found |= set(URL.findall(html))
    return {u for u in found if u}


def test_every_html_page_loads_only_the_servers_own_files(tiny_live):
    own = urlsplit(tiny_live.url).netloc
    checked = []
    for path in html_pages(tiny_live.app):
        r = httpx.get(tiny_live.url + path)
        if r.status_code != 200 or not r.headers.get("content-type", "").startswith("text/html"):
            continue
        checked.append(path)
        for ref in references(r.text):
            url = urljoin(tiny_live.url + path, ref)
            parts = urlsplit(url)
            assert parts.scheme in ("http", "https") and parts.netloc == own, f"{path} loads {ref} from outside"
            asset = httpx.get(url)
            assert asset.status_code == 200 and asset.content, f"{path}: {ref} answers {asset.status_code}"
    assert {"/docs", "/redoc"} <= set(checked), checked


def test_the_docs_pages_name_the_api_document(tiny_live):
    for path in ("/docs", "/redoc"):
        assert "/openapi.json" in httpx.get(tiny_live.url + path).text
    assert httpx.get(tiny_live.url + "/openapi.json").json()["info"]["title"] == "fourwalls"
