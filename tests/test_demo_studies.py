"""python -m batchnorm demo --all / --study: a shortened run of every study through the command
line (three tables with numbers, one figure with a panel per study), the networks and inputs
the studies train on against float64 references, and the tables' "diverged" and median cells.
Never the wall time, nor which setting wins."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from batchnorm import __main__ as cli
from batchnorm import optimizers
from batchnorm.tools import demo as _demo
from batchnorm.tools import demo_studies as _studies

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TITLES = {"scaling": "Input scaling:", "placement": "Placement (", "optimizers": "Optimizer of gamma and beta"}
ROWS = {"scaling": 5, "placement": 2, "optimizers": 4}
NUMBER = r"(>?\d+(\.\d+)?)"


@pytest.fixture
def figures(monkeypatch):
    """The figures the command line makes, kept to count their axes."""
    made = []

    def keep(*args, **kwargs):
        fig = figure(*args, **kwargs)
        made.append(fig)
        return fig

    figure = _studies.figure
    monkeypatch.setattr(_studies, "figure", keep)
    return made


def _tables(out: str) -> dict[str, list[str]]:
    """Study name -> its table's rows (below the header and the rule)."""
    found = {}
    for block in out.split("\n\n"):
        lines = block.strip().splitlines()
        for name, title in TITLES.items():
            if lines and lines[0].startswith(title):
                assert set(lines[2]) == {"-"}, block  # title, header, rule
                found[name] = lines[3:]
    return found


def test_all_prints_three_tables_with_numbers_and_one_figure(tmp_path, capsys, figures):
    out = tmp_path / "all.png"
    args = ["demo", "--all", "--steps", "40", "--study-steps", "20", "--output", str(out)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "steps to 90% accuracy" in captured.out  # the comparison's table comes first, as without --all
    tables = _tables(captured.out)
    assert sorted(tables) == sorted(TITLES)
    for name, rows in tables.items():
        assert len(rows) == ROWS[name], rows
        for row in rows:
            # the steps to 90% (">20" when not reached), the best accuracy, the optimizers' gamma std
            cells = re.findall(rf"{NUMBER}( \({NUMBER}-{NUMBER}\))?", row.split("  ", 1)[1])
            assert len(cells) == (2 if name == "scaling" else 3), row
            assert "diverged" not in row
    assert captured.out.rstrip().endswith(f"Plot saved to {out}")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    assert len(fig.axes) == 6  # the comparison's three panels and one per study
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split(")")[0] for t in titles] == ["(a", "(b", "(c", "(d", "(e", "(f"]
    assert [t.split()[1].rstrip(":") for t in titles[3:]] == list(TITLES)
    assert len(re.findall(r"^placement: .*seed \d", captured.err, re.M)) == 6  # a progress line per run


