"""The HTML side of URL previews (zhome/media/preview_html.py)."""

from __future__ import annotations

from zhome.media.preview_html import charset_of_content_type, decode_html, parse_preview

PAGE = "https://example.org/blog/post.html"


def test_opengraph_tags() -> None:
    html = """<!doctype html><html><head>
      <title>Fallback title</title>
      <meta property="og:title" content="  The real   title ">
      <meta property="og:description" content="About &amp; around">
      <meta property="og:image" content="/img/cover.png">
      <meta property="og:image" content="/img/second.png">
      <meta property="og:image:width" content="640">
      <meta property="og:image:height" content="not a number">
      <meta property="og:type" content="article">
      <meta property="og:site_name" content="Example">
      <meta property="og:url" content="https://example.org/blog/post">
      <meta property="fb:app_id" content="123">
      <meta name="description" content="Ignored: og:description wins">
    </head><body></body></html>"""
    props, image = parse_preview(html, PAGE)
    assert props == {
        "og:title": "The real title", "og:description": "About & around", "og:type": "article",
        "og:site_name": "Example", "og:url": "https://example.org/blog/post", "og:image:width": 640,
    }
    # Relative to the page; the first of a repeated property.
    assert image == "https://example.org/img/cover.png"


def test_title_and_description_fallback() -> None:
    props, image = parse_preview(
        "<html><head><TITLE>Plain\n page</TITLE><meta name=Description content='What it is'></head></html>", PAGE)
    assert props == {"og:title": "Plain page", "og:description": "What it is"}
    assert image is None


def test_image_urls() -> None:
    # Absolute, protocol-relative, relative to <base>, and refused schemes.
    assert parse_preview('<meta property="og:image" content="http://cdn.example/a.jpg">', PAGE)[1] == \
        "http://cdn.example/a.jpg"
    assert parse_preview('<meta property="og:image" content="//cdn.example/b.jpg">', PAGE)[1] == \
        "https://cdn.example/b.jpg"
    assert parse_preview('<base href="https://static.example/x/"><meta property="og:image" content="c.jpg">',
                         PAGE)[1] == "https://static.example/x/c.jpg"
    assert parse_preview('<meta property="og:image" content="../up.jpg">', PAGE)[1] == "https://example.org/up.jpg"
    for bad in ("javascript:alert(1)", "data:image/png;base64,AAAA", "file:///etc/passwd", "ftp://x/y.png", ""):
        assert parse_preview(f'<meta property="og:image" content="{bad}">', PAGE)[1] is None
    # og:image:secure_url when og:image is unusable.
    assert parse_preview('<meta property="og:image" content="data:x">'
                         '<meta property="og:image:secure_url" content="https://s.example/i.png">', PAGE)[1] == \
        "https://s.example/i.png"


def test_malformed_html() -> None:
    html = ("<html><head><title>Broken <b>bold</title><meta property=og:title content=Unquoted"
            "<meta property='og:description' content=\"Unclosed><body><p>text <div></span>")
    props, _ = parse_preview(html, PAGE)
    assert isinstance(props, dict)
    # Never a tag found inside a script, and an SVG's <title> is not the page's.
    props, image = parse_preview(
        "<script>var s = '<meta property=\"og:image\" content=\"/evil.png\">';</script>"
        "<svg><title>icon</title></svg><title>Page</title>", PAGE)
    assert props == {"og:title": "Page"} and image is None
    assert parse_preview("", PAGE) == ({}, None)
    assert parse_preview("<<<>>>&&&;<!--", PAGE)[1] is None


def test_og_url_is_an_http_url() -> None:
    assert parse_preview('<meta property="og:url" content="/canonical">', PAGE)[0] == {
        "og:url": "https://example.org/canonical"}
    assert parse_preview('<meta property="og:url" content="javascript:alert(1)">', PAGE)[0] == {}


def test_charsets() -> None:
    text = "<title>Caf\u00e9 \u2013 na\u00efve</title>"
    # Content-Type header charset.
    assert decode_html(text.encode("utf-8"), "text/html; charset=UTF-8") == text
    latin = "<title>Caf\u00e9</title>".encode("latin-1")
    assert decode_html(latin, 'text/html; charset="iso-8859-1"') == "<title>Caf\u00e9</title>"
    # <meta charset> and http-equiv when the header says nothing.
    assert "Caf\u00e9" in decode_html(b'<meta charset="windows-1252">' + latin, "text/html")
    assert "Caf\u00e9" in decode_html(
        b'<meta http-equiv="Content-Type" content="text/html; charset=ISO-8859-1">' + latin, None)
    # A BOM wins over everything.
    assert decode_html(b"\xef\xbb\xbf" + text.encode(), "text/html; charset=latin-1") == text
    # Unknown charset: UTF-8; bad bytes never fail.
    assert "Caf" in decode_html(latin, "text/html; charset=klingon")
    assert decode_html(b"<title>\xff\xfe\xfa ok</title>", "text/html; charset=utf-8").endswith("ok</title>")
    assert charset_of_content_type("text/html") is None
    assert charset_of_content_type("text/html; Charset=Shift_JIS") == "Shift_JIS"
    props, _ = parse_preview(decode_html("<title>\u65e5\u672c</title>".encode("shift_jis"),
                                         "text/html; charset=shift_jis"), PAGE)
    assert props == {"og:title": "\u65e5\u672c"}
