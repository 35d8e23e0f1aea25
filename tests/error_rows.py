"""How a row of the bad-input table (tests/test_bad_input.py) is run.

A row passes when its call raises exactly the expected exception type with a message
matching the regex (so the message names the problem), and nothing changed:

* a layer in the arguments (a ``Layer`` placeholder, made fresh for the row: built,
  trained twice and back-propagated, so every piece of state is populated) is
  bit-for-bit unchanged - weights, moving/running statistics, counters, the built flag,
  gradients, the saved last call, the configuration (see ``layer_state.snapshot``);
* every NumPy array passed in (inputs, ``out=``, per-channel arrays) holds the same bytes;
* the library's thread count is the same.

Rows where a crash is conceivable are ``isolated``: they run in a child Python
(``run_isolated``), so a segfault fails that row instead of killing the test run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import batchnorm as bn
from layer_state import assert_same_state, make_layer, snapshot

HERE = Path(__file__).resolve().parent


# ---- placeholders, made when a row runs ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
    """The layer under test: a fresh layer of `kind` (see layer_state.LAYER_KINDS).

    trained=False: a new, unbuilt layer; ``init``: a new BatchNormalization(**init)
    instead; ``build``: then built for that shape (never called). ``setup`` runs on it
    before the snapshot (e.g. to set eps=0 or a bad gradient)."""

    kind: str
    trained: bool = True
    init: dict[str, Any] | None = None
    build: tuple[int | None, ...] | None = None
    setup: Callable[[Any], Any] | None = None

    def make(self) -> Any:
        if self.init is not None:
            layer = bn.BatchNormalization(**self.init)
        else:
            layer = make_layer(self.kind, trained=self.trained)
        if self.build is not None:
            layer.build(self.build)
        if self.setup is not None:
            self.setup(layer)
        return layer


@dataclasses.dataclass(frozen=True)
class File:
    """A file written for the row into a fresh directory (see write_bad_files)."""

    name: str


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    call: Callable[..., Any] | str  # a function, or the name of a method of the Layer argument
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    exc: type[BaseException]
    match: str
    isolated: bool = False


def write_bad_files(directory: Path) -> dict[str, Path]:
    """.npz files that are not what save() writes (and one .npy), by name."""
    layer = make_layer("keras")
    good = directory / "good.npz"
    layer.save(good)
    raw = good.read_bytes()
    with np.load(good) as f:
        config, meta = str(f["config"][()]), str(f["meta"][()])
        weights = {k: np.array(f[k]) for k in f.files if k.startswith("weight:")}
    files: dict[str, Path] = {}

    def put(name: str, data: bytes | None = None, **arrays: Any) -> None:
        p = directory / f"{name}.npz"
        if data is not None:
            p.write_bytes(data)
        else:
            np.savez(p, **arrays)
        files[name] = p

    put("empty", b"")
    put("truncated-head", raw[:100])
    put("truncated-half", raw[: len(raw) // 2])
    put("truncated-tail", raw[:-10])
    corrupt = bytearray(raw)
    for i in range(200, 260):  # inside the first member's data: a CRC error when read
        corrupt[i] ^= 0xFF
    put("corrupt", bytes(corrupt))
    put("text", b"hello world, not a zip file")
    put("foreign", a=np.ones(3))
    put("config-only", config=np.array(config))
    put("bad-json", config=np.array("{"), meta=np.array(meta))
    put("meta-not-a-dict", config=np.array(config), meta=np.array("[1]"))
    put("config-not-a-dict", config=np.array("[1]"), meta=np.array(meta))
    put("config-numbers", config=np.ones(3), meta=np.array(meta))
    put("other-class", config=np.array(config), meta=np.array(json.dumps({**json.loads(meta), "class": "Other"})))
    put("other-format", config=np.array(config), meta=np.array(json.dumps({**json.loads(meta), "format": 99})))
    put(
        "config-bad-value",
        config=np.array(json.dumps({**json.loads(config), "momentum": 5})),
        meta=np.array(meta),
        **weights,
    )
    put(
        "config-unknown-key",
        config=np.array(json.dumps({**json.loads(config), "foo": 1})),
        meta=np.array(meta),
        **weights,
    )
    put(
        "input-shape-str",
        config=np.array(config),
        meta=np.array(json.dumps({**json.loads(meta), "input_shape": "ab"})),
        **weights,
    )
    put("weights-missing", config=np.array(config), meta=np.array(meta))
    put("weight-shape", config=np.array(config), meta=np.array(meta), **{**weights, "weight:gamma": np.ones(4)})
    put("weight-str", config=np.array(config), meta=np.array(meta), **{**weights, "weight:gamma": np.array(["a"] * 3)})
    put(
        "weight-complex",
        config=np.array(config),
        meta=np.array(meta),
        **{**weights, "weight:gamma": np.ones(3, complex)},
    )
    put(
        "input-shape-huge",
        config=np.array(config),
        meta=np.array(json.dumps({**json.loads(meta), "input_shape": [None, 2**40]})),
        **weights,
    )
    put("compressed", data=_compressed(config=np.array(config), meta=np.array(meta), **weights))
    npy = directory / "array.npy"
    np.save(npy, np.ones(3))
    files["npy"] = npy
    return files


def _compressed(**arrays: Any) -> bytes:
    """What np.savez_compressed writes: save()'s arrays, deflated."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


