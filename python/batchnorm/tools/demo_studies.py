"""``python -m batchnorm demo --all`` and ``--study NAME``: three claims about batch norm, measured
on the demo's network, data and mini-batches (see :mod:`batchnorm.tools.demo`).

* scaling: inputs on a common scale train in fewer steps. Each pixel column is multiplied by
  a fixed factor spread over several orders of magnitude; the plain network is trained on
  these raw features, after scikit-learn's ``MinMaxScaler`` and after its ``StandardScaler``
  (both fit on the training split only), and the batch-norm network on the raw features and
  after the ``StandardScaler``.
* placement: batch norm before each sigmoid (the paper's, and the demo's) against after it.
* optimizers: gamma and beta trained with ``bn.optimizers.SGD``, SGD with momentum,
  ``RMSprop`` and ``Adam`` at the optimizers' default learning rates (momentum 0.9, the usual
  value; the optimizer's default is none), while the same plain SGD as in
  the demo updates every other weight, so that only gamma and beta's optimizer differs.

Each study is a table and a panel of the one saved figure. Placement and optimizers run 3
seeds (the seed of the demo and the next two; a seed draws the initial weights and the
mini-batches, the held-out split stays the demo's) and show the median and the range.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from .. import optimizers
from . import demo

__all__ = ["STUDIES", "Row", "Study", "figure", "main", "run_study", "scaled_inputs", "table"]

STUDIES = demo.STUDIES
SEEDS = 3
EVAL_EVERY = 10  # steps between held-out evaluations: the demo's default resolution
SCALE_SEED = 1  # the fixed per-column factors of the scaling study
SCALE_EXPONENTS = (-2.0, 2.0)  # factors 10**u, u uniform in this range: four orders of magnitude

GAMMA_STD = "gamma std: the standard deviation of the network's 300 gamma values at the end (all 1 at the start)"

Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

# Name in the table, and the optimizer of gamma and beta at its default learning rate.
OPTIMIZERS: tuple[tuple[str, Callable[[], optimizers.Optimizer]], ...] = (
    ("SGD, lr 0.01", optimizers.SGD),
    ("SGD momentum 0.9, lr 0.01", functools.partial(optimizers.SGD, momentum=0.9)),
    ("RMSprop, lr 0.001", optimizers.RMSprop),
    ("Adam, lr 0.001", optimizers.Adam),
)


@dataclass
class Row:
    """One setting of a study: its runs, one per seed."""

    label: str
    curves: list[demo.Curve]


@dataclass
class Study:
    name: str
    title: str  # what was trained, how long, with what: the table's header
    rows: list[Row]
    steps: int
    target: float

    @property
    def gamma_column(self) -> bool:
        """Whether the table shows the spread of gamma: where every network has batch norm."""
        return self.name != "scaling"


@dataclass
class _Setup:
    data: Data
    steps: int
    learning_rate: float
    target: float
    eval_every: int
    stream: TextIO | None


def _train(
    setup: _Setup,
    label: str,
    seed: int,
    *,
    data: Data | None = None,
    batch_norm: bool = True,
    after: bool = False,
    bn_optimizer: optimizers.Optimizer | None = None,
) -> demo.Curve:
    data = setup.data if data is None else data
    kernels, batches = demo._kernels_and_batches(seed, data[0].shape, setup.steps, demo.DEFAULT_BATCH_SIZE)
    # A diverging network overflows on its way to a NaN loss, which is reported, not warned about.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return demo._train(
            demo._Net(kernels, batch_norm, after=after),
            label,
            batches=batches,
            data=data,
            learning_rate=setup.learning_rate,
            eval_every=setup.eval_every,
            target=setup.target,
            stream=setup.stream,
            bn_optimizer=bn_optimizer,
            quarters=False,
        )


def scaled_inputs(data: Data) -> dict[str, Data]:
    """The scaling study's inputs: "raw" (each pixel column times its fixed factor), and the raw
    features after scikit-learn's "MinMaxScaler" and "StandardScaler", fit on the training split."""
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    x_train, y_train, x_test, y_test = data
    factors = 10.0 ** np.random.default_rng(SCALE_SEED).uniform(*SCALE_EXPONENTS, size=x_train.shape[1])
    raw = (x_train * factors).astype(demo.DTYPE), y_train, (x_test * factors).astype(demo.DTYPE), y_test
    inputs = {"raw": raw}
    for scaler in (MinMaxScaler(), StandardScaler()):
        scaler.fit(raw[0])  # the training split only: the held-out images stay unseen
        train, test = (scaler.transform(x).astype(demo.DTYPE) for x in (raw[0], raw[2]))
        inputs[type(scaler).__name__] = train, y_train, test, y_test
    return inputs


