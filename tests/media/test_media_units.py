"""Filenames, headers, ranges, multipart, sniffing, thumbnails and bombs."""

from __future__ import annotations

import pytest

from tests.media import images
from zhome.media import headers, multipart
from zhome.media.thumbnailer import ImageTooLarge, ThumbnailError, image_size, make_thumbnail, \
    sniff_content_type, target_size

MAX_PIXELS = 32_000_000


@pytest.mark.parametrize("raw,expected", [
    ("report.pdf", "report.pdf"),
    ("../../etc/passwd", "passwd"),
    ("C:\\Users\\x\\evil.exe", "evil.exe"),
    ('a"b.txt', "a'b.txt"),
    ("\u202eexe.txt", "exe.txt"),
    ("line\r\nbreak.txt", "linebreak.txt"),
    ("...hidden", "hidden"),
    ("", None),
    ("/", None),
    (None, None),
    ("x" * 300, "x" * 255),
    ("naïve café.png", "naïve café.png"),
])
def test_sanitise_filename(raw: str | None, expected: str | None) -> None:
    assert headers.sanitise_filename(raw) == expected


def test_content_disposition() -> None:
    assert headers.content_disposition("image/png", "a.png") == b'inline; filename="a.png"'
    assert headers.content_disposition("text/html", "a.html") == b'attachment; filename="a.html"'
    assert headers.content_disposition("image/svg+xml", None) == b"attachment"
    assert headers.content_disposition("text/plain; charset=utf-8", "t.txt").startswith(b"inline")
    value = headers.content_disposition("application/pdf", "café.pdf")
    assert value == b"attachment; filename=\"caf_.pdf\"; filename*=utf-8''caf%C3%A9.pdf"


def test_normalise_content_type() -> None:
    assert headers.normalise_content_type("Image/PNG") == "image/png"
    assert headers.normalise_content_type("text/plain; charset=UTF-8") == "text/plain; charset=UTF-8"
    assert headers.normalise_content_type("image/png\r\nX-Evil: 1") is None
    assert headers.normalise_content_type("nonsense") is None


def test_parse_range() -> None:
    assert headers.parse_range(None, 100) is None
    assert headers.parse_range("bytes=0-9", 100) == (0, 10)
    assert headers.parse_range("bytes=90-", 100) == (90, 100)
    assert headers.parse_range("bytes=-10", 100) == (90, 100)
    assert headers.parse_range("bytes=50-1000", 100) == (50, 100)
    assert headers.parse_range("bytes=0-1,5-6", 100) is None
    for bad in ("bytes=100-", "bytes=5-2", "bytes=-0"):
        with pytest.raises(headers.RangeNotSatisfiable):
            headers.parse_range(bad, 100)


def test_multipart_round_trip_and_location() -> None:
    head, tail = multipart.framing("b0und", "image/png", b'inline; filename="x.png"')
    body = b"\r\n--b0und" + b"binary\x00\r\n--" * 3
    part = multipart.parse('multipart/mixed; boundary="b0und"', head + body + tail)
    assert part.metadata == b"{}" and part.body == body and part.headers["content-type"] == "image/png"

    redirect = (b"--xyz\r\nContent-Type: application/json\r\n\r\n{}\r\n--xyz\r\n"
                b"Location: https://cdn.example/m\r\n\r\n\r\n--xyz--\r\n")
    part = multipart.parse("multipart/mixed; boundary=xyz", redirect)
    assert part.location == "https://cdn.example/m"
    with pytest.raises(multipart.MultipartError):
        multipart.parse("application/json", b"{}")
    with pytest.raises(multipart.MultipartError):
        multipart.parse("multipart/mixed; boundary=xyz", b"--xyz\r\nContent-Type: application/json\r\n\r\n{}")


def _feed(content_type: str, body: bytes, step: int, max_head: int = multipart.MAX_HEAD_BYTES
          ) -> tuple[multipart.StreamParser, bytes]:
    parser = multipart.StreamParser(content_type, max_head)
    media = b"".join(parser.feed(body[i:i + step]) for i in range(0, len(body), step))
    parser.finish()
    return parser, media


STEPS = [1, 2, 3, 5, 7, 13, 64, 1000, 65536]


