"""benchmarks/gpu/prune_fatbin.py: the device code of other architectures zeroed, nothing else moved."""

from __future__ import annotations

import struct

from benchmarks.gpu import prune_fatbin


def _entry(arch: int, payload: bytes) -> bytes:
    head = bytearray(64)
    struct.pack_into("<HHIQ", head, 0, 2, 0x0101, 64, len(payload))  # kind ELF, version, header, payload
    struct.pack_into("<I", head, 28, arch)
    return bytes(head) + payload


def _fatbin(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", prune_fatbin.FATBIN_MAGIC, 1, 16, len(body)) + body


def _library(section: bytes) -> bytearray:
    """A 64-bit ELF with the sections null, .nv_fatbin and .shstrtab."""
    names = b"\0.nv_fatbin\0.shstrtab\0"
    fat_at = 64
    names_at = fat_at + len(section)
    headers_at = names_at + len(names)
    elf = bytearray(b"\x7fELF\x02\x01\x01" + bytes(57))
    struct.pack_into("<Q", elf, 0x28, headers_at)
    struct.pack_into("<HHH", elf, 0x3A, 64, 3, 2)
    sections = [bytes(64),
                struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, fat_at, len(section), 0, 0, 8, 0),
                struct.pack("<IIQQQQIIQQ", 12, 3, 0, 0, names_at, len(names), 0, 0, 1, 0)]
    return elf + section + names + b"".join(sections)


def test_other_architectures_are_zeroed_and_the_kept_one_is_untouched(tmp_path) -> None:
    hopper, ampere, blackwell = b"H" * 40, b"A" * 24, b"B" * 56
    section = _fatbin(_entry(80, ampere), _entry(90, hopper)) + bytes(8) + _fatbin(_entry(100, blackwell))
    original = _library(section)
    path = tmp_path / "lib.so"
    path.write_bytes(original)
    assert prune_fatbin.main([str(path), "--keep", "90"]) == 0
    pruned = path.read_bytes()
    assert len(pruned) == len(original)
    assert hopper in pruned and ampere not in pruned and blackwell not in pruned
    # only payload bytes changed: every header, the padding and the ELF around them as they were
    changed = [i for i, (a, b) in enumerate(zip(original, pruned, strict=True)) if a != b]
    assert len(changed) == len(ampere) + len(blackwell)
    assert prune_fatbin.prune(bytearray(pruned), 90) == {80: 24, 90: 40, 100: 56}


def test_a_library_without_the_kept_architecture_is_left_as_it_was(tmp_path, capsys) -> None:
    path = tmp_path / "lib.so"
    path.write_bytes(_library(_fatbin(_entry(80, b"A" * 16))))
    before = path.read_bytes()
    assert prune_fatbin.main([str(path), "--keep", "90"]) == 1
    assert path.read_bytes() == before
    assert "no sm_90 code" in capsys.readouterr().err


def test_a_file_that_is_not_a_cuda_library_is_refused(tmp_path, capsys) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"plain text, not an ELF file")
    assert prune_fatbin.main([str(path), "--keep", "90"]) == 1
    assert "not a 64-bit little-endian ELF" in capsys.readouterr().err


def test_a_truncated_library_is_refused_without_a_traceback(tmp_path, capsys) -> None:
    whole = _library(_fatbin(_entry(90, b"H" * 32)))
    path = tmp_path / "lib.so"
    path.write_bytes(whole[:0x30])  # cut inside the ELF header, before the section table
    assert prune_fatbin.main([str(path), "--keep", "90"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {path}:")
