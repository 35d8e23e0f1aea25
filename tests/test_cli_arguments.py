"""Every bad argument of ``python -m batchnorm bench`` / ``demo`` gets argparse's usage and
one-line error (exit status 2) before any work starts - no traceback, no run that fails
only at its end."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from batchnorm.__main__ import main
from batchnorm.tools import bench, demo


@pytest.fixture
def no_work(monkeypatch):
    """Starting a run fails the test: the arguments must be refused before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(bench, "run", refuse)
    monkeypatch.setattr(demo, "run", refuse)


def _files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "binary").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "huge").write_text("huge  1000000x1000000x1000  1  large\n")
    (tmp_path / "a-file").write_text("")
    return {
        "missing": str(tmp_path / "missing.txt"),
        "binary": str(tmp_path / "binary"),
        "dir": str(tmp_path),
        "huge": str(tmp_path / "huge"),
        "unwritable": str(tmp_path / "a-file" / "out"),  # a file's "subdirectory": unwritable even as root
        "no-dir": str(tmp_path / "no" / "such" / "dir" / "out"),
    }


BAD = [
    (["bench", "--footprint", "nan"], r"argument --footprint: must be a finite number"),
    (["bench", "--footprint", "inf"], r"argument --footprint: must be a finite number"),
    (["bench", "--footprint", "-1"], r"argument --footprint: must be a finite number >= 0"),
    (["bench", "--gap", "nan"], r"argument --gap: must be a finite number"),
    (["bench", "--threads", str(2**40)], r"argument --threads: expected integers from 1 to 1024"),
    (["bench", "--threads", "0"], r"argument --threads: expected integers from 1 to 1024"),
    (["bench", "--seed", "-1"], r"argument --seed: --seed must be >= 0"),
    (["bench", "--shapes-file", "{missing}"], r"--shapes-file .*missing\.txt.*: No such file"),
    (["bench", "--shapes-file", "{binary}"], r"--shapes-file .*binary.* is not a text file"),
    (["bench", "--shapes-file", "{dir}"], r"--shapes-file .*: Is a directory"),
    (["bench", "--shapes-file", "{huge}"], r"shape huge \(1000000x1000000x1000\) needs .* GiB per float32 buffer"),
    (["bench", "--shapes-file", "/dev/zero"], r"--shapes-file '/dev/zero' is larger than"),
    (["bench", "--quick", "--json", "{unwritable}"], r"argument --json: cannot write"),
    (["bench", "--quick", "--json", "{no-dir}"], r"argument --json: cannot write .*No such file or directory"),
    (["bench", "--quick", "--json", "{dir}"], r"argument --json: .* is a directory"),
    (["bench", "--quick", "--png", "{unwritable}"], r"argument --png: cannot write"),
    (["bench", "--quick", "--modes", "sideways"], r"--modes takes a comma-separated subset"),
    (["bench", "--quick", "--dtypes", "float8"], r"unknown dtypes \['float8'\]"),
    (["bench", "--quick", "--shapes", "nothing"], r"no shape matches 'nothing'"),
    (["bench", "--quick", "--rounds", "0"], r"--repeats and --rounds must be >= 1"),
    (["demo", "--output", "{unwritable}"], r"argument --output: cannot write"),
    (["demo", "--output", "{dir}"], r"argument --output: .* is a directory"),
    (["demo", "--steps", "0"], r"argument --steps: steps must be >= 1"),
    (["demo", "--steps", str(2**40)], r"argument --steps: steps must be <= 10000000"),
    (["demo", "--learning-rate", "nan"], r"argument --learning-rate: must be a finite number > 0"),
    (["demo", "--learning-rate", "-1"], r"argument --learning-rate: must be a finite number > 0"),
    (["demo", "--target", "1.5"], r"argument --target: must be a finite number > 0 and <= 1"),
    (["demo", "--seed", "-3"], r"argument --seed: --seed must be >= 0"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_gets_argparses_one_line_error_before_any_work(argv, message, tmp_path, capsys, no_work):
    files = _files(tmp_path)
    argv = [a.format(**files) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("usage: python -m batchnorm ")
    last = err.rstrip("\n").splitlines()[-1]
    assert re.match(rf"python -m batchnorm (bench|demo): error: .*{message}", last), err
    assert not Path(files["no-dir"]).parent.exists()


def test_checking_a_writable_path_leaves_nothing_behind(tmp_path, capsys, no_work):
    out = tmp_path / "report.json"
    with pytest.raises(AssertionError, match="the run started"):  # the arguments passed
        main(["bench", "--quick", "--json", str(out)])
    assert not out.exists()
    existing = tmp_path / "old.json"
    existing.write_text("keep me")
    with pytest.raises(AssertionError, match="the run started"):
        main(["bench", "--quick", "--json", str(existing)])
    assert existing.read_text() == "keep me"


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("sklearn", "matplotlib")), reason="the demo needs both"
)
def test_demo_prints_the_name_of_the_file_it_wrote(tmp_path, capsys):
    out = tmp_path / "run1"  # no extension: saved under exactly this name
    assert main(["demo", "--steps", "5", "--output", str(out)]) == 0
    printed = re.search(r"Plot saved to (.+)", capsys.readouterr().out)
    assert printed is not None
    assert printed.group(1) == str(out)
    assert Path(printed.group(1)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run1"]