def _scaling(setup: _Setup, seed: int) -> Study:
    inputs = scaled_inputs(setup.data)
    settings = (
        ("plain net, raw", inputs["raw"], False),
        ("plain net, MinMaxScaler", inputs["MinMaxScaler"], False),
        ("plain net, StandardScaler", inputs["StandardScaler"], False),
        ("batch-norm net, raw", inputs["raw"], True),
        ("batch-norm net, StandardScaler", inputs["StandardScaler"], True),
    )
    rows = [
        Row(label, [_train(setup, f"scaling: {label}", seed, data=data, batch_norm=bn)]) for label, data, bn in settings
    ]
    lo, hi = SCALE_EXPONENTS
    title = (
        f"Input scaling: each pixel column times a fixed factor in [1e{lo:+.0f}, 1e{hi:+.0f}] (log-uniform); "
        f"{setup.steps} steps, SGD learning rate {setup.learning_rate:g} on every weight, seed {seed}; "
        f"held-out accuracy every {setup.eval_every} steps"
    )
    return Study("scaling", title, rows, setup.steps, setup.target)


def _over_seeds(setup: _Setup, name: str, seeds: list[int]) -> Study:
    """The placement or the optimizers study: each setting trained once per seed."""
    settings: list[tuple[str, bool, Callable[[], optimizers.Optimizer] | None]]
    if name == "placement":
        settings = [("BN before each sigmoid", False, None), ("BN after each sigmoid", True, None)]
        what = f"Placement (SGD learning rate {setup.learning_rate:g} on every weight)"
    else:
        settings = [(label, False, make) for label, make in OPTIMIZERS]
        what = f"Optimizer of gamma and beta (the other weights: SGD learning rate {setup.learning_rate:g})"
    rows = [
        Row(
            label,
            [
                _train(setup, f"{name}: {label}, seed {s}", s, after=after, bn_optimizer=make() if make else None)
                for s in seeds
            ],
        )
        for label, after, make in settings
    ]
    title = (
        f"{what}; {setup.steps} steps; median (min-max) over seeds {seeds[0]}-{seeds[-1]}; "
        f"held-out accuracy every {setup.eval_every} steps; {GAMMA_STD}"
    )
    return Study(name, title, rows, setup.steps, setup.target)


