"""Hostile files: every malformed, corrupted or forged file gets one ValueError, model intact.

Forged files keep valid checksums (rewritten here) so that the semantic checks are tested,
not only the CRCs.
"""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffq_triton as dq
from diffq_triton import serialization
from tests.models import TiedLM, mlp


def make_model():
    torch.manual_seed(0)
    return TiedLM(vocab=40, dim=16)


def eval_state(model, quantizer) -> dict[str, torch.Tensor]:
    """Every parameter (each use of a tied one) and buffer as the quantized model has them in
    eval: what loading the file must reproduce bit for bit."""
    quantizer.quantize()
    state = snapshot(model)
    quantizer.unquantize()
    return state


def snapshot(model) -> dict[str, torch.Tensor]:
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    return {n: t.detach().clone() for n, t in tensors.items()
            if not n.endswith(("_diffq", "_lsq"))}


def assert_equal_state(model, expected: dict[str, torch.Tensor]):
    state = snapshot(model)
    assert state.keys() == expected.keys()
    for name, t in state.items():
        assert t.dtype == expected[name].dtype and torch.equal(t, expected[name]), name


@pytest.fixture(scope="module")
def saved() -> tuple[bytes, dict[str, torch.Tensor]]:
    """The good file's bytes, and the eval state of the model it was saved from."""
    model = make_model()
    quantizer = dq.DiffQuantizer(model, min_size=0.0005, group_size=8)
    with torch.no_grad():
        model.emb.weight_diffq.copy_(torch.linspace(-4, 4, model.emb.weight_diffq.numel()))
    data = serialization.file_bytes(quantizer)
    expected = eval_state(model, quantizer)
    quantizer.detach()
    return data, expected


@pytest.fixture(scope="module")
def good_file(saved) -> bytes:
    return saved[0]


def assert_rejected(data: bytes, match: str | None = None):
    """Loading must raise one ValueError and leave the target model exactly as it was."""
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        serialization.load_quantized(model, data)
    assert_equal_state(model, before)


def split(data: bytes):
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + length])
    return header, data[8 + length :]


