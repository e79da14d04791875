"""Atomic save of save_quantized (atomic_file.write_atomic, _replace).

A save writes a hidden ``.partial`` file next to the target and renames it over the target
(by a renameat2 exchange where Linux has one, else os.replace): readers and a failed save
never see a half-written file, and the folder is left with no partial file either way.
"""

from __future__ import annotations

import io
import os

import pytest
import torch

import diffq_triton as dq
from diffq_triton import serialization
from diffq_triton.serialization import atomic_file
from tests.models import mlp

OLD = b"the previous file, which a failed save must leave byte for byte\n"


@pytest.fixture
def quantizer():
    """A DiffQuantizer on a small MLP (seeded, so its file bytes are reproducible)."""
    torch.manual_seed(0)
    return dq.DiffQuantizer(mlp(), min_size=0.0, group_size=8)


def partials(folder) -> list[str]:
    """Names of the save's temporary files left in ``folder``."""
    return [name for name in os.listdir(folder) if name.endswith(".partial")]


def load_matches(quantizer, path) -> bool:
    """Whether ``path`` loads into a fresh MLP with the weights the quantizer would use."""
    fresh = mlp()
    serialization.load_quantized(fresh, path)
    quantizer.quantize()
    try:
        # The quantized model also holds the quantizer's own parameters: compare by name.
        used = dict(quantizer.model.named_parameters())
        return all(torch.equal(p, used[name]) for name, p in fresh.named_parameters())
    finally:
        quantizer.unquantize()


class FailingWriter:
    """A file wrapper whose ``writelines`` writes the first chunk, then fails as a full disk
    (or an interrupt) would, so the partial file holds some bytes when the error rises."""

    def __init__(self, file, error: BaseException):
        self.file, self.error = file, error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def writelines(self, chunks):
        chunks = iter(chunks)
        self.file.write(next(chunks))
        self.file.flush()
        raise self.error


def test_save_to_new_path(quantizer, tmp_path):
    path = tmp_path / "model.safetensors"
    serialization.save_quantized(quantizer, path)
    assert path.read_bytes() == serialization.file_bytes(quantizer)
    assert partials(tmp_path) == []
    assert load_matches(quantizer, path)


def test_save_to_bare_relative_name(quantizer, tmp_path, monkeypatch):
    # No folder part: the partial file goes in the working directory.
    monkeypatch.chdir(tmp_path)
    serialization.save_quantized(quantizer, "model.safetensors")
    assert (tmp_path / "model.safetensors").read_bytes() == serialization.file_bytes(quantizer)
    assert partials(tmp_path) == []


def test_save_over_existing_replaces_content(quantizer, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(OLD * 1000)  # longer than the new file: no stale tail may survive
    serialization.save_quantized(quantizer, path)
    assert path.read_bytes() == serialization.file_bytes(quantizer)
    assert partials(tmp_path) == []
    # Twice over: the file replaced by the first save is itself replaced cleanly.
    serialization.save_quantized(quantizer, str(path))
    assert path.read_bytes() == serialization.file_bytes(quantizer)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   KeyboardInterrupt()], ids=["enospc", "interrupt"])
def test_failed_write_keeps_previous_file(quantizer, tmp_path, monkeypatch, error):
    path = tmp_path / "model.safetensors"
    path.write_bytes(OLD)
    fdopen = os.fdopen
    monkeypatch.setattr(atomic_file.os, "fdopen",
                        lambda *a, **k: FailingWriter(fdopen(*a, **k), error))
    with pytest.raises(type(error)):
        serialization.save_quantized(quantizer, path)
    assert path.read_bytes() == OLD
    assert partials(tmp_path) == []


def test_failing_payload_keeps_previous_file(tmp_path):
    # A chunk source that fails half way (a payload that cannot be read) aborts the save.
    def chunks():
        yield b"x" * 4096
        raise RuntimeError("payload failed")

    path = tmp_path / "model.safetensors"
    path.write_bytes(OLD)
    with pytest.raises(RuntimeError, match="payload failed"):
        atomic_file.write_atomic(path, chunks())
    assert path.read_bytes() == OLD
    assert partials(tmp_path) == []