def run_study(
    name: str,
    *,
    steps: int,
    learning_rate: float = demo.DEFAULT_LEARNING_RATE,
    seed: int = demo.DEFAULT_SEED,
    target: float = demo.DEFAULT_TARGET,
    eval_every: int = EVAL_EVERY,
    stream: TextIO | None = sys.stderr,
) -> Study:
    """Runs one of :data:`STUDIES`; the held-out split is the demo's for ``seed``."""
    if name not in STUDIES:
        raise ValueError(f"study must be one of {', '.join(STUDIES)}, got {name!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    setup = _Setup(demo._load_data(seed), steps, learning_rate, target, eval_every, stream)
    seeds = [seed + i for i in range(SEEDS)]
    with demo._one_blas_thread():
        return _scaling(setup, seed) if name == "scaling" else _over_seeds(setup, name, seeds)


# ----------------------------------------------------------------------------- report
def _median_range(values: list[float], fmt: Callable[[float], str]) -> str:
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def _cells(study: Study, row: Row) -> list[str]:
    ok = [c for c in row.curves if not c.diverged]
    if not ok:
        return ["diverged"] * (3 if study.gamma_column else 2)
    note = f", {len(row.curves) - len(ok)} of {len(row.curves)} diverged" if len(ok) < len(row.curves) else ""
    never = study.steps + 1  # not reached: sorts after every step count
    steps = [float(c.steps_to_target if c.steps_to_target is not None else never) for c in ok]

    def fmt_steps(v: float) -> str:
        return f">{study.steps}" if v >= never else f"{v:.0f}"

    cells = [
        _median_range(steps, fmt_steps) + note,
        _median_range([float(c.accuracy.max()) for c in ok], lambda v: f"{v:.3f}"),
    ]
    if study.gamma_column:
        cells.append(_median_range([float(c.gamma_std[-1]) for c in ok], lambda v: f"{v:.3f}"))
    return cells


def table(study: Study) -> str:
    """The study's printed table: its header, then steps to the target and the best held-out accuracy."""
    head = ["", f"steps to {study.target:.0%}", "best held-out accuracy"]
    if study.gamma_column:
        head.append("gamma std")
    rows = [head] + [[row.label, *_cells(study, row)] for row in study.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join([study.title, *lines])


def _panel(ax: Any, study: Study, letter: str) -> None:
    """Held-out accuracy against steps (optimizers: the spread of gamma, the accuracy being alike)."""
    gamma = study.name == "optimizers"
    colors = ("tab:gray", "tab:orange", "tab:green", "tab:blue", "tab:purple")
    for row, color in zip(study.rows, colors, strict=False):
        shown = [c for c in row.curves if not c.diverged]
        if not shown:
            ax.plot([], [], color=color, label=f"{row.label} (diverged)")
            continue
        n = min(len(c.steps) for c in shown)
        steps = shown[0].steps[1:n]  # from the first evaluation on: the x axis is logarithmic
        values = np.array([(c.gamma_std if gamma else c.accuracy)[1:n] for c in shown])
        ax.plot(steps, np.median(values, axis=0), color=color, label=row.label)
        if len(shown) > 1:
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color, alpha=0.25, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("training steps")
    if gamma:
        ax.set_ylabel("std of the network's 300 gammas")
        ax.legend(loc="upper left", fontsize=7)
    else:
        ax.axhline(study.target, color="k", lw=0.6, ls=":")
        ax.set_ylim(0, 1)
        ax.set_ylabel("held-out accuracy")
        ax.legend(loc="best", fontsize=7)
    seeds = max(len(r.curves) for r in study.rows)
    what = "the spread of gamma" if gamma else "held-out accuracy"
    spread = f"median and range over {seeds} seeds" if seeds > 1 else "one seed"
    ax.set_title(f"({letter}) {study.name}: {what},\n{spread}")


def figure(comparison: demo.DemoResult | None, studies: list[Study]) -> Any:
    """One matplotlib figure: the demo's three panels (if given) above one panel per study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(3 if comparison is not None else 0, len(studies))
    nrows = (comparison is not None) + (len(studies) > 0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(13, 3.8 * nrows), constrained_layout=True, squeeze=False)
    letters = iter("abcdefghi")
    if comparison is not None:
        demo.plot_comparison(comparison, axes[0])
        for _ in range(3):
            next(letters)
    for ax, study in zip(axes[-1], studies, strict=False):
        _panel(ax, study, next(letters))
    for ax in axes[-1][len(studies) :]:
        fig.delaxes(ax)
    return fig


# ----------------------------------------------------------------------------- command line
def main(args: argparse.Namespace) -> int:
    """``--all``: the demo's comparison, then every study; ``--study``: the named studies alone,
    in the order of :data:`STUDIES`."""
    import matplotlib.pyplot as plt

    wanted = set(STUDIES) if args.all else set(args.study)
    names = [s for s in STUDIES if s in wanted]
    comparison = None
    if args.all:
        print(
            f"Training the demo's 3x100 sigmoid network without and with batch norm ({args.steps} steps), "
            f"then the studies: {', '.join(names)}",
            file=sys.stderr,
        )
        comparison = demo.run(args.steps, args.learning_rate, args.seed, target=args.target, stream=sys.stderr)
        print()
        print(demo.table(comparison))
        print()
        print(demo.summary(comparison))
    studies = []
    for name in names:
        steps = args.steps if name == "scaling" else args.study_steps
        studies.append(
            run_study(
                name,
                steps=steps,
                learning_rate=args.learning_rate,
                seed=args.seed,
                target=args.target,
                stream=sys.stderr,
            )
        )
        print()
        print(table(studies[-1]))
    fig = figure(comparison, studies)
    fig.suptitle(
        f"3x100 sigmoid net on digits, batch {demo.DEFAULT_BATCH_SIZE}, seed {args.seed}; the studies' settings: "
        "the tables' headers",
        fontsize=10,
    )
    fig.savefig(args.output, dpi=110, format="png")
    plt.close(fig)
    print()
    print(f"Plot saved to {args.output}")
    return 0