def join(header: dict, body: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def flip(data: bytes, key: str, at: int, mask: int) -> bytes:
    """``data`` with payload ``key``'s byte ``at`` (from its end when negative) XOR ``mask``."""
    header, body = split(data)
    start, stop = header[key]["data_offsets"]
    body = bytearray(body)
    body[(start if at >= 0 else stop) + at] ^= mask
    return join(header, bytes(body))


def forge(data: bytes, edit) -> bytes:
    """Apply ``edit(meta, header)`` and re-seal the metadata checksum."""
    header, body = split(data)
    meta = json.loads(header["__metadata__"]["diffq_triton"])
    edit(meta, header)
    # "__HUGE__" stands for a literal that parses to infinity (json.dumps would write Infinity).
    text = json.dumps(meta).replace('"__HUGE__"', "1e999")
    header["__metadata__"]["diffq_triton"] = text
    header["__metadata__"]["crc32"] = str(zlib.crc32(text.encode()))
    return join(header, body)


def test_good_file_loads_the_saved_model(saved):
    data, expected = saved
    model = make_model()
    serialization.load_quantized(model, data)
    assert_equal_state(model, expected)
    # Not vacuous: loading changed the fresh model's weights (mixed widths, 2 to 15 bits).
    assert not torch.equal(make_model().lstm.weight_ih_l0, model.lstm.weight_ih_l0)
    assert model.out.weight is model.emb.weight


@pytest.mark.parametrize("cut", [0, 4, 8, 20, -1, -100, 0.5])
def test_truncated(good_file, cut):
    size = int(len(good_file) * cut) if isinstance(cut, float) else cut % len(good_file)
    assert_rejected(good_file[:size])


def test_every_single_bit_flip_is_caught(good_file):
    for position in range(0, len(good_file), max(1, len(good_file) // 1500)):
        flipped = bytearray(good_file)
        flipped[position] ^= 1 << (position % 8)
        assert_rejected(bytes(flipped))


@pytest.mark.parametrize("length", [2**63, 2**40, 7, 0])
def test_forged_header_length(good_file, length):
    header, body = split(good_file)
    assert_rejected(join(header, body, length), "header length|not valid JSON")


def test_forged_offsets_and_absurd_shapes(good_file):
    header, body = split(good_file)
    key = "__streams__"
    header[key]["data_offsets"][1] += 10**12
    assert_rejected(join(header, body), "outside the data")
    header, body = split(good_file)
    header[key]["shape"] = [10**15, 10**15]
    assert_rejected(join(header, body), "holds 2\\^62 entries")
    header, body = split(good_file)
    header[key]["shape"] = [4, 1]
    assert_rejected(join(header, body), "needs")
    header, body = split(good_file)
    header[key]["dtype"] = "F16"
    header[key]["shape"][0] //= 2
    assert_rejected(join(header, body), "must be U8")
    header, body = split(good_file)
    header[key]["dtype"] = "C128"
    assert_rejected(join(header, body), "unsupported dtype")


def test_payload_bit_flip_names_tensor(good_file):
    # The first record's widths (emb.weight's), the last record's levels, a float payload.
    assert_rejected(flip(good_file, "__streams__", 3, 0x10),
                    "'emb.weight': widths checksum mismatch")
    assert_rejected(flip(good_file, "__streams__", -1, 0x80), "levels checksum mismatch")
    assert_rejected(flip(good_file, "out.bias", 0, 0x01), "'out.bias': data checksum mismatch")


def test_streams_shorter_or_longer_than_the_records(good_file):
    def edit(meta, header):
        meta["quantized"].pop()  # its streams stay in the payload

    assert_rejected(forge(good_file, edit), "streams payload holds")

    def edit_width(meta, header):
        meta["quantized"][-1]["min_bits"] += 2  # needs more level bytes than are left

    assert_rejected(forge(good_file, edit_width), "left|checksum")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("min_bits", 0, "out of range"),
        ("min_bits", 16, "out of range"),
        ("field_bits", 9, "out of range"),
        ("min", float("nan"), "holds NaN"),
        ("max", "__HUGE__", "not finite"),
        ("min", 1e30, "exceeds max"),
        ("max", 1e300, "not finite in float32"),
        ("shape", [40, 15], "does not match"),
        ("shape", [-1, 16], "integers in"),
        ("shape", [1] * 100_000, "100000 dimensions"),
        ("min", 10**400, "not finite"),
        ("dtype", ["float32"], "unknown dtype"),
        ("tied", "out.weight", "list of names"),
        ("tied", ["out.weight", "out.weight"], "repeat a name"),
        ("tied", ["emb.weight"], "repeat a name"),
        ("scheme", "zip", "unknown scheme"),
        ("group_size", -3, "negative group_size"),
        ("group_size", "8", "wrong type"),
        ("dtype", "int8", "unknown dtype"),
        ("name", "nope.weight", "no parameter 'nope.weight'"),
        ("tied", ["lstm.weight_ih_l0"], "does not match"),
        ("crc", None, "checksum is missing"),
    ],
)
def test_forged_metadata(good_file, field, value, match):
    def edit(meta, header):
        meta["quantized"][0][field] = value

    assert_rejected(forge(good_file, edit), match)


def test_range_span_overflows_float32(good_file):
    # Each end is a finite float32, but max - min is not: every weight would load as inf.
    def edit(meta, header):
        meta["quantized"][0]["min"], meta["quantized"][0]["max"] = -3e38, 3.4e38

    assert_rejected(forge(good_file, edit), "not finite in float32")


def test_widths_above_fifteen(good_file):
    # Widths base 14 with the stored 2-bit excess fields reaches 17 bits.
    def edit(meta, header):
        meta["quantized"][0]["min_bits"] = 14

    assert_rejected(forge(good_file, edit), "outside \\[1, 15\\]|checksum|expected")


@pytest.mark.parametrize("version", [0, 1, 3, "2", None, True, 2.0])
def test_unknown_version(good_file, version):
    def edit(meta, header):
        meta["version"] = version

    assert_rejected(forge(good_file, edit), "unknown format version")


def test_metadata_checksum(good_file):
    header, body = split(good_file)
    header["__metadata__"]["diffq_triton"] = header["__metadata__"]["diffq_triton"].replace(
        '"group_size":8', '"group_size":9')
    assert_rejected(join(header, body), "metadata checksum")


def test_wrong_model(good_file):
    model = mlp()
    with pytest.raises(ValueError, match="no parameter"):
        serialization.load_quantized(model, good_file)


def test_missing_parameter_value(good_file):
    header, body = split(good_file)
    start, stop = header.pop("out.bias")["data_offsets"]
    for entry in header.values():
        if "data_offsets" in entry and entry["data_offsets"][0] >= stop:
            entry["data_offsets"] = [o - (stop - start) for o in entry["data_offsets"]]

    def edit(meta, header):
        meta["float"]["crc"].pop()  # out.bias is the last float payload

    data = forge(join(header, body[:start] + body[stop:]), edit)
    assert_rejected(data, "no value for the model's parameter 'out.bias'")


def test_not_our_format(good_file):
    header, body = split(good_file)
    header["__metadata__"] = {"format": "pt"}
    assert_rejected(join(header, body), "not a diffq-triton file")
    assert_rejected(b"\x00" * 64)
    assert_rejected(struct.pack("<Q", 6) + b"[[[[[[" )
    assert_rejected(struct.pack("<Q", 20000) + b"[" * 20000, "nests")


def test_dense_json_is_refused_before_parsing():
    # Empty lists take ~25 times their text in memory once parsed.
    text = b"[" + b"[]," * 2_000_000 + b"[]]"
    assert_rejected(struct.pack("<Q", len(text)) + text, "nests lists or objects")


def test_repeated_record_is_refused_before_its_work(good_file):
    # Each copy would decode its widths again: the repeat is refused at the second copy.
    def edit(meta, header):
        meta["quantized"] = meta["quantized"][:1] * 1000 + meta["quantized"][1:]

    assert_rejected(forge(good_file, edit), "'emb.weight' is stored twice")


@pytest.mark.parametrize("edit, match", [
    (lambda f: f.__setitem__("dtype", {"out.bias": {"a": 1}}), "unknown dtype"),
    (lambda f: f.__setitem__("dtype", {"nope": "float32"}), "'nope': listed among the float"),
    (lambda f: f.__setitem__("tied", {"out.bias": "x"}), "list of names"),
    (lambda f: f.__setitem__("tied", []), "must be objects"),
    (lambda f: f["crc"].append(1), "float checksums for"),
    (lambda f: f.__setitem__("crc", None), "no float checksums"),
    (lambda f: f["crc"].__setitem__(0, "1"), "checksum is missing or not an integer"),
], ids=["dtype", "stray-name", "tied", "tied-list", "extra-crc", "no-crc", "crc-type"])
def test_float_metadata_fields(good_file, edit, match):
    assert_rejected(forge(good_file, lambda meta, header: edit(meta["float"])), match)


def test_header_entry_dtype_not_a_string(good_file):
    header, body = split(good_file)
    header["out.bias"]["dtype"] = ["F32"]
    assert_rejected(join(header, body), "unsupported dtype")


def test_payload_of_no_tensor(good_file):
    header, body = split(good_file)
    end = len(body)
    header["junk"] = {"dtype": "U8", "shape": [64], "data_offsets": [end, end + 64]}
    assert_rejected(join(header, body + b"J" * 64), "float checksums for")
    header, body = split(good_file)
    header["zz"] = {"dtype": "F32", "shape": [10**300] * 15 + [0], "data_offsets": [end, end]}
    assert_rejected(join(header, body), "integers in")


def test_lone_surrogate_in_metadata(good_file):
    header, body = split(good_file)
    text = header["__metadata__"]["diffq_triton"]
    header["__metadata__"]["diffq_triton"] = text[:-1] + ',"x":"\ud800"}'
    assert_rejected(join(header, body), "metadata checksum")


def test_not_a_model_or_not_a_source(good_file):
    with pytest.raises(TypeError, match="nn.Module"):
        serialization.load_quantized(good_file, good_file)
    with pytest.raises(TypeError, match="a path, a binary file or bytes"):
        serialization.load_quantized(make_model(), 1234)


MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
        st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
        st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
        st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
        st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(mutations=MUTATIONS)
def test_fuzz_mutated_files(saved, mutations):
    """Every mutated file is refused (one ValueError, model kept bit for bit), or is the good
    file itself (a cut past its end, an insert undone by a delete) and loads it exactly."""
    good_file, expected = saved
    data = bytearray(good_file)
    for kind, position, value in mutations:
        position %= max(1, len(data))
        if kind == "flip" and data:
            data[position] ^= 1 << value
        elif kind == "set" and data:
            data[position] = value
        elif kind == "cut":
            del data[position:]
        elif kind == "insert":
            data.insert(position, value)
        elif kind == "delete":
            del data[position : position + value]
    model = make_model()
    before = snapshot(model)
    try:
        serialization.load_quantized(model, bytes(data))
    except ValueError as e:
        assert str(e), "a refusal names its reason"
        assert_equal_state(model, before)
        return
    # Only a mutation that changed nothing may load, and it loads the saved model.
    assert bytes(data) == good_file
    assert_equal_state(model, expected)


@pytest.fixture(scope="module")
def bn_saved() -> tuple[bytes, dict[str, torch.Tensor]]:
    """A file with BatchNorm statistics (trained by one forward), and the saved eval state."""
    torch.manual_seed(0)
    model = bn_model()
    model(torch.randn(4, 3, 6, 6))
    quantizer = dq.UniformQuantizer(model, bits=4, min_size=0)
    data = serialization.file_bytes(quantizer)
    expected = eval_state(model, quantizer)
    quantizer.detach()
    return data, expected


@pytest.fixture(scope="module")
def bn_file(bn_saved) -> bytes:
    return bn_saved[0]


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def assert_bn_rejected(data: bytes, match: str):
    model = bn_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        serialization.load_quantized(model, data)
    assert_equal_state(model, before)


def test_bn_file_loads_the_saved_model(bn_saved):
    data, expected = bn_saved
    model = bn_model()
    serialization.load_quantized(model, data)
    assert_equal_state(model, expected)
    # Not vacuous: the statistics are the trained ones, the weights 4-bit ones.
    assert int(model[1].num_batches_tracked) == 1
    assert not torch.equal(model[1].running_var, torch.ones(4))
    assert model[0].weight.unique().numel() <= 16


def test_buffer_checks(bn_file):
    def edit_meta(edit):
        return forge(bn_file, lambda meta, header: edit(meta["buffers"]))

    assert_bn_rejected(edit_meta(lambda b: b.pop("1.running_var")), "float checksums for")
    assert_bn_rejected(edit_meta(lambda b: b.__setitem__("1.nope", 0)),
                       "no persistent buffer of that name")
    assert_bn_rejected(edit_meta(lambda b: b.__setitem__("1.running_mean", "x")),
                       "checksum is missing")
    assert_bn_rejected(forge(bn_file, lambda meta, header: meta.__setitem__("buffers", [])),
                       "'buffers' is not an object")
    header, body = split(bn_file)
    header["1.running_mean"]["shape"] = [2, 2]
    assert_bn_rejected(join(header, body), "does not match the model's")
    header, body = split(bn_file)
    header["1.num_batches_tracked"]["dtype"] = "F64"  # 8 bytes either way
    assert_bn_rejected(join(header, body), "does not fit the model's torch.int64")
    assert_bn_rejected(flip(bn_file, "1.running_var", 0, 0x04),
                       "'1.running_var': data checksum mismatch")


def test_model_buffer_missing_from_the_file(bn_file):
    model = bn_model()
    model.register_buffer("extra", torch.zeros(3))
    with pytest.raises(ValueError, match="no value for the model's buffer 'extra'"):
        serialization.load_quantized(model, bn_file)
    assert torch.equal(model[1].running_mean, torch.zeros(4))
