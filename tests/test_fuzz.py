"""Hostile input: property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis)
and of the image decoder with malformed files (hypothesis). No 5xx, no crash, no hang."""

from __future__ import annotations

import io

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.errors import InputError
from runtime.images import decode_image
from service.app import create_app
from service.errors import INPUT_STATUS
from service.settings import Settings
from tests.images import encode, photo
from tests.server import running_server

pytestmark = pytest.mark.e2e

SCHEMA = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    with running_server(tiny_model_dir, root / "d", root, max_image_pixels=1_000_000) as srv:
        yield srv


@SCHEMA.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx_and_every_response_matches_the_schema(case, fuzz_server):
    """Every schemathesis check (`--checks all`) but positive_data_acceptance: that one expects any
    schema-valid request to succeed, and an upload's validity (that its bytes are an image, that its
    metadata string is a JSON object) cannot be written in OpenAPI; such requests rightly get 422."""
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    response = case.call_and_validate(base_url=fuzz_server.url, timeout=30, excluded_checks=[positive_data_acceptance])
    assert response.status_code < 500, (case.method, case.path, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body["error"]) == {"code", "message"}


VALID = [encode(photo(1, 16), fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")]


@given(
    base=st.sampled_from(VALID),
    cuts=st.lists(st.tuples(st.integers(0, 4000), st.binary(max_size=8)), max_size=6),
    truncate=st.integers(1, 5000),
)
@settings(max_examples=300, deadline=None)
def test_decoder_survives_corrupted_files(base, cuts, truncate):
    data = bytearray(base)
    for pos, junk in cuts:
        pos %= len(data)
        data[pos : pos + len(junk)] = junk
    data = bytes(data[: max(1, truncate % (len(data) + 1))])
    try:
        im = decode_image(data, "fuzz", max_bytes=1_000_000, max_pixels=4_000_000)
    except InputError as exc:
        assert 400 <= INPUT_STATUS[exc.code] < 500 and exc.code in {
            "invalid_image",
            "unsupported_format",
            "too_many_pixels",
            "empty_file",
            "image_too_large",
        }
    else:
        assert im.mode == "RGB" and im.size[0] > 0


def test_decompression_bomb_is_refused_before_decoding():
    from tests.images import bomb_png

    with pytest.raises(InputError) as err:
        decode_image(bomb_png(20000), "bomb.png", max_bytes=10_000_000, max_pixels=50_000_000)
    assert INPUT_STATUS[err.value.code] == 413 and err.value.code == "too_many_pixels"


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(im, "JPEG", exif=exif), "x.jpg", 10**6, 10**7)
    assert out.size == (20, 40)


def test_alpha_is_composited_on_white():
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    out = decode_image(buf.getvalue(), "a.png", 10**6, 10**7)
    assert out.getpixel((4, 4)) == (255, 255, 255)
