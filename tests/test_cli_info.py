"""``diffq-triton info``: its figures against sizes computed here, JSON, plot, bad files.

The expected figures are computed in this file from the widths the quantizer gives
(``get_bits`` rounded) and spec §3's formula, not through the library's size code.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import zipfile
import zlib

import pytest
import torch
from torch import nn

from diffq_triton import DiffQuantizer, UniformQuantizer, cli, save_quantized

MB_BITS = 2**23


class Net(nn.Module):
    """A tied embedding/output pair, a layer whose size is not a multiple of the group
    size (a shorter last group), a small float layer and BatchNorm buffers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(30, 37)  # 1110 entries: groups of 8 leave a last group of 6
        self.out = nn.Linear(16, 50)
        self.out.weight = self.emb.weight
        self.norm = nn.BatchNorm1d(37)
        self.tiny = nn.Linear(4, 3)  # 12 entries: below min_size, kept in float


def _weights(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied ones once


def _info(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(["info", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err


def _entries(widths: torch.Tensor, numel: int, group: int) -> torch.Tensor:
    """The width of every entry: each group's width repeated over its true length."""
    return widths.repeat_interleave(group)[:numel] if group else widths.expand(numel)


def _histogram(entries: torch.Tensor) -> dict[str, int]:
    """``{"width": entries}`` as the JSON report writes it."""
    values, counts = entries.unique(return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}


@pytest.fixture(scope="module")
def diffq_file(tmp_path_factory):
    torch.manual_seed(0)
    model = Net()
    weights = _weights(model)
    q = DiffQuantizer(model, min_size=0.0005, group_size=8, min_bits=2)
    expected = {}
    with torch.no_grad():
        for i, (name, param) in enumerate(model.named_parameters()):
            if not name.endswith("_diffq"):
                continue
            # A spread of widths by hand: from near min_bits to 14 (a different one per tensor).
            param.copy_(torch.linspace(-3.5 + i, 2.5, param.numel()))
    for name, param in model.named_parameters():
        if name.endswith("_diffq"):
            widths = q.get_bits(param.detach()).round().to(torch.int64)
            weight = model.get_parameter(name.removesuffix("_diffq"))
            expected[name.removesuffix("_diffq")] = (widths, weight.numel())
    path = tmp_path_factory.mktemp("info") / "diffq.safetensors"
    save_quantized(q, path)
    floats = weights - sum(n for _, n in expected.values())
    return path, q, expected, floats, weights


def _expected_bits(expected: dict, floats: int, min_bits: int, group: int = 8) -> int:
    total = 32 * floats
    for widths, numel in expected.values():
        field = math.ceil(math.log2(1 + int(widths.max()) - min_bits))
        total += int(_entries(widths, numel, group).sum()) + 64 + 8 + widths.numel() * field
    return total


def test_diffq_file_table(diffq_file, capsys):
    path, q, expected, floats, weights = diffq_file
    code, out, err = _info([path], capsys)  # min_bits 2 by default, the quantizer's
    assert code == 0 and err == ""
    bits = _expected_bits(expected, floats, min_bits=2)
    assert bits == round(q.true_model_size() * MB_BITS)  # the test's formula is the library's
    size = re.search(r"model size: ([\d.]+) MB \(([\d,]+) bits", out)
    assert int(size[2].replace(",", "")) == bits
    assert float(size[1]) == pytest.approx(bits / MB_BITS, abs=1e-6)
    bpw = re.search(r"([\d.]+) bits per weight over ([\d,]+) weights", out)
    assert float(bpw[1]) == pytest.approx(bits / weights, abs=5e-4)
    assert int(bpw[2].replace(",", "")) == weights
    assert f"file {path.stat().st_size / 2**20:.6f} MB" in out
    assert "tensors: 2 quantized, 6 float, 3 buffers" in out
    for name, (widths, numel) in expected.items():
        entries = _entries(widths, numel, 8)
        levels = -(-int(entries.sum()) // 8)
        field = math.ceil(math.log2(1 + int(widths.max()) - int(widths.min())))
        nbytes = levels + -(-widths.numel() * field // 8)
        line = next(row for row in out.splitlines() if row.startswith(name + " "))
        cells = line.replace(" (= out.weight)", "").split()
        assert cells[1] == "quantized" and cells[3] == "8"
        mean = entries.double().mean().item()
        assert cells[4] == f"{int(widths.min())}/{mean:.2f}/{int(widths.max())}"
        assert len(cells[5]) == int(widths.max()) - int(widths.min()) + 1  # histogram
        assert cells[-1] == f"{nbytes:,}"
    assert "emb.weight (= out.weight)" in out  # the tie is named, its tensor stored once


def test_diffq_file_json(diffq_file, capsys):
    path, _, expected, floats, weights = diffq_file
    code, out, _ = _info([path, "--json", "--min-bits", "12"], capsys)
    report = json.loads(out)
    assert code == 0 and report["exact"] and report["quantized"] == 2
    assert report["min_bits"] == 12
    # Width fields count from min(min_bits, the tensor's smallest width): 3 and 10 here.
    total = 32 * floats
    for name, (widths, numel) in expected.items():
        row = next(t for t in report["tensors"] if t["name"] == name)
        assert row["widths"] == _histogram(_entries(widths, numel, 8))
        assert row["numel"] == numel and row["group_size"] == 8
        assert row["min_width"] == int(widths.min()) and row["max_width"] == int(widths.max())
        total += row["size_bits"]
        field = math.ceil(math.log2(1 + int(widths.max()) - min(12, int(widths.min()))))
        assert row["size_bits"] == int(_entries(widths, numel, 8).sum()) + 72 + (
            widths.numel() * field)
    assert report["size_bits"] == total and report["weights"] == weights
    assert report["bits_per_weight"] == pytest.approx(total / weights)
    kinds = {t["name"]: t["kind"] for t in report["tensors"]}
    assert kinds["norm.running_mean"] == "buffer" and kinds["tiny.weight"] == "float"


def test_uniform_file_float16(tmp_path, capsys):
    torch.manual_seed(1)
    model = Net()
    weights = _weights(model)
    q = UniformQuantizer(model, bits=3, min_size=0.0005, float16=True)
    save_quantized(q, tmp_path / "u.safetensors")
    code, out, _ = _info([tmp_path / "u.safetensors", "--json"], capsys)
    report = json.loads(out)
    quantized = [t for t in report["tensors"] if t["kind"] == "quantized"]
    numels = [t["numel"] for t in quantized]
    assert code == 0 and sorted(numels) == [800, 1110]
    assert all(t["widths"] == {"3": t["numel"]} and t["group_size"] == 0 for t in quantized)
    # 3 bits per entry, the range, and spec §3's width field (8 bits of field size, one
    # group of ceil(log2(1 + 3 - 2)) = 1 bit), which UniformQuantizer's own figure leaves
    # out; the float parameters as float16.
    expected = sum(3 * n + 64 + 8 + 1 for n in numels) + 16 * (weights - sum(numels))
    assert report["size_bits"] == expected
    assert expected == round(q.true_model_size() * MB_BITS) + 9 * len(numels)
    assert {t["dtype"] for t in report["tensors"] if t["kind"] == "float"} == {"float16"}


def test_plot_writes_a_png(diffq_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "widths.png"
    code, _, err = _info([diffq_file[0], "--plot", out], capsys)
    assert code == 0 and err == ""
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(diffq_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    code, out, err = _info([diffq_file[0], "--plot", tmp_path / "w.png"], capsys)
    assert code == 2 and out == "" and "--plot needs matplotlib" in err and "'plot' extra" in err
    assert not (tmp_path / "w.png").exists()


# ------------------------------------------------------------------ diffq 0.2.4 states
def _diffq_state(tmp_path, klass, packed, torch_pack=False, **kwargs):
    diffq = pytest.importorskip("diffq")
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 24), nn.Linear(24, 2))
    q = getattr(diffq, klass)(model, min_size=0.002, **kwargs)
    for i, qp in enumerate(getattr(q, "_qparams", [])):
        if hasattr(qp, "logit"):
            qp.logit.data = torch.linspace(-3 + i, 3, qp.logit.numel())
    path = tmp_path / f"{klass}.th"
    torch.save(q.get_quantized_state(packed=packed, torch_pack=torch_pack), path)
    return path, q


@pytest.mark.parametrize("packed,torch_pack", [(False, False), (True, False), (True, True)],
                         ids=["unpacked", "bitpack", "torch_pack"])
def test_diffq_state(tmp_path, capsys, packed, torch_pack):
    path, q = _diffq_state(tmp_path, "DiffQuantizer", packed, torch_pack, group_size=4)
    code, out, _ = _info([path, "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["quantized"] == 2 and report["float"] == 4
    assert [t["numel"] for t in report["tensors"][:2]] == [2560, 960]
    # Groups of 4 over whole blocks: these streams leave no doubt on the entry counts.
    assert report["exact"] and report["notes"] == []
    assert report["size_bits"] == round(q.true_model_size() * MB_BITS)
    for t, qp in zip(report["tensors"], q._qparams, strict=False):
        widths = (q._get_bits(qp.logit).round()).to(torch.int64)
        assert t["widths"] == _histogram(widths.repeat_interleave(4))


def test_packed_uniform_state_is_an_upper_bound(tmp_path, capsys):
    path, q = _diffq_state(tmp_path, "UniformQuantizer", packed=True, bits=4)
    code, out, _ = _info([path], capsys)
    assert code == 0 and "≤" in out and "upper bounds" in out
    report = json.loads(_info([path, "--json"], capsys)[1])
    assert not report["exact"]
    assert report["size_bits"] >= round(q.true_model_size() * MB_BITS)
    path, q = _diffq_state(tmp_path, "LSQ", packed=False, bits=3)
    report = json.loads(_info([path, "--json"], capsys)[1])
    assert report["exact"] and report["size_bits"] == round(q.true_model_size() * MB_BITS)


# ----------------------------------------------------------------------------- bad files
def _bad_files(tmp_path, good: bytes) -> dict:
    diffq = pytest.importorskip("diffq")
    files = {}

    def write(name, data):
        files[name] = tmp_path / name
        files[name].write_bytes(data)

    write("empty", b"")
    write("truncated", good[: len(good) // 2])
    corrupt = bytearray(good)
    corrupt[12] ^= 0xFF  # inside the JSON header
    write("corrupt_header", bytes(corrupt))
    flipped = bytearray(good)
    flipped[-40] ^= 0x01  # a level bit
    write("flipped_bit", bytes(flipped))
    write("text", b"just some text, not a model\n" * 4)
    torch.save({"weight": torch.ones(3)}, tmp_path / "state_dict")
    files["state_dict"] = tmp_path / "state_dict"
    torch.save({"quantized": "x", "float16": [], "others": [],
                "meta": {"init_kwargs": {}, "klass": diffq.DiffQuantizer}},
               tmp_path / "wrong_structure")
    files["wrong_structure"] = tmp_path / "wrong_structure"
    with zipfile.ZipFile(tmp_path / "other_zip", "w") as z:
        z.writestr("data.txt", "hello")
    files["other_zip"] = tmp_path / "other_zip"
    files["missing"] = tmp_path / "missing"
    files["directory"] = tmp_path
    return files


BAD = {
    "missing": "No such file", "directory": "Is a directory", "empty": "the file is empty",
    "truncated": "data_offsets", "corrupt_header": "file header is not valid JSON",
    "flipped_bit": "checksum mismatch", "text": "neither a diffq-triton file",
    "state_dict": "diffq state must be a dict", "wrong_structure": "'quantized' must be a list",
    "other_zip": "not a loadable diffq state",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file(case, diffq_file, tmp_path, capsys):
    path = _bad_files(tmp_path, diffq_file[0].read_bytes())[case]
    code, out, err = _info([path], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"diffq-triton info: error: {path}: ") and err.count("\n") == 1
    assert BAD[case] in err and "Traceback" not in err


def test_model_free_reading_checks_as_loading(diffq_file, tmp_path):
    from diffq_triton import load_quantized
    from diffq_triton.serialization.file_records import read_records

    files = _bad_files(tmp_path, diffq_file[0].read_bytes())
    for case in ("truncated", "corrupt_header", "flipped_bit"):
        with pytest.raises(ValueError) as without_model:
            read_records(files[case])
        with pytest.raises(ValueError) as with_model:
            load_quantized(Net(), files[case])
        assert str(without_model.value) == str(with_model.value)
    plans = {plan.name: plan for plan in read_records(diffq_file[0])}
    assert plans["emb.weight"].params == ["emb.weight", "out.weight"]
    assert plans["norm.running_var"].buffer and not plans["norm.weight"].buffer


def _with_metadata(data: bytes, edit) -> bytes:
    """``data`` (a file of ours) with its metadata edited by ``edit`` and checksummed again."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    body = json.loads(header["__metadata__"]["diffq_triton"])
    edit(body)
    text = json.dumps(body)
    header["__metadata__"].update(diffq_triton=text, crc32=str(zlib.crc32(text.encode())))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + length :]


def test_forged_shape_is_refused_before_allocating(diffq_file, tmp_path, capsys):
    def forge(body):
        body["quantized"][0].update(shape=[1 << 40], field_bits=0, group_size=1)

    path = tmp_path / "forged.safetensors"
    path.write_bytes(_with_metadata(diffq_file[0].read_bytes(), forge))
    code, _, err = _info([path], capsys)
    assert code == 2 and f"{1 << 40} entries of at least" in err


def test_inconsistent_diffq_streams(tmp_path, capsys):
    path, _ = _diffq_state(tmp_path, "DiffQuantizer", packed=True, group_size=4)
    state = torch.load(path, weights_only=False)
    streams = list(state["quantized"][0][0])
    width = next(i for i, s in enumerate(streams) if s is not None and i + 1 != 2)
    streams[width] = None  # the groups of that width lose their levels
    state["quantized"][0] = (streams, *state["quantized"][0][1:])
    torch.save(state, path)
    code, _, err = _info([path], capsys)
    assert code == 2 and f"no stream for its {width + 1}-bit groups" in err


def test_bad_min_bits_is_a_usage_error(diffq_file, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["info", str(diffq_file[0]), "--min-bits", "0"])
    assert exc.value.code == 2 and "[1, 15]" in capsys.readouterr().err


def test_module_entry_reports_a_bad_file(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00" * 16)
    done = subprocess.run([sys.executable, "-m", "diffq_triton", "info", str(tmp_path / "bad")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