@pytest.mark.parametrize("step", STEPS)
def test_stream_parser_in_any_pieces(step: int) -> None:
    # Content that looks like a delimiter but is not one: no CRLF before it,
    # something else after it, or a close delimiter without its CRLF.
    media = (b"\x89PNG--b0und\r\n\r\n--b0un\r\n--b0undX\r\n--b0und \tx\r\n--b0un" + bytes(range(256)) * 20
             + b"\r\n--b0und-x\r\n")
    head, tail = multipart.framing("b0und", "image/png", b'inline; filename="x.png"')
    for body in (head + media + tail,
                 b"preamble to ignore\r\n" + head + media + b"\r\n--b0und--   \r\nepilogue\r\n--b0und\r\n",
                 head + media + b"\r\n--b0und--"):
        parser, got = _feed('multipart/mixed; boundary="b0und"', body, step)
        assert got == media
        assert parser.metadata == b"{}" and parser.done
        assert parser.headers == {"content-type": "image/png", "content-disposition": 'inline; filename="x.png"'}
        assert parser.location is None
    # Transport padding after a boundary, an empty media part, no part headers.
    body = (b"--b0und  \r\nContent-Type: application/json; charset=utf-8\r\n\r\n{\"a\": 1}\r\n--b0und\t\r\n"
            b"\r\n\r\n--b0und--\r\n")
    parser, got = _feed("multipart/mixed; boundary=b0und", body, step)
    assert (got, parser.metadata, parser.headers) == (b"", b'{"a": 1}', {})


@pytest.mark.parametrize("step", STEPS)
def test_stream_parser_location_forms(step: int) -> None:
    start = b"--xyz\r\nContent-Type: application/json\r\n\r\n{}\r\n--xyz\r\nLocation: https://cdn.example/m\r\n"
    for end in (b"\r\n\r\n--xyz--\r\n",  # blank line, empty body, CRLF delimiter
                b"\r\n--xyz--\r\n",  # blank line, the delimiter right after it (the spec's example)
                b"--xyz--\r\n",  # no blank line: the part is its headers only
                b"\r\nignored body\r\n--xyz--"):
        parser, got = _feed("multipart/mixed; boundary=xyz", start + end, step)
        assert parser.location == "https://cdn.example/m", end
        assert got in (b"", b"ignored body")


@pytest.mark.parametrize("step", [1, 4, 1000])
@pytest.mark.parametrize("content_type,body,message", [
    ("application/json", b"{}", "expected multipart/mixed"),
    ("multipart/mixed", b"--x\r\n", "without a boundary"),
    ("multipart/mixed; boundary=xyz", b"", "boundary not found"),
    ("multipart/mixed; boundary=xyz", b"no delimiter here\r\n--xyzzy\r\n", "boundary not found"),
    ("multipart/mixed; boundary=xyz", b"--xyz--\r\n", "expected 2 parts, got 0"),
    ("multipart/mixed; boundary=xyz", b"--xyz\r\nContent-Type: application/json\r\n\r\n{}", "part 1 of 2"),
    ("multipart/mixed; boundary=xyz", b"--xyz\r\nContent-Type: application/json\r\n\r\n{}\r\n--xyz--",
     "expected 2 parts, got 1"),
    ("multipart/mixed; boundary=xyz", b"--xyz\r\nContent-Type: text/plain\r\n\r\n{}\r\n--xyz\r\n\r\nm",
     "not application/json"),
    ("multipart/mixed; boundary=xyz", b"--xyz\r\n\r\n{}\r\n--xyz\r\n\r\nm\r\n--xyz--", "not application/json"),
    ("multipart/mixed; boundary=xyz", b"--xyz\r\nContent-Type application/json\r\n\r\n{}", "malformed part header"),
    ("multipart/mixed; boundary=xyz", b"--xyz\r\nContent-Type: application/json\r\n\r\n{}\r\n--xyz\r\n"
     b"Content-Type: image/png\r\n\r\nmedia\r\n--xyz\r\n\r\nthird\r\n--xyz--", "got more"),
    ("multipart/mixed; boundary=xyz", b"--xyz\r\nContent-Type: application/json\r\n\r\n{}\r\n--xyz\r\n"
     b"Content-Type: image/png\r\n\r\nmedia, then the end of the body\r\n--xyz", "no closing delimiter"),
])
def test_stream_parser_bad_framing(step: int, content_type: str, body: bytes, message: str) -> None:
    with pytest.raises(multipart.MultipartError, match=message):
        _feed(content_type, body, step)


