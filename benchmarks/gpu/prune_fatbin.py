"""Zero the device code a GPU host does not run, so a CUDA library travels small.

    python benchmarks/gpu/prune_fatbin.py LIBRARY.so --keep 90 [--out PRUNED.so]

A CUDA shared library carries its kernels once per architecture in the ELF section .nv_fatbin:
fatbins (magic 0xBA55ED50, a 16-byte header: magic, version, header size, entries' size), each
holding entries (a header with the kind at 0, the header size at 4, the payload size at 8 and the
architecture at 28, then the payload). The CUDA runtime loads the entry of the GPU's architecture
and reads no other, so zeroing the others' payloads leaves a library that loads on that GPU and
compresses to a fraction (Transformer Engine 2.20.2's 327 MB library, eight architectures, to
24 MB with xz at sm_90). Sizes and offsets stay as they were; nothing else in the file changes.
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections import Counter
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50


def _section(data: bytes | bytearray, name: str) -> tuple[int, int]:
    """(file offset, size) of an ELF64 little-endian section by name."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    for head in headers:
        start = names + head[0]
        if data[start:data.index(b"\0", start)].decode() == name:
            return head[4], head[5]
    raise ValueError(f"no {name} section: not a CUDA library")


def prune(data: bytearray, keep: int) -> Counter[int]:
    """Zero, in place, every fatbin entry's payload whose architecture is not `keep`; the payload
    bytes per architecture found (kept and zeroed alike)."""
    pos, size = _section(data, ".nv_fatbin")
    end, found = pos + size, Counter[int]()
    while pos < end:
        magic, _, header, entries = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # padding between fatbins
            continue
        entry, stop = pos + header, pos + header + entries
        while entry < stop:
            head = struct.unpack_from("<I", data, entry + 4)[0]
            payload = struct.unpack_from("<Q", data, entry + 8)[0]
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            found[arch] += payload
            if arch != keep:
                data[entry + head:entry + head + payload] = bytes(payload)
            entry += head + payload
        if entry != stop:
            raise ValueError(f"fatbin at {pos} does not end where its header says")
        pos = stop
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu/prune_fatbin.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("library", type=Path)
    ap.add_argument("--keep", type=int, required=True, help="the architecture to keep, e.g. 90 for H100/H200")
    ap.add_argument("--out", type=Path, help="where the pruned library goes (default: in place)")
    args = ap.parse_args(argv)
    data = bytearray(args.library.read_bytes())
    try:
        found = prune(data, args.keep)
    except (ValueError, struct.error) as exc:  # struct.error: a header runs past the end of the file
        print(f"error: {args.library}: {exc}", file=sys.stderr)
        return 1
    if args.keep not in found:
        print(f"error: {args.library} has no sm_{args.keep} code (it has {sorted(found)}); nothing written", file=sys.stderr)
        return 1
    (args.out or args.library).write_bytes(data)
    zeroed = sum(n for arch, n in found.items() if arch != args.keep)
    print(f"kept sm_{args.keep} ({found[args.keep] / 2**20:.1f} MiB), zeroed {zeroed / 2**20:.1f} MiB of "
          + ", ".join(f"sm_{a}" for a in sorted(found) if a != args.keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
