"""Migration from diffq 0.2.4 states: every layout restores exactly what diffq restores."""

from __future__ import annotations

import io
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffq_triton.serialization.diffq_compat import load_diffq_state
from tests.fixtures.diffq_cases import CASES, small_mlp

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def no_diffq(monkeypatch):
    """Make ``import diffq`` fail: the migration must not need the package."""
    for name in [m for m in sys.modules if m == "diffq" or m.startswith("diffq.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffq", None)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fixture_restores_diffq_weights(case, no_diffq):
    make_model = CASES[case][0]
    torch.manual_seed(123)  # weights differ from those saved: all must be overwritten
    model = make_model()
    load_diffq_state(model, FIXTURES / f"diffq024_{case}.th")
    expected = torch.load(FIXTURES / f"diffq024_{case}.expected.th", weights_only=True)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(expected)  # quantizer detached: no logits left
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_refuses_code_in_pickle(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "evil.th"
    torch.save({"quantized": [], "float16": [], "others": [], "meta": Evil()}, path)
    with pytest.raises(ValueError, match="not a loadable diffq state"):
        load_diffq_state(small_mlp(), path)
    assert not marker.exists()
    with open(path, "wb") as f:  # a legacy (non-zip) pickle
        pickle.dump(Evil(), f)
    with pytest.raises(ValueError, match="not a loadable diffq state"):
        load_diffq_state(small_mlp(), path)
    assert not marker.exists()


def test_refuses_other_classes(tmp_path):
    path = tmp_path / "other.th"
    torch.save({"quantized": [], "float16": [], "others": [],
                "meta": {"klass": torch.nn.Linear, "init_kwargs": {}}}, path)
    with pytest.raises(ValueError, match="not a loadable diffq state"):
        load_diffq_state(small_mlp(), path)


def test_truncated_and_garbage(tmp_path):
    data = (FIXTURES / "diffq024_diffq_g8_bitpack.th").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        path = tmp_path / f"cut{cut}.th"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            load_diffq_state(small_mlp(), path)


def test_wrong_model():
    model = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))
    with pytest.raises(ValueError):
        load_diffq_state(model, FIXTURES / "diffq024_diffq_g8_bitpack.th")


def diffq_widths_at(excess: int, n_groups: int) -> torch.Tensor:
    """diffq's packed width field of ``n_groups`` groups, all at ``min_bits + excess``."""
    from diffq import bitpack

    return bitpack.pack(torch.full((n_groups,), excess, dtype=torch.int16))


