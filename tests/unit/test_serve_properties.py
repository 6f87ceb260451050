"""Hypothesis properties of the serving input parsers, so the fixes hold for the class of input and not
only for the examples in the other tests: the safetensors header check accepts what safetensors writes and
refuses every truncation, arbitrary bytes never raise anything but ArtifactProblem, request bodies either
validate or raise ValidationError, images either decode or raise RequestError, ids match whole, and a
scrubbed message never shows an address or a long path."""

from __future__ import annotations

import base64
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from safetensors.numpy import save as st_save

from diffray.errors import RequestError
from diffray.serve.artifacts import ArtifactProblem, parse_header
from diffray.serve.feedback import FeedbackRequest
from diffray.serve.http import public_message
from diffray.serve.registry import valid_id
from diffray.serve.schemas import GenerateRequest, ImagesRequest, decode_b64_image

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [np.float32, np.float16, np.int8, np.int64, np.uint8, np.float64]

tensors = st.dictionaries(
    st.text(string.ascii_letters + "._", min_size=1, max_size=12),
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), min_size=0, max_size=3)),
    min_size=0, max_size=4)


def _file(spec) -> bytes:
    return st_save({k: np.zeros(shape, dtype) for k, (dtype, shape) in spec.items()})


@FAST
@given(tensors)
def test_what_safetensors_writes_parses(spec):
    data = _file(spec)
    assert set(parse_header(data, len(data), "w")) == set(spec)


@FAST
@given(tensors.filter(lambda s: any(np.prod(shape) > 0 for _, shape in s.values())), st.data())
def test_every_truncation_or_padding_is_refused(spec, data):
    raw = _file(spec)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(ArtifactProblem):
        parse_header(raw[:cut], cut, "w")
    with pytest.raises(ArtifactProblem):
        parse_header(raw + b"\0" * data.draw(st.integers(1, 64)), len(raw) + 1, "w")


@FAST
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise_anything_else(raw):
    try:
        parse_header(raw, len(raw), "w")
    except ArtifactProblem as exc:
        assert "0x" not in str(exc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
body_keys = st.sampled_from(["prompt", "negative_prompt", "n", "width", "height", "steps", "guidance", "seed",
                             "scheduler", "adapter", "adapter_scale", "adapters", "control", "size", "model",
                             "choice", "images", "id", "response_format", "user"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(body_keys, json_values, max_size=6))
def test_bodies_validate_or_raise_validation_error_only(body):
    for model in (GenerateRequest, ImagesRequest, FeedbackRequest):
        try:
            model.model_validate(body)
        except ValidationError:
            pass


@FAST
@given(st.text(max_size=64) | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()))
def test_images_decode_or_raise_request_error_only(text):
    try:
        decode_b64_image(text, "control.image", 10_000)
    except RequestError as exc:
        assert exc.param == "control.image" and "0x" not in exc.message


@FAST
@given(st.text(max_size=70))
def test_ids_are_matched_whole(text):
    allowed = set(string.ascii_letters + string.digits + "._-")
    expected = 1 <= len(text) <= 64 and set(text) <= allowed and set(text) != {"."} \
        and text not in ("base", "dall-e-2", "dall-e-3", "gpt-image-1")
    assert valid_id(text) == expected


@FAST
@given(st.lists(st.sampled_from(["/srv/data/model/unet", " at 0xdeadbeef01", "<Foo object at 0x7f00aa>", "ok",
                                 "tensor([1., 2.])", "C:\\Users\\x\\w.bin", " ", "x" * 50]), max_size=30))
def test_scrubbed_messages_show_no_addresses_or_paths(parts):
    out = public_message("".join(parts))
    assert "0x" not in out and "/srv" not in out and "Users" not in out and "tensor(" not in out
    assert len(out) <= 400
