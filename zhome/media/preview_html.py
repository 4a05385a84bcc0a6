"""Reading a preview out of an HTML page: pure functions, no I/O.

Spec: client-server-api "Content repository", ``GET /media/preview_url``:
the answer is the page's OpenGraph data (https://ogp.me/), ``og:image``
later replaced by an ``mxc://`` URI. A page without OpenGraph tags still
gets a title and description from ``<title>`` and
``<meta name="description">``.

The bytes are decoded by, in order: a byte order mark, the charset of the
Content-Type header, a ``<meta charset>`` (or ``http-equiv``) near the top,
else UTF-8; undecodable bytes become U+FFFD. The standard library's
``html.parser`` is forgiving of malformed markup; script and style content
is never mistaken for tags.
"""

from __future__ import annotations

import codecs
import re
from html.parser import HTMLParser
from typing import Any, Optional
from urllib.parse import urljoin, urlsplit

# The OpenGraph properties a preview carries; the rest of a page's tags are
# dropped (a preview is a summary, not a copy of the page's metadata).
TEXT_PROPERTIES = ("og:title", "og:description", "og:type", "og:site_name", "og:image:type", "og:locale")
INT_PROPERTIES = ("og:image:width", "og:image:height")
# Where the image may be named, best first.
IMAGE_PROPERTIES = ("og:image", "og:image:url", "og:image:secure_url")
MAX_TITLE = 500
MAX_TEXT = 2000
MAX_URL = 4096
# The charset declaration must be near the top (the HTML spec looks at 1024
# bytes; a little more forgives long comments before it).
META_SCAN_BYTES = 4096

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def charset_of_content_type(content_type: Optional[str]) -> Optional[str]:
    """The ``charset`` parameter of a Content-Type value, if any."""
    if not content_type:
        return None
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip("\"'") or None
    return None


def _known_codec(name: Optional[str]) -> Optional[str]:
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def decode_html(body: bytes, content_type: Optional[str]) -> str:
    for bom, bom_codec in _BOMS:
        if body.startswith(bom):
            return body[len(bom):].decode(bom_codec, "replace")
    codec = _known_codec(charset_of_content_type(content_type))
    if codec is None:
        m = _META_CHARSET.search(body[:META_SCAN_BYTES])
        codec = _known_codec(m.group(1).decode("ascii")) if m else None
    # A page that says UTF-16 in ASCII bytes is not UTF-16 (HTML spec).
    if codec is None or codec.startswith("utf-16"):
        codec = "utf-8"
    return body.decode(codec, "replace")


def _clean(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text[:limit]


class _PreviewParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.properties: dict[str, str] = {}
        self.description: Optional[str] = None
        self.base: Optional[str] = None
        self.title_parts: list[str] = []
        self.title_done = False
        self._in_title = False
        # <title> inside <svg> is an SVG element's name, not the page's.
        self._svg_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        values = {k.lower(): (v or "") for k, v in attrs}
        if tag == "svg":
            self._svg_depth += 1
        elif tag == "title" and not self.title_done and self._svg_depth == 0:
            self._in_title = True
        elif tag == "meta":
            self._meta(values)
        elif tag == "base" and self.base is None and values.get("href"):
            self.base = values["href"].strip()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        # <svg/> opens nothing.
        if tag != "svg":
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg" and self._svg_depth > 0:
            self._svg_depth -= 1
        elif tag == "title" and self._in_title:
            self._in_title = False
            self.title_done = True

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)

    def _meta(self, values: dict[str, str]) -> None:
        content = values.get("content")
        if content is None:
            return
        # OpenGraph says property=; many pages write name= instead.
        key = (values.get("property") or values.get("name") or "").strip().lower()
        if key.startswith("og:"):
            # The first of a repeated property is the preferred one (ogp.me "Arrays").
            self.properties.setdefault(key, content)
        elif key == "description" and self.description is None:
            self.description = content


def _absolute_http_url(value: str, base: str) -> Optional[str]:
    value = value.strip()
    if not value or len(value) > MAX_URL:
        return None
    try:
        url = urljoin(base, value)
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return url


def _int(value: str) -> Optional[int]:
    value = value.strip()
    if not value.isdigit() or len(value) > 6:
        return None
    return int(value)


def parse_preview(html: str, page_url: str) -> tuple[dict[str, Any], Optional[str]]:
    """The preview's properties, and the absolute http(s) URL of its image.

    The image URL is resolved against the page's ``<base href>`` if any,
    else against ``page_url`` (the URL the page was finally fetched from);
    it is returned apart because the answer names the stored copy instead.
    """
    parser = _PreviewParser()
    try:
        parser.feed(html)
        parser.close()
    except Exception:
        # html.parser copes with nearly anything; keep what was read if not.
        pass
    props = parser.properties
    out: dict[str, Any] = {}
    for key in TEXT_PROPERTIES:
        value = props.get(key)
        if value is not None and value.strip():
            out[key] = _clean(value, MAX_TITLE if key == "og:title" else MAX_TEXT)
    for key in INT_PROPERTIES:
        number = _int(props.get(key, ""))
        if number is not None:
            out[key] = number
    if "og:title" not in out:
        title = _clean("".join(parser.title_parts), MAX_TITLE)
        if title:
            out["og:title"] = title
    if "og:description" not in out and parser.description is not None:
        description = _clean(parser.description, MAX_TEXT)
        if description:
            out["og:description"] = description
    base = page_url
    if parser.base is not None:
        base = _absolute_http_url(parser.base, page_url) or page_url
    # Clients link to it: only an http(s) URL (a javascript: one is dropped).
    canonical = _absolute_http_url(props.get("og:url", ""), base)
    if canonical is not None:
        out["og:url"] = canonical
    image: Optional[str] = None
    for key in IMAGE_PROPERTIES:
        if key in props:
            image = _absolute_http_url(props[key], base)
            if image is not None:
                break
    return out, image
