"""Hostile files for BatchNormalization.load: each must be refused with ValueError quickly,
without allocating what the file claims (the tampered sizes reach 2^40 elements and 4 GB).

The loads run in a child Python whose address space is capped at 2 GiB, so a regression
shows as a MemoryError (not ValueError) instead of exhausting the machine; the child also
reports each load's tracemalloc peak and time.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

import batchnorm as bn

LIMIT = 2 << 30  # the child's address space
MAX_PEAK = 32 << 20  # what a refusal may allocate (the good file's arrays are a few hundred bytes)
MAX_SECONDS = 5.0  # generous: the machine is shared; a refusal takes milliseconds


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _write(path: Path, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name + ".npy", data)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _deflate_bomb(header: bytes, nbytes: int) -> bytes:
    """A raw deflate stream of `header` then `nbytes` zero bytes, about nbytes/1000 long:
    after a full flush the compressor emits the same bytes for the same 64 KiB block,
    so the block is compressed once and repeated."""
    block = 1 << 16
    assert nbytes % block == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    zeros = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    return head + zeros * (nbytes // block) + c.flush()


def _make_deflated(path: Path, entries: dict[str, bytes], name: str, header: bytes, nbytes: int) -> None:
    """`entries` plus `name`: a deflated entry whose zip headers say it inflates to
    len(header) + nbytes bytes (the CRC is left 0: no reader gets that far)."""
    stream = _deflate_bomb(header, nbytes)
    _write(path, {**entries, name: stream})
    raw = bytearray(path.read_bytes())
    size = len(header) + nbytes
    assert size < 2**32  # no zip64 fields to patch
    fname = (name + ".npy").encode()
    local = 0
    while True:
        local = raw.index(b"PK\x03\x04", local)
        n = struct.unpack_from("<H", raw, local + 26)[0]
        if raw[local + 30 : local + 30 + n] == fname:
            break
        local += 4
    struct.pack_into("<HHH", raw, local + 8, zipfile.ZIP_DEFLATED, 0, 0)  # method, mtime, mdate
    struct.pack_into("<III", raw, local + 14, 0, len(stream), size)  # crc, compressed, uncompressed
    central = raw.index(b"PK\x01\x02")
    while True:
        n = struct.unpack_from("<H", raw, central + 28)[0]
        if raw[central + 46 : central + 46 + n] == fname:
            break
        central = raw.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<H", raw, central + 10, zipfile.ZIP_DEFLATED)
    struct.pack_into("<III", raw, central + 16, 0, len(stream), size)
    path.write_bytes(bytes(raw))


def _nested_entries(prefix: dict[str, bytes], names: list[str], inner: int) -> bytes:
    """A zip whose stored entries nest: each one's data (a uint8 .npy) holds the local
    header and data of the next, so reading them all reads the innermost bytes
    len(names) times. CRCs are right: a reader that reads everything succeeds."""
    out = bytearray()
    records = []

    def local(name: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(data)
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, len(data), len(data), len(name), 0) + name

    for name, data in prefix.items():  # ordinary entries first
        records.append((name.encode() + b".npy", len(out), data))
        out += local(records[-1][0], data) + data
    # Built from the inside out: the innermost entry, then each wrapper around it.
    chain = b""
    entries = []
    for i, name in enumerate(reversed(names)):
        payload = chain if i else bytes(inner)
        data = _npy_header((len(payload),), "|u1") + payload
        fname = name.encode() + b".npy"
        entries.append((fname, data))
        chain = local(fname, data) + data
    start = len(out)
    offset = start
    for fname, data in reversed(entries):  # outermost first, each inside the one before
        records.append((fname, offset, data))
        offset += 30 + len(fname) + len(_npy_header((1,), "|u1"))
    out += chain
    central = bytearray()
    for fname, off, data in records:
        crc = zlib.crc32(data)
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, crc, len(data), len(data), len(fname), 0, 0, 0, 0, 0,
            off,
        ) + fname  # fmt: skip
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central), len(out), 0)
    return bytes(out + central + end)


def hostile_files(directory: Path) -> dict[str, Path]:
    layer = bn.BatchNormalization()
    layer.build((None, 3))
    good = directory / "good.npz"
    layer.save(good)
    with np.load(good) as f:
        config, meta = json.loads(str(f["config"][()])), json.loads(str(f["meta"][()]))
        weights = {k: _npy(np.array(f[k])) for k in f.files if k.startswith("weight:")}
    base = {"config": _npy(np.array(json.dumps(config))), "meta": _npy(np.array(json.dumps(meta)))}

    def with_meta(**changes: Any) -> dict[str, bytes]:
        return {**base, "meta": _npy(np.array(json.dumps({**meta, **changes}))), **weights}

    files: dict[str, Path] = {}

    def put(name: str, entries: dict[str, bytes]) -> None:
        files[name] = directory / f"{name}.npz"
        _write(files[name], entries)

    put("input-shape-60M", with_meta(input_shape=[None, 60_000_000]))
    put("input-shape-2^40", with_meta(input_shape=[None, 2**40]))
    put("npy-header-2^40", {**with_meta(), "weight:gamma": _npy_header((2**40,)) + bytes(12)})
    put("deep-json", {**base, "config": _npy(np.array("[" * 200_000)), **weights})
    # Ten weight entries nested in each other: 4 MB read ten times over.
    files["nested-entries"] = directory / "nested-entries.npz"
    files["nested-entries"].write_bytes(_nested_entries(with_meta(), [f"weight:extra{i}" for i in range(10)], 2**22))
    # A consistent-looking 1 G-channel layer whose gamma entry is 4 MB deflated, 4 GB inflated.
    n = 2**30 - 2**14
    files["deflated-4GB"] = directory / "deflated-4GB.npz"
    entries = with_meta(input_shape=[None, n])
    del entries["weight:gamma"]
    _make_deflated(files["deflated-4GB"], entries, "weight:gamma", _npy_header((n,)), 4 * n)
    return files


_CHILD = """
import json, resource, sys, time, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
import batchnorm as bn
for name, path in json.loads(sys.argv[1]).items():
    tracemalloc.start()
    t = time.perf_counter()
    try:
        bn.BatchNormalization.load(path)
        err = None
    except BaseException as e:
        err = [type(e).__name__, str(e)[:300]]
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps([name, err, peak, seconds]), flush=True)
"""


def test_hostile_files_are_refused_quickly_and_without_allocating(tmp_path: Path) -> None:
    files = hostile_files(tmp_path)
    assert files["deflated-4GB"].stat().st_size < 6 << 20
    with zipfile.ZipFile(files["deflated-4GB"]) as zf:
        assert zf.getinfo("weight:gamma.npy").file_size > 4 * 10**9  # what a zip reader would inflate
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(limit=LIMIT), json.dumps({k: str(v) for k, v in files.items()})],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r[0]: r[1:] for r in map(json.loads, proc.stdout.splitlines())}
    assert sorted(results) == sorted(files)
    problems = []
    for name, (err, peak, seconds) in results.items():
        if err is None or err[0] != "ValueError":
            problems.append(f"{name}: {err or 'loaded'}")
        elif peak >= MAX_PEAK or seconds >= MAX_SECONDS:
            problems.append(f"{name}: allocated {peak} bytes and took {seconds:.1f} s before refusing")
    assert not problems, "\n".join(problems)
