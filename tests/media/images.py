"""Small test images made with Pillow, and a decompression bomb header."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png(width: int = 400, height: int = 300, text: str | None = None) -> bytes:
    from PIL import PngImagePlugin

    img = Image.new("RGB", (width, height), (200, 30, 30))
    for x in range(0, width, 10):
        img.putpixel((x, height // 2), (0, 0, 255))
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", text)
    out = io.BytesIO()
    img.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def jpeg(width: int = 400, height: int = 300) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (30, 200, 30)).save(out, format="JPEG")
    return out.getvalue()


def _frames(width: int, height: int) -> list[Image.Image]:
    return [Image.new("RGB", (width, height), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]


def gif(width: int = 400, height: int = 300) -> bytes:
    frames = _frames(width, height)
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def webp(width: int = 400, height: int = 300) -> bytes:
    frames = _frames(width, height)
    out = io.BytesIO()
    frames[0].save(out, format="WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def open_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))
