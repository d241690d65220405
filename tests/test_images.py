"""backend.annotate.images: every place Label Studio keeps images, every pixel format, and the limits."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fake_files import FileServer, bomb_png
from PIL import Image

from backend.annotate.fetch import FetchPolicy
from backend.annotate.images import ImageError, ImageLoader, decode, to_rgb

# the test file server's host: loopback, refused by default (tests/test_fetch_policy.py shows that)
SERVER_HOST = FetchPolicy.parse("127.0.0.1")


def png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


RED = Image.new("RGB", (8, 6), (200, 10, 10))


@pytest.fixture(scope="module")
def server():
    with FileServer() as s:
        s.files["/img.png"] = png(RED)
        s.files["/data/upload/3/img.png"] = png(RED)
        s.files["/data/local-files/?d=pics/img.png"] = png(RED)
        s.files["/bucket/bucket/img.png"] = png(RED)
        yield s


# -- sources ---------------------------------------------------------------------------------------


def test_data_uri_base64_and_percent_encoded():
    loader = ImageLoader()
    assert loader.load(data_uri(png(RED))).getpixel((0, 0)) == (200, 10, 10)
    raw = png(RED)
    quoted = "data:image/png," + "".join(f"%{b:02x}" for b in raw)
    assert loader.load(quoted).size == (8, 6)


def test_plain_http_url_needs_no_token(server):
    assert ImageLoader(policy=SERVER_HOST).load(server.url("/img.png")).size == (8, 6)


def test_upload_local_files_and_cloud_with_legacy_token(server):
    # allow-listed for the presign route's redirect to /bucket/..., which a real Label Studio sends to S3
    loader = ImageLoader(hostname=server.base, access_token=server.legacy_token, policy=SERVER_HOST)
    assert loader.load("/data/upload/3/img.png").size == (8, 6)
    assert loader.load("/data/local-files/?d=pics/img.png").size == (8, 6)
    # cloud storage goes through Label Studio's presign endpoint, which needs the task id
    assert loader.load("s3://bucket/img.png", task_id=7).size == (8, 6)
    assert any(path.startswith("/tasks/7/presign/") for path, _ in server.requests)


def test_personal_access_token_is_exchanged_for_an_access_token(server):
    loader = ImageLoader(hostname=server.base, access_token=server.pat)
    assert loader.load("/data/upload/3/img.png").size == (8, 6)
    auth = [a for p, a in server.requests if p.startswith("/storage-data/")][-1]
    assert auth.startswith("Bearer ") and auth.split()[1] in server.access_tokens


def test_wrong_token_missing_token_and_missing_host(server):
    with pytest.raises(ImageError, match=r"401 \(is LABEL_STUDIO_API_KEY right\?\)"):
        ImageLoader(hostname=server.base, access_token="wrong").load("/data/upload/3/img.png")
    with pytest.raises(ImageError, match="LABEL_STUDIO_API_KEY"):
        ImageLoader(hostname=server.base).load("/data/upload/3/img.png")
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        ImageLoader().load("/data/upload/3/img.png")


def test_http_errors_and_bad_values(server):
    with pytest.raises(ImageError, match="404"):
        ImageLoader(policy=SERVER_HOST).load(server.url("/missing.png"))
    with pytest.raises(ImageError, match="not a URL"):
        ImageLoader().load(None)
    with pytest.raises(ImageError, match="not a URL"):
        ImageLoader().load("")


# -- limits ------------------------------------------------------------------------------------------


def test_byte_limit_on_downloads_and_data_uris(server):
    big = png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)))
    server.files["/big.png"] = big
    with pytest.raises(ImageError, match="bytes"):
        ImageLoader(max_bytes=10_000, policy=SERVER_HOST).load(server.url("/big.png"))
    with pytest.raises(ImageError, match="bytes"):
        ImageLoader(max_bytes=10_000).load(data_uri(big))
    assert ImageLoader(policy=SERVER_HOST).load(server.url("/big.png")).size == (200, 200)


def test_download_time_limit(server):
    server.files["/slow.png"] = b"x" * 8192
    server.slow["/slow.png"] = 0.3
    with pytest.raises(ImageError, match=r"longer than|timed out|Timeout"):
        ImageLoader(timeout=0.5, policy=SERVER_HOST).load(server.url("/slow.png"))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageError, match=r"decompression bomb|pixels"):
        decode(bomb_png())  # 10 gigapixels: PIL itself refuses it at open
    with pytest.raises(ImageError, match="10000x10000 pixels"):
        decode(bomb_png(10_000, 10_000))  # 100 megapixels: below PIL's limit, above ours
    with pytest.raises(ImageError, match="pixels"):
        decode(png(Image.new("RGB", (300, 300))), max_pixels=10_000)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"this is a text file, not an image\n", "not an image"),
        (b"", "not an image"),
        (png(RED)[:-30], "unreadable|truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not an image|unreadable"),
    ],
    ids=["text", "empty", "truncated", "corrupt"],
)
def test_non_images_and_broken_files(data, message):
    with pytest.raises(ImageError, match=message):
        decode(data)


def test_truncated_jpeg_is_refused():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with pytest.raises(ImageError):
        decode(buf.getvalue()[: len(buf.getvalue()) // 2])


# -- pixel formats -------------------------------------------------------------------------------------


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = decode(png(rgba))
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert decode(png(Image.new("LA", (2, 2), (0, 0)))).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_greyscale_and_one_bit():
    p = Image.new("P", (2, 2), 0)
    p.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    assert decode(png(p)).getpixel((0, 0)) == (0, 0, 255)
    assert decode(png(p, transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    assert decode(png(Image.new("L", (2, 2), 77))).getpixel((0, 0)) == (77, 77, 77)
    assert decode(png(Image.new("1", (2, 2), 1))).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    x = np.full((4, 4), 32896, dtype=np.uint16)  # mid grey in 16 bits
    out = decode(png(Image.fromarray(x)))
    assert out.mode == "RGB" and abs(out.getpixel((0, 0))[0] - 128) <= 1


def test_cmyk_jpeg_becomes_rgb():
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, "JPEG", quality=95)
    r, g, b = decode(buf.getvalue()).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    wide.save(buf, "JPEG", exif=exif.tobytes())
    assert decode(buf.getvalue()).size == (20, 40)


def test_to_rgb_keeps_rgb_untouched():
    assert to_rgb(RED) is RED