def forged(tmp_path, case, edit):
    pytest.importorskip("diffq")  # re-saving the trusted fixture needs diffq's classes
    state = torch.load(FIXTURES / f"diffq024_{case}.th", weights_only=False)
    edit(state)
    path = tmp_path / "forged.th"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "case, edit, match",
    [
        ("diffq_g8_bitpack", lambda s: s["quantized"].__setitem__(0, (
            *s["quantized"][0][:2], diffq_widths_at(13, 512 // 8))),
         "15-bit groups"),
        ("diffq_g8_unpacked",
         lambda s: s["quantized"][0][2].fill_(0), "outside \\[1, 15\\]"),
        ("diffq_g8_unpacked",
         lambda s: s["quantized"].__setitem__(0, (s["quantized"][0][0],
                                                  (float("nan"), 1.0),
                                                  s["quantized"][0][2])), "not a finite"),
        ("diffq_g8_bitpack",
         lambda s: s["quantized"][0][0].__setitem__(2, None), "no stream"),
        ("diffq_g8_bitpack",
         lambda s: s["quantized"].pop(), "quantized tensors"),
        ("uniform4_bitpack",
         lambda s: s["meta"]["init_kwargs"].__setitem__("evil", 1), "unknown"),
        ("lsq4_bitpack",
         lambda s: s["quantized"].__setitem__(0, (torch.zeros(3, 4), s["quantized"][0][1])),
         "integer tensor"),
    ],
)
def test_forged_states(tmp_path, case, edit, match):
    path = forged(tmp_path, case, edit)
    model = small_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        load_diffq_state(model, path)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert sorted(n for n, _ in model.named_parameters()) == sorted(before)


def _expected(case: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / f"diffq024_{case}.expected.th", weights_only=True)


def _assert_loaded_as_saved(model, case: str):
    """Every parameter bit for bit what diffq 0.2.4 restores from the intact file."""
    expected = _expected(case)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(expected)
    for name, p in model.named_parameters():
        assert p.dtype == expected[name].dtype and torch.equal(p, expected[name]), name


def _storage_offset(data: bytes, name: str) -> int:
    """Where the bytes of zip entry ``…/name`` (stored, uncompressed) start in ``data``."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/" + name))
    # Local file header: 30 bytes, then the name and the extra field (lengths at 26 and 28).
    start = info.header_offset
    name_len = int.from_bytes(data[start + 26:start + 28], "little")
    extra_len = int.from_bytes(data[start + 28:start + 30], "little")
    return start + 30 + name_len + extra_len


@pytest.mark.parametrize("entry", ["data/0", "data/14", "data.pkl"])
def test_corrupted_zip_entry_is_refused(entry):
    # torch.load reads a storage whose bytes no longer match their CRC-32 without a word:
    # a flipped bit in a weight's levels or range would load as a wrong weight.
    data = bytearray((FIXTURES / "diffq024_diffq_g8_torchpack.th").read_bytes())
    data[_storage_offset(bytes(data), entry) + 1] ^= 0x10
    model = small_mlp()
    before = _bitwise(model)
    with pytest.raises(ValueError, match=f"not a loadable diffq state: zip entry .*{entry}"
                                         "' is corrupted .*CRC"):
        load_diffq_state(model, io.BytesIO(bytes(data)))
    assert _bitwise(model).keys() == before.keys()
    for name, (_, _, kept) in before.items():
        assert torch.equal(_bitwise(model)[name][2], kept), name


def test_archive_written_without_crc_loads():
    # torch.serialization.set_crc32_options(False) writes 0 for every entry's CRC-32:
    # nothing to check, and the file must still load.
    pytest.importorskip("diffq")  # re-saving the trusted fixture needs diffq's classes
    case = "diffq_g8_torchpack"
    state = torch.load(FIXTURES / f"diffq024_{case}.th", weights_only=False)
    buffer = io.BytesIO()
    # (monkeypatch cannot restore a torch config entry: it would hide it for later saves.)
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, buffer)
    finally:
        torch.serialization.set_crc32_options(previous)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        assert all(info.CRC == 0 for info in archive.infolist())
    model = small_mlp()
    load_diffq_state(model, io.BytesIO(buffer.getvalue()))
    _assert_loaded_as_saved(model, case)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                          max_size=3), cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_mutated_states(mutations, cut):
    """Every mutated file is refused with the model kept bit for bit, or loads exactly the
    weights of the intact file (a byte the loader never reads, e.g. a zip timestamp)."""
    case = "diffq_g8_torchpack"
    data = bytearray((FIXTURES / f"diffq024_{case}.th").read_bytes())
    for position, value in mutations:
        data[position % len(data)] = value
    if cut is not None:
        del data[cut % len(data):]
    model = small_mlp()
    before = _bitwise(model)
    try:
        load_diffq_state(model, io.BytesIO(bytes(data)))
    except ValueError as e:
        assert str(e), "a refusal names its reason"
        after = _bitwise(model)
        assert after.keys() == before.keys()
        for name, (dtype, shape, kept) in before.items():
            assert after[name][:2] == (dtype, shape) and torch.equal(after[name][2], kept), name
        return
    _assert_loaded_as_saved(model, case)


# ----------------------------------------------------------------------------- hostile states
def _set_kwarg(key, value):
    return lambda s: s["meta"]["init_kwargs"].__setitem__(key, value)


def _set_meta(key, value):
    return lambda s: s["meta"].__setitem__(key, value)


def _set_part(index, value):
    """Replace part ``index`` of the first quantized entry (a tuple in diffq's states)."""
    def edit(s):
        parts = list(s["quantized"][0])
        parts[index] = value(parts[index]) if callable(value) else value
        s["quantized"][0] = tuple(parts)
    return edit


def _unpacked_lsq(s):
    """An unpacked LSQ state whose levels (int64) wrap to valid ones in int32."""
    s["meta"]["packed"] = False
    s["quantized"][0] = (torch.full((32, 16), 2**32 + 1, dtype=torch.int64),
                         s["quantized"][0][1])


def _bitwise(model):
    return {n: (p.dtype, p.shape, p.detach().clone().reshape(-1).view(torch.uint8))
            for n, p in model.named_parameters(remove_duplicate=False)}


def _assert_refused(path, match):
    """One ValueError matching ``match``; every parameter (and the names) bit for bit kept."""
    model = small_mlp()
    before = _bitwise(model)
    with pytest.raises(ValueError, match=match):
        load_diffq_state(model, path)
    after = _bitwise(model)
    assert after.keys() == before.keys()
    for name, (dtype, shape, data) in before.items():
        assert after[name][:2] == (dtype, shape) and torch.equal(after[name][2], data), name


@pytest.mark.parametrize("case, edit, match", [
    # Tensors without usable data: refused before the first weight is written.
    ("uniform4_bitpack", lambda s: s["others"].__setitem__(
        0, torch.empty(s["others"][0].shape, device="meta")), "'others' entry 0.*meta"),
    ("uniform4_bitpack", lambda s: s["others"].__setitem__(0, s["others"][0].to_sparse()),
     "'others' entry 0.*sparse"),
    ("lsq4_bitpack", _set_part(1, lambda t: torch.empty(t.shape, device="meta")),
     "scale.*meta"),
    # Fields of the wrong type: ValueError naming the field, not what Python/torch raise.
    ("diffq_g8_bitpack", _set_kwarg("suffix", ".x"), "'suffix'"),
    ("diffq_g8_bitpack", _set_kwarg("float16", torch.zeros(2)), "'float16' must be a bool"),
    ("diffq_g8_bitpack", _set_kwarg("detect_bound", torch.zeros(2)), "'detect_bound'"),
    ("diffq_g8_bitpack", _set_kwarg("min_size", 10**400), "'min_size' is not a finite"),
    ("diffq_g8_bitpack", _set_kwarg("min_bits", 10**400), "'min_bits' is not a finite"),
    ("diffq_g8_bitpack", _set_kwarg("group_size", True), "'group_size' must be an int"),
    ("diffq_g8_bitpack", _set_kwarg("exclude", [5]), "'exclude' must be a list of strings"),
    ("lsq4_bitpack", _set_kwarg("bits", 10**400), "'bits' is not a finite"),
    ("diffq_g8_bitpack", _set_meta("packed", torch.zeros(2)), "'packed' must be a bool"),
    ("diffq_g8_bitpack", _set_meta("torch_pack", torch.zeros(2)), "'torch_pack' must be"),
    ("diffq_g8_bitpack", _set_meta("klass", []), "unknown quantizer class"),
    ("diffq_g8_bitpack", _set_part(1, (10**400, 1.0)), "'0.weight'.*not a finite"),
    ("diffq_g8_bitpack", _set_part(1, (True, 1.0)), "'0.weight'.*real number"),
    ("lsq4_bitpack", _set_part(1, 10**400), "'0.weight'.*not a finite"),
    ("lsq4_bitpack", _set_part(1, 1e39), "'0.weight'.*float32"),
    # Levels out of range are refused on their own values, before narrowing could wrap them.
    ("diffq_g8_unpacked", _set_part(0, lambda t: t.to(torch.int64) + 2**32),
     "'0.weight'.*outside"),
    ("uniform8_unpacked", _set_part(0, lambda t: t.to(torch.int64) + 2**32),
     "'0.weight'.*outside"),
    ("lsq4_bitpack", _unpacked_lsq, "'0.weight'.*lsq levels"),
    ("diffq_g8_unpacked", _set_part(0, lambda t: t.to(torch.complex64)), "integer tensor"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_hostile_states_raise_one_value_error(tmp_path, case, edit, match):
    _assert_refused(forged(tmp_path, case, edit), match)


def _rezipped(data: bytes, compress_type: int) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename), compress_type=compress_type)
    return out.getvalue()


def _inflated_directory(data: bytes) -> bytes:
    """The archive with its first central directory entry claiming 2 GiB of data."""
    data = bytearray(data)
    at = data.index(b"PK\x01\x02")
    data[at + 24 : at + 28] = (2**31).to_bytes(4, "little")  # uncompressed size
    return bytes(data)


def _legacy(_: bytes) -> bytes:
    out = io.BytesIO()
    torch.save({"quantized": [], "float16": [], "others": [torch.zeros(3)],
                "meta": {"init_kwargs": {}}}, out, _use_new_zipfile_serialization=False)
    return out.getvalue()


@pytest.mark.parametrize("forge, match", [
    (lambda d: _rezipped(d, zipfile.ZIP_DEFLATED), "is compressed"),
    (_inflated_directory, "more than the file"),
    (_legacy, "legacy"),
], ids=["deflated", "sizes beyond the file", "legacy pickle"])
@pytest.mark.parametrize("as_path", [True, False], ids=["path", "file object"])
def test_archives_that_could_inflate_are_refused_before_torch_load(tmp_path, monkeypatch,
                                                                    forge, match, as_path):
    """A deflated zip entry can inflate a thousandfold, entries can claim more than the file
    holds, a legacy file's storages are allocated at their declared sizes: refused first."""
    data = forge((FIXTURES / "diffq024_uniform4_bitpack.th").read_bytes())
    path = tmp_path / "hostile.th"
    path.write_bytes(data)

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load ran on a refused archive")

    monkeypatch.setattr(torch, "load", no_load)
    _assert_refused(path if as_path else io.BytesIO(data), match)


def test_a_file_object_is_read_from_its_position():
    data = (FIXTURES / "diffq024_uniform4_bitpack.th").read_bytes()
    source = io.BytesIO(b"x" * 7 + data)
    source.seek(7)
    model = small_mlp()
    load_diffq_state(model, source)
    expected = torch.load(FIXTURES / "diffq024_uniform4_bitpack.expected.th", weights_only=True)
    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())
