"""python -m batchnorm demo: a short run through its Python function. Checks the curves it
returns (batch norm reaches the target in fewer steps, lengths, percentiles, the plot
file), determinism, the command line and the message without the demo's dependencies.
Never the wall time."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from batchnorm import __main__ as cli
from batchnorm.tools import demo as _demo

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

STEPS, EVERY, TARGET = 1000, 100, 0.8


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo.png"
    result = _demo.run(STEPS, seed=0, target=TARGET, eval_every=EVERY, output=out, stream=None)
    return result, out


def test_batch_norm_reaches_the_target_in_fewer_steps(short_run):
    result, _ = short_run
    b, p = result.batchnorm.steps_to_target, result.plain.steps_to_target
    assert b is not None
    assert p is None or b < p / 3, (b, p)
    assert result.batchnorm.accuracy[-1] > result.plain.accuracy[-1]
    assert result.batchnorm.accuracy.max() >= 0.9  # a real classifier, not a fluke


def test_curves_have_the_expected_lengths(short_run):
    result, _ = short_run
    n = STEPS // EVERY + 1  # step 0 (the initial network) and every EVERY steps
    for c in (result.plain, result.batchnorm):
        np.testing.assert_array_equal(c.steps, np.arange(0, STEPS + 1, EVERY))
        assert c.accuracy.shape == (n,)
        assert c.loss.shape == (n,)
        assert c.percentiles.shape == (n, 3)
        assert np.all((c.accuracy >= 0) & (c.accuracy <= 1))
        assert np.all(np.diff(c.percentiles, axis=1) >= 0)  # 15th <= 50th <= 85th
        assert np.isnan(c.loss[0])
        assert np.all(np.isfinite(c.loss[1:]))
    # Both start from the same weights: the same network before the first step.
    assert result.plain.accuracy[0] == pytest.approx(result.batchnorm.accuracy[0], abs=0.2)
    assert result.train_size + result.test_size == 1797


def test_the_plot_is_written(short_run):
    result, out = short_run
    assert result.output == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_table_and_summary(short_run):
    result, _ = short_run
    table = _demo.table(result)
    assert "without BN" in table
    assert "steps to 80% accuracy" in table
    (row,) = [line for line in table.splitlines() if line.startswith("steps to")]
    assert row.split()[-2:] == [str(result.plain.steps_to_target), str(result.batchnorm.steps_to_target)]
    assert "fewer steps" in _demo.summary(result) or "not within" in _demo.summary(result)


def test_deterministic_with_a_seed():
    a = _demo.run(40, seed=3, eval_every=10, stream=None)
    b = _demo.run(40, seed=3, eval_every=10, stream=None)
    c = _demo.run(40, seed=4, eval_every=10, stream=None)
    for x, y in ((a.plain, b.plain), (a.batchnorm, b.batchnorm)):
        np.testing.assert_array_equal(x.accuracy, y.accuracy)
        np.testing.assert_array_equal(x.percentiles, y.percentiles)
        np.testing.assert_array_equal(x.loss, y.loss)
    assert not np.array_equal(a.batchnorm.percentiles, c.batchnorm.percentiles)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli.png"
    rc = cli.main(["demo", "--steps", "30", "--learning-rate", "0.5", "--seed", "1", "--output", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "steps to 90% accuracy" in captured.out
    assert f"Plot saved to {out}" in captured.out
    assert "with batch norm" in captured.err  # the progress bars
    assert out.exists()


def test_bad_arguments(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "0", "--output", str(tmp_path / "x.png")]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="learning_rate"):
        _demo.run(10, learning_rate=-1.0, stream=None)
    with pytest.raises(ValueError, match="target"):
        _demo.run(10, target=1.5, stream=None)
    with pytest.raises(ValueError, match="batch_size"):
        _demo.run(10, batch_size=5000, stream=None)


def test_says_what_to_install_without_the_dependencies(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "scikit-learn and matplotlib" in err
    assert 'pip install "batchnorm[demo]"' in err
    with pytest.raises(ImportError, match=r"batchnorm\[demo\]"):
        _demo.run(10, stream=None)