# ---- running a row ------------------------------------------------------------------------------


def _materialize(value: Any, files: dict[str, Path], made: list[Any]) -> Any:
    if isinstance(value, Layer):
        layer = value.make()
        made.append(layer)
        return layer
    if isinstance(value, File):
        return files[value.name]
    if isinstance(value, list) and any(isinstance(v, (Layer, File)) for v in value):
        return [_materialize(v, files, made) for v in value]
    return value


def _array_bytes(values: list[Any]) -> list[tuple[int, bytes]]:
    out = []
    for v in values:
        if isinstance(v, np.ndarray) and v.dtype != object and v.size < 2**20:
            out.append((id(v), v.tobytes()))
        elif isinstance(v, (list, tuple)):
            out.extend(_array_bytes(list(v)))
        elif isinstance(v, dict):
            out.extend(_array_bytes(list(v.values())))
    return out


def check_row(r: Row, directory: Path) -> None:
    """Runs one row: the expected exception and message, and nothing changed."""
    files = write_bad_files(directory) if any(isinstance(a, File) for a in r.args) else {}
    made: list[Any] = []
    args = [_materialize(a, files, made) for a in r.args]
    kwargs = {k: _materialize(v, files, made) for k, v in r.kwargs.items()}
    states = [snapshot(layer) for layer in made]
    values = [*args, *kwargs.values()]
    arrays = _array_bytes(values)
    threads = bn.get_num_threads()
    call: Callable[..., Any] = getattr(args[0], r.call) if isinstance(r.call, str) else r.call
    if isinstance(r.call, str):
        args = args[1:]
    with pytest.raises(BaseException) as info:  # noqa: PT011 - the exact type is checked below
        call(*args, **kwargs)
    err = info.value
    assert type(err) is r.exc, f"{r.id}: raised {type(err).__name__}: {err}; expected {r.exc.__name__}"
    assert info.match(r.match), f"{r.id}: message {str(err)!r} does not match {r.match!r}"
    for layer, before in zip(made, states, strict=True):
        assert_same_state(before, snapshot(layer))
    assert _array_bytes(values) == arrays, f"{r.id}: an argument array was written"
    assert bn.get_num_threads() == threads, f"{r.id}: the thread count changed"


def run_in_child(rows: list[Row], row_ids: list[str], directory: str) -> None:
    """The child process of the isolated rows: runs them in turn, one result line each
    (START before a row, so a row that kills the process is known)."""
    by_id = {r.id: r for r in rows}
    for row_id in row_ids:
        print("START", json.dumps(row_id), flush=True)
        try:
            check_row(by_id[row_id], Path(directory))
        except BaseException as e:  # report and go on with the next row
            print("FAIL", json.dumps([row_id, f"{type(e).__name__}: {e}"]), flush=True)
        else:
            print("OK", json.dumps(row_id), flush=True)


def run_isolated(row_ids: list[str], directory: Path, env: dict[str, str] | None = None) -> dict[str, str | None]:
    """Runs rows of test_bad_input.ROWS in child processes (one child for all, a new one
    after a crash): row id -> None (passed) or what went wrong."""
    results: dict[str, str | None] = {}
    pending = list(row_ids)
    while pending:
        code = (
            f"import sys; sys.path.insert(0, {str(HERE)!r}); import error_rows, test_bad_input; "
            f"error_rows.run_in_child(test_bad_input.ROWS, {pending!r}, {str(directory)!r})"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False, env=env
        )
        started = None
        for line in proc.stdout.splitlines():
            tag, _, payload = line.partition(" ")
            if tag == "START":
                started = json.loads(payload)
            elif tag == "OK":
                results[json.loads(payload)] = None
                started = None
            elif tag == "FAIL":
                row_id, message = json.loads(payload)
                results[row_id] = message
                started = None
        if started is not None or proc.returncode != 0:
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
            results[started or pending[0]] = f"the child process died ({how}):\n{proc.stderr[-3000:]}"
        pending = [i for i in pending if i not in results]
    return results