def test_study_alone_and_repeated(tmp_path, capsys, figures):
    out = tmp_path / "two.png"
    argv = ["demo", "--study", "optimizers", "--study", "placement", "--study-steps", "10", "--output", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "steps to 90% accuracy" not in captured.out  # no comparison
    assert list(_tables(captured.out)) == ["placement", "optimizers"]  # in the order of STUDIES
    assert len(figures[0].axes) == 2
    assert out.exists()


def test_all_and_study_exclude_each_other(tmp_path, capsys):
    assert cli.main(["demo", "--all", "--study", "scaling", "--output", str(tmp_path / "x.png")]) == 2
    assert "not allowed with" in capsys.readouterr().err
    assert cli.main(["demo", "--study", "nothing", "--output", str(tmp_path / "x.png")]) == 2


def test_a_nan_loss_is_shown_as_diverged(tmp_path, capsys):
    # At a learning rate of 1e37 the first updates overflow float32: every run's loss is NaN.
    argv = [
        "demo",
        "--study",
        "scaling",
        "--steps",
        "10",
        "--learning-rate",
        "1e37",
        "--output",
        str(tmp_path / "d.png"),
    ]
    assert cli.main(argv) == 0
    rows = _tables(capsys.readouterr().out)["scaling"]
    assert all(row.split()[-2:] == ["diverged", "diverged"] for row in rows), rows
    assert (tmp_path / "d.png").exists()


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("after", [False, True])
def test_the_networks_against_float64(after):
    """Batch norm (training mode, gamma 1, beta 0) before or after each sigmoid, computed here in float64."""
    rng = np.random.default_rng(5)
    kernels = _demo._initial_kernels(rng, [64, *_demo.HIDDEN, 10])
    x = rng.uniform(0, 1, size=(60, 64)).astype(np.float32)
    net = _demo._Net(kernels, batch_norm=True, after=after)
    logits, watched = net.forward(x, training=True)
    eps = next(layer.layer.epsilon for layer in net.layers if isinstance(layer, _demo._BatchNorm))

    def norm(h):
        return (h - h.mean(axis=0)) / np.sqrt(h.var(axis=0) + eps)

    h = x.astype(np.float64)
    for k in kernels[:-1]:
        pre = h @ k  # the hidden Dense biases start at zero
        h = norm(_sigmoid(pre)) if after else _sigmoid(norm(pre))
    np.testing.assert_allclose(logits, h @ kernels[-1], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(watched, pre if after else norm(pre), rtol=2e-4, atol=2e-4)  # last sigmoid's input
    biases = [layer.bias is not None for layer in net.layers if isinstance(layer, _demo._Dense)]
    assert biases == [after, after, after, True]  # before the sigmoid, beta replaces the bias


def test_scaled_inputs_are_fit_on_the_training_split():
    data = _demo._load_data(0)
    inputs = _studies.scaled_inputs(data)
    raw_train, _, raw_test, _ = (np.asarray(a, np.float64) for a in inputs["raw"])
    ratio = raw_train.max(axis=0) / data[0].max(axis=0).clip(1e-12)  # each column's factor
    used = data[0].max(axis=0) > 0
    assert ratio[used].max() / ratio[used].min() > 100  # several orders of magnitude apart
    lo, hi = raw_train.min(axis=0), raw_train.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    for i in (0, 2):  # the training and the held-out features, with the training split's statistics
        x = (raw_train, None, raw_test)[i]
        np.testing.assert_allclose(inputs["MinMaxScaler"][i], (x - lo) / span, atol=1e-5)
        std = raw_train.std(axis=0)
        want = (x - raw_train.mean(axis=0)) / np.where(std > 0, std, 1.0)
        np.testing.assert_allclose(inputs["StandardScaler"][i], want, rtol=1e-4, atol=1e-4)
    assert inputs["raw"][1] is data[1]
    assert inputs["raw"][3] is data[3]


def test_the_gamma_beta_optimizer_updates_only_gamma_and_beta():
    """With a gamma/beta optimizer of learning rate 0, gamma and beta stay 1 and 0; the Dense weights still move."""
    data = _demo._load_data(0)
    kernels, batches = _demo._kernels_and_batches(0, data[0].shape, 5, 60)
    net = _demo._Net(kernels, batch_norm=True)
    curve = _demo._train(
        net,
        "x",
        batches=batches,
        data=data,
        learning_rate=0.5,
        eval_every=5,
        target=0.9,
        stream=None,
        bn_optimizer=optimizers.SGD(learning_rate=0.0),
    )
    bns = [layer.layer for layer in net.layers if isinstance(layer, _demo._BatchNorm)]
    assert all(np.all(bn.gamma == 1) and np.all(bn.beta == 0) for bn in bns)
    assert not np.array_equal(net.layers[0].kernel, kernels[0])
    np.testing.assert_array_equal(curve.gamma_std, [0.0, 0.0])
    # Without it, the network's SGD moves gamma too; its spread is the std of all 300 values.
    net = _demo._Net(kernels, batch_norm=True)
    curve = _demo._train(net, "y", batches=batches, data=data, learning_rate=0.5, eval_every=5, target=0.9, stream=None)
    gammas = np.concatenate([layer.layer.gamma for layer in net.layers if isinstance(layer, _demo._BatchNorm)])
    assert gammas.size == 300
    assert curve.gamma_std[-1] == pytest.approx(np.std(gammas.astype(np.float64)))
    assert curve.gamma_std[-1] > 0


def _curve(steps_to_target, best, diverged=False):
    acc = np.array([0.1, best])
    return _demo.Curve(
        "c",
        np.array([0, 10]),
        acc,
        np.zeros((2, 3)),
        np.array([math.nan, 1.0]),
        steps_to_target,
        0.0,
        diverged,
        np.array([0, best / 10]),
    )


def test_table_cells_median_range_and_diverged():
    study = _studies.Study(
        "placement",
        "Placement (made up)",
        [
            _studies.Row("three", [_curve(40, 0.95), _curve(None, 0.85), _curve(20, 0.97)]),
            _studies.Row("one diverged", [_curve(30, 0.9), _curve(None, 0.5, diverged=True), _curve(50, 0.93)]),
            _studies.Row("all diverged", [_curve(None, 0.1, diverged=True)] * 3),
        ],
        steps=100,
        target=0.9,
    )
    rows = _studies.table(study).splitlines()[3:]
    gamma = ["0.095", "(0.085-0.097)"]  # from the last evaluation
    assert rows[0].split("  ", 1)[1].split() == ["40", "(20->100)", "0.950", "(0.850-0.970)", *gamma]
    assert "40 (30-50), 1 of 3 diverged" in rows[1]
    assert rows[1].split()[-4:-2] == ["0.915", "(0.900-0.930)"]  # the median of the two that did not diverge
    assert rows[2].split()[-3:] == ["diverged", "diverged", "diverged"]