@pytest.mark.parametrize("step", [1, 100, 10_000])
def test_stream_parser_bounds_what_precedes_the_media(step: int) -> None:
    json_head = b"--xyz\r\nContent-Type: application/json\r\n\r\n"
    for body in (b"x" * 5000,  # no boundary at all
                 json_head + b"[" * 5000,  # endless metadata
                 json_head + b"{}\r\n--xyz\r\nX-Pad: " + b"p" * 5000 + b"\r\n\r\nmedia\r\n--xyz--"):
        with pytest.raises(multipart.MultipartError, match="no media part in the first 1000 bytes"):
            _feed("multipart/mixed; boundary=xyz", body, step, max_head=1000)
    # The media itself may be any size.
    media = b"m" * 50_000
    parser, got = _feed("multipart/mixed; boundary=xyz", json_head + b"{}\r\n--xyz\r\n\r\n" + media
                        + b"\r\n--xyz--", step, max_head=1000)
    assert got == media


def test_sniffing() -> None:
    assert sniff_content_type(images.png(4, 4)) == "image/png"
    assert sniff_content_type(images.jpeg(4, 4)) == "image/jpeg"
    assert sniff_content_type(images.gif(4, 4)) == "image/gif"
    assert sniff_content_type(images.webp(4, 4)) == "image/webp"
    assert sniff_content_type(b"  <!DOCTYPE html><html>") == "text/html"
    assert sniff_content_type(b"%PDF-1.7") == "application/pdf"
    assert sniff_content_type(b"hello") is None


@pytest.mark.parametrize("kind,fmt", [("png", "PNG"), ("jpeg", "JPEG"), ("gif", "PNG"), ("webp", "PNG")])
def test_thumbnail_sizes_per_format(kind: str, fmt: str) -> None:
    data = getattr(images, kind)(400, 300)
    for (w, h, method), expected in {
        (32, 32, "crop"): (32, 32),
        (96, 96, "crop"): (96, 96),
        (320, 240, "scale"): (320, 240),
        (640, 480, "scale"): (400, 300),  # never upscaled
        (100, 100, "scale"): (100, 75),
    }.items():
        thumb = make_thumbnail(data, w, h, method, False, MAX_PIXELS)
        img = images.open_image(thumb.data)
        assert img.size == expected == (thumb.width, thumb.height)
        assert img.format == fmt
        assert not getattr(img, "is_animated", False)


@pytest.mark.parametrize("kind", ["gif", "webp"])
def test_animated_thumbnails_keep_animation(kind: str) -> None:
    thumb = make_thumbnail(getattr(images, kind)(400, 300), 96, 96, "crop", True, MAX_PIXELS)
    img = images.open_image(thumb.data)
    assert thumb.content_type == "image/webp" and img.format == "WEBP"
    assert img.is_animated and img.n_frames == 3 and img.size == (96, 96)


def test_target_size() -> None:
    assert target_size(1000, 500, 100, 100, "crop") == (100, 100, (250, 0, 750, 500))
    assert target_size(50, 50, 100, 100, "crop")[:2] == (50, 50)
    assert target_size(1000, 500, 320, 240, "scale") == (320, 160, None)


def test_decompression_bomb_refused_before_decoding() -> None:
    bomb = images.bomb_png()
    assert len(bomb) < 200
    with pytest.raises(ImageTooLarge):
        image_size(bomb, MAX_PIXELS)
    with pytest.raises(ImageTooLarge):
        make_thumbnail(bomb, 32, 32, "crop", False, MAX_PIXELS)
    # Just over a small limit is refused too; under it is fine.
    with pytest.raises(ImageTooLarge):
        make_thumbnail(images.png(100, 100), 32, 32, "crop", False, 9_999)
    assert make_thumbnail(images.png(100, 100), 32, 32, "crop", False, 10_000).width == 32


def test_not_an_image() -> None:
    with pytest.raises(ThumbnailError):
        make_thumbnail(b"<html></html>", 32, 32, "crop", False, MAX_PIXELS)