def test_failed_write_to_new_path_leaves_nothing(tmp_path):
    def chunks():
        yield b"x"
        raise RuntimeError("payload failed")

    with pytest.raises(RuntimeError):
        atomic_file.write_atomic(tmp_path / "model.safetensors", chunks())
    assert os.listdir(tmp_path) == []


def test_fallback_without_renameat2(quantizer, tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_file, "_RENAMEAT2", None)
    path = tmp_path / "model.safetensors"
    path.write_bytes(OLD)
    serialization.save_quantized(quantizer, path)
    assert path.read_bytes() == serialization.file_bytes(quantizer)
    assert partials(tmp_path) == []


def test_fallback_when_renameat2_fails(quantizer, tmp_path, monkeypatch):
    # A filesystem without RENAME_EXCHANGE (EINVAL) or an old kernel (ENOSYS): the call
    # fails and leaves both names as they were, so os.replace must still do the job.
    calls = []

    def failing(*args):
        """renameat2 stub that fails as an unsupporting filesystem does."""
        calls.append(args)
        return -1

    monkeypatch.setattr(atomic_file, "_RENAMEAT2", failing)
    path = tmp_path / "model.safetensors"
    path.write_bytes(OLD)
    serialization.save_quantized(quantizer, path)
    assert len(calls) == 1
    assert path.read_bytes() == serialization.file_bytes(quantizer)
    assert partials(tmp_path) == []


def test_new_path_does_not_exchange(quantizer, tmp_path, monkeypatch):
    # There is nothing to exchange with: a stub that would succeed must not be called.
    def exchange(*args):
        """renameat2 stub that must not run."""
        raise AssertionError("exchange with a missing file")

    monkeypatch.setattr(atomic_file, "_RENAMEAT2", exchange)
    path = tmp_path / "model.safetensors"
    serialization.save_quantized(quantizer, path)
    assert path.read_bytes() == serialization.file_bytes(quantizer)


@pytest.mark.skipif(atomic_file._RENAMEAT2 is None, reason="no renameat2 on this system")
def test_exchange_unlinks_previous_file(quantizer, tmp_path):
    # The exchange leaves the old content under the partial name: it must be removed.
    path = tmp_path / "model.safetensors"
    path.write_bytes(OLD)
    serialization.save_quantized(quantizer, path)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert path.read_bytes() == serialization.file_bytes(quantizer)


@pytest.mark.parametrize("exchange", ["renameat2", "replace"])
def test_save_over_directory_fails_and_keeps_it(quantizer, tmp_path, monkeypatch, exchange):
    # open() and os.replace refuse a directory; the exchange would swap the directory away
    # under the hidden partial name and report success.
    if exchange == "replace":
        monkeypatch.setattr(atomic_file, "_RENAMEAT2", None)
    elif atomic_file._RENAMEAT2 is None:
        pytest.skip("no renameat2 on this system")
    path = tmp_path / "model.safetensors"
    path.mkdir()
    (path / "inside.txt").write_bytes(OLD)
    with pytest.raises(OSError):
        serialization.save_quantized(quantizer, path)
    assert (path / "inside.txt").read_bytes() == OLD
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_permissions_follow_umask(quantizer, tmp_path, mask):
    previous = os.umask(mask)
    try:
        reference = tmp_path / "by_open"
        with open(reference, "wb") as f:
            f.write(b"x")
        path = tmp_path / "model.safetensors"
        serialization.save_quantized(quantizer, path)
        replaced = tmp_path / "replaced.safetensors"
        replaced.write_bytes(OLD)
        serialization.save_quantized(quantizer, replaced)
    finally:
        os.umask(previous)
    expected = reference.stat().st_mode
    assert path.stat().st_mode == expected
    assert replaced.stat().st_mode == expected


def test_save_to_file_object(quantizer):
    buffer = io.BytesIO()
    serialization.save_quantized(quantizer, buffer)
    assert buffer.getvalue() == serialization.file_bytes(quantizer)
    assert load_matches(quantizer, io.BytesIO(buffer.getvalue()))
