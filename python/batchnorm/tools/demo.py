"""``python -m batchnorm demo``: the paper's Figure 1 in miniature, on scikit-learn's digits.

Ioffe & Szegedy (2015), Figure 1: a fully connected network with 3 hidden layers of 100
sigmoid units, trained with and without batch normalization before each sigmoid. (a)
held-out accuracy against training steps: with batch norm it trains faster; (b, c) the
15th, 50th and 85th percentiles of one sigmoid's input over training: without batch norm
its distribution drifts, with it the distribution stays put.

Here the data are scikit-learn's ``load_digits`` (1,797 8x8 images, shipped with
scikit-learn: no download), both networks start from the same weights and see the same
mini-batches in the same order, and one optimizer of this library (``bn.optimizers.SGD``,
plain gradient descent as in the paper) updates every weight of both. The Dense layers,
the sigmoid and the softmax cross-entropy are a few lines of NumPy below; the only batch
norm is ``bn.BatchNormalization``. The held-out accuracy is measured in inference mode,
i.e. with the layers' moving statistics. ``--all`` and ``--study`` add three more studies on
the same network, data and batches (``demo_studies.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from .. import optimizers
from ..keras import BatchNormalization
from . import _args

__all__ = ["Curve", "DemoResult", "add_arguments", "main", "run"]

INSTALL_HINT = 'pip install "batchnorm[demo]"  (or: pip install scikit-learn matplotlib)'

DEFAULT_STEPS = 3000
DEFAULT_LEARNING_RATE = 0.5  # plain SGD; the net without batch norm learns, but slowly
DEFAULT_SEED = 0
DEFAULT_TARGET = 0.9
DEFAULT_BATCH_SIZE = 60  # the paper's
DEFAULT_OUTPUT = "batchnorm_demo.png"
STUDIES = ("scaling", "placement", "optimizers")  # --all, --study: tools/demo_studies.py
DEFAULT_STUDY_STEPS = 1000  # each placement and optimizers run: batch norm is at 90% within 50 steps
HIDDEN = (100, 100, 100)  # the paper's: 3 hidden layers of 100 sigmoid units
PERCENTILES = (15.0, 50.0, 85.0)  # the paper's Figure 1 (b, c)
DTYPE = np.float32


def _missing_dependencies(need_plot: bool) -> list[str]:
    missing = []
    try:
        import sklearn  # noqa: F401
    except ImportError:
        missing.append("scikit-learn")
    if need_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            missing.append("matplotlib")
    return missing


# ----------------------------------------------------------------------------- the network, in NumPy
class _Dense:
    """``y = x @ kernel + bias`` with its gradient; follows the optimizers' layer protocol."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        self.kernel = kernel
        self.bias = bias
        self.grads: dict[str, np.ndarray] = {}
        self._x: np.ndarray | None = None

    @property
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        params = {"kernel": self.kernel}
        if self.bias is not None:
            params["bias"] = self.bias
        return params

    def __call__(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        self._x = x
        y: np.ndarray = x @ self.kernel
        if self.bias is not None:
            y += self.bias
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        assert self._x is not None
        self.grads = {"kernel": self._x.T @ dy}
        if self.bias is not None:
            self.grads["bias"] = dy.sum(axis=0)
        dx: np.ndarray = dy @ self.kernel.T
        return dx


class _Sigmoid:
    def __init__(self) -> None:
        self._y: np.ndarray | None = None

    def __call__(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        # 1/(1+exp(-x)) without overflow warnings for large negative x
        y: np.ndarray = np.exp(-np.logaddexp(0, -x)).astype(x.dtype)
        self._y = y
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        assert self._y is not None
        y = self._y
        dx: np.ndarray = dy * y * (1 - y)
        return dx


class _BatchNorm:
    """``bn.BatchNormalization`` in the network: training calls in training, inference otherwise."""

    def __init__(self) -> None:
        self.layer = BatchNormalization(momentum=0.9)

    def __call__(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        return self.layer(x, training=training)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return self.layer.backward(dy)


def _softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -float(log_p[np.arange(n), labels].mean())
    grad = np.exp(log_p)
    grad[np.arange(n), labels] -= 1
    return loss, (grad / n).astype(logits.dtype)


class _Net:
    """Dense -> [BN] -> sigmoid, three times, then Dense -> softmax (``after``: Dense -> sigmoid -> BN)."""

    def __init__(self, kernels: list[np.ndarray], batch_norm: bool, *, after: bool = False) -> None:
        self.layers: list[Any] = []
        self.batch_norm = batch_norm
        last = len(kernels) - 1
        for i, k in enumerate(kernels):
            # With batch norm before the sigmoid the hidden Dense layers have no bias: beta takes its
            # place (the paper's "Wu"); after the sigmoid, beta cannot shift the sigmoid's input.
            use_bias = i == last or not batch_norm or after
            bias = np.zeros(k.shape[1], k.dtype) if use_bias else None
            self.layers.append(_Dense(k.copy(), bias))
            if i != last:
                if batch_norm and not after:
                    self.layers.append(_BatchNorm())
                self.layers.append(_Sigmoid())
                if batch_norm and after:
                    self.layers.append(_BatchNorm())
        # The input of the last hidden layer's sigmoid, whose distribution Figure 1 (b, c) follows.
        self.watched = len(self.layers) - (4 if batch_norm and after else 3)

    def gamma_std(self) -> float:
        """Standard deviation over every gamma value of the network (0 at the start: all ones)."""
        gammas = [g for layer in self.layers if isinstance(layer, _BatchNorm) and (g := layer.layer.gamma) is not None]
        return float(np.concatenate(gammas).astype(np.float64).std()) if gammas else math.nan

    def forward(self, x: np.ndarray, training: bool) -> tuple[np.ndarray, np.ndarray]:
        """(logits, the input of the watched sigmoid)."""
        watched = x
        for i, layer in enumerate(self.layers):
            x = layer(x, training=training)
            if i == self.watched:
                watched = x
        return x, watched

    def backward(self, dlogits: np.ndarray) -> None:
        g = dlogits
        for layer in reversed(self.layers):
            g = layer.backward(g)

    def trainable(self) -> list[Any]:
        return [
            layer.layer if isinstance(layer, _BatchNorm) else layer
            for layer in self.layers
            if not isinstance(layer, _Sigmoid)
        ]


# ----------------------------------------------------------------------------- results
@dataclass
class Curve:
    """One network's training record, at every evaluation step."""

    name: str
    steps: np.ndarray  # (E,) int: training steps done at each evaluation (0 = the initial network)
    accuracy: np.ndarray  # (E,) held-out accuracy
    percentiles: np.ndarray  # (E, 3): 15th, 50th, 85th percentile of the watched sigmoid's input
    loss: np.ndarray  # (E,) mean training loss since the previous evaluation (NaN at step 0)
    steps_to_target: int | None  # first evaluation step with accuracy >= target, None if never
    seconds: float  # training wall time
    diverged: bool = False  # a training loss was NaN or infinite: training stopped there
    # (E,) std over every gamma value of the network at each evaluation (NaN without batch norm)
    gamma_std: np.ndarray = field(default_factory=lambda: np.empty(0))


@dataclass
class DemoResult:
    plain: Curve
    batchnorm: Curve
    target: float
    steps: int
    learning_rate: float
    seed: int
    batch_size: int
    train_size: int
    test_size: int
    eval_every: int  # steps between two evaluations (the resolution of steps_to_target)
    output: str | None = None  # where the plot was saved

    @property
    def speedup(self) -> float | None:
        """Steps to the target without batch norm / with it (None if either never gets there)."""
        p, b = self.plain.steps_to_target, self.batchnorm.steps_to_target
        return None if p is None or b is None or b == 0 else p / b


# ----------------------------------------------------------------------------- progress
class _Progress:
    """A one-line text progress bar (carriage returns on a terminal, a few lines otherwise)."""

    def __init__(self, total: int, label: str, stream: TextIO | None, *, quarters: bool = True) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream
        self.quarters = quarters  # off a terminal: a line each quarter (else only the last)
        self.tty = bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
        self.start = time.perf_counter()
        self.last_draw = -math.inf
        self.last_decile = -1

    def update(self, done: int, note: str = "") -> None:
        if self.stream is None:
            return
        now = time.perf_counter()
        frac = min(done / self.total, 1.0)
        final = done >= self.total
        if self.tty:
            if not final and now - self.last_draw < 0.1:
                return
        else:
            decile = int(frac * 4)
            if not final and (decile == self.last_decile or not self.quarters):
                return
            self.last_decile = decile
        self.last_draw = now
        width = 30
        filled = round(width * frac)
        bar = "#" * filled + "-" * (width - filled)
        line = f"{self.label:<18} [{bar}] {done:>5}/{self.total} {now - self.start:5.1f}s {note}"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and final:
            self.stream.write("\n")
        self.stream.flush()


# ----------------------------------------------------------------------------- training
def _load_data(seed: int, test_fraction: float = 1 / 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(DTYPE)  # pixels 0..16 -> [0, 1]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = round(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """The matrices are tiny (60x100): BLAS threads only add synchronization, and on a busy
    machine they can slow the demo several-fold. threadpoolctl comes with scikit-learn."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")  # type: ignore[no-any-return]


def _initial_kernels(rng: np.random.Generator, sizes: list[int]) -> list[np.ndarray]:
    """Small random Gaussian weights (the paper's initialization), shared by both networks."""
    return [rng.normal(0.0, 1.0 / math.sqrt(a), size=(a, b)).astype(DTYPE) for a, b in itertools.pairwise(sizes)]


def _kernels_and_batches(
    seed: int, train_shape: tuple[int, ...], steps: int, batch_size: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """The initial weights, then the sequence of mini-batches (shuffled epochs, drawn once), from one seed."""
    n, features = train_shape
    rng = np.random.default_rng(seed)
    kernels = _initial_kernels(rng, [features, *HIDDEN, 10])
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    batches = np.concatenate(
        [rng.permutation(n)[: per_epoch * batch_size].reshape(per_epoch, batch_size) for _ in range(epochs)]
    )[:steps]
    return kernels, batches


def _train(
    net: _Net,
    name: str,
    *,
    batches: np.ndarray,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    learning_rate: float,
    eval_every: int,
    target: float,
    stream: TextIO | None,
    bn_optimizer: optimizers.Optimizer | None = None,
    quarters: bool = True,
) -> Curve:
    """Plain SGD on every weight; ``bn_optimizer``, if given, updates gamma and beta instead."""
    x_train, y_train, x_test, y_test = data
    opt = optimizers.SGD(learning_rate=learning_rate)
    params = net.trainable()
    bn_params = []
    if bn_optimizer is not None:
        bn_params = [p for p in params if isinstance(p, BatchNormalization)]
        params = [p for p in params if not isinstance(p, BatchNormalization)]
    steps_done: list[int] = []
    accuracy: list[float] = []
    pct: list[np.ndarray] = []
    losses: list[float] = []
    gamma_std: list[float] = []
    running: list[float] = []
    progress = _Progress(len(batches), name, stream, quarters=quarters)
    diverged = False

    def evaluate(step: int) -> None:
        logits, watched = net.forward(x_test, training=False)
        steps_done.append(step)
        accuracy.append(float((logits.argmax(axis=1) == y_test).mean()))
        pct.append(np.percentile(watched[:, 0].astype(np.float64), PERCENTILES))
        losses.append(float(np.mean(running)) if running else math.nan)
        gamma_std.append(net.gamma_std())
        running.clear()

    start = time.perf_counter()
    evaluate(0)
    for step, idx in enumerate(batches, start=1):
        logits, _ = net.forward(x_train[idx], training=True)
        loss, dlogits = _softmax_cross_entropy(logits, y_train[idx])
        running.append(loss)
        if not math.isfinite(loss):  # nothing left to learn from: stop, and say so
            diverged = True
            evaluate(step)
            progress.update(len(batches), f"diverged at step {step}")
            break
        net.backward(dlogits)
        opt.step(params)
        if bn_optimizer is not None:
            bn_optimizer.step(bn_params)
        if step % eval_every == 0 or step == len(batches):
            evaluate(step)
            progress.update(step, f"held-out accuracy {accuracy[-1]:.3f}")
    seconds = time.perf_counter() - start
    acc = np.array(accuracy)
    reached = np.flatnonzero(acc >= target)
    return Curve(
        name=name,
        steps=np.array(steps_done, dtype=np.int64),
        accuracy=acc,
        percentiles=np.array(pct),
        loss=np.array(losses),
        steps_to_target=int(steps_done[reached[0]]) if reached.size else None,
        seconds=seconds,
        diverged=diverged,
        gamma_std=np.array(gamma_std),
    )


def run(
    steps: int = DEFAULT_STEPS,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    seed: int = DEFAULT_SEED,
    *,
    target: float = DEFAULT_TARGET,
    batch_size: int = DEFAULT_BATCH_SIZE,
    eval_every: int | None = None,
    output: str | os.PathLike[str] | None = None,
    stream: TextIO | None = sys.stderr,
) -> DemoResult:
    """Trains both networks and returns their curves; saves the plot to ``output`` if given.

    ``stream`` receives the progress bars (None: silent). Needs scikit-learn (and
    matplotlib for ``output``); raises ImportError naming what to install otherwise.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate}")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be an accuracy in (0, 1], got {target}")
    missing = _missing_dependencies(output is not None)
    if missing:
        raise ImportError(f"the demo needs {' and '.join(missing)}: {INSTALL_HINT}")
    if eval_every is None:
        eval_every = max(1, steps // 300)
    data = _load_data(seed)
    x_train = data[0]
    if batch_size > len(x_train):
        raise ValueError(f"batch_size must be at most the {len(x_train)} training images, got {batch_size}")
    kernels, batches = _kernels_and_batches(seed, x_train.shape, steps, batch_size)
    with _one_blas_thread():
        curves = [
            _train(
                _Net(kernels, batch_norm=bn_on),
                name,
                batches=batches,
                data=data,
                learning_rate=learning_rate,
                eval_every=eval_every,
                target=target,
                stream=stream,
            )
            for bn_on, name in ((False, "without batch norm"), (True, "with batch norm"))
        ]
    result = DemoResult(
        plain=curves[0],
        batchnorm=curves[1],
        target=target,
        steps=steps,
        learning_rate=learning_rate,
        seed=seed,
        batch_size=batch_size,
        train_size=len(x_train),
        test_size=len(data[2]),
        eval_every=eval_every,
    )
    if output is not None:
        result.output = os.fspath(output)
        plot(result, output)
    return result


# ----------------------------------------------------------------------------- report
def _fmt_steps(s: int | None, total: int) -> str:
    return f"{s}" if s is not None else f"not in {total}"


def table(result: DemoResult) -> str:
    """The printed summary: accuracy at a few checkpoints and steps to the target."""
    p, b = result.plain, result.batchnorm
    marks = sorted({max(1, round(result.steps * f)) for f in (1 / 30, 1 / 10, 1 / 3, 2 / 3, 1)})
    rows = [("", "without BN", "with BN")]
    for m in marks:
        i = int(np.searchsorted(p.steps, m))
        i = min(i, len(p.steps) - 1)
        rows.append((f"held-out accuracy at step {int(p.steps[i])}", f"{p.accuracy[i]:.3f}", f"{b.accuracy[i]:.3f}"))
    rows.append(
        (
            f"steps to {result.target:.0%} accuracy",
            _fmt_steps(p.steps_to_target, result.steps),
            _fmt_steps(b.steps_to_target, result.steps),
        )
    )
    rows.append(("best held-out accuracy", f"{p.accuracy.max():.3f}", f"{b.accuracy.max():.3f}"))
    rows.append(("time (training + evaluation)", f"{p.seconds:.1f} s", f"{b.seconds:.1f} s"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    lines = [f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}" for r in rows]
    lines.insert(1, "-" * (w0 + w1 + w2 + 4))
    return "\n".join(lines)


def summary(result: DemoResult) -> str:
    p, b = result.plain.steps_to_target, result.batchnorm.steps_to_target
    if b is None:
        return f"Batch norm did not reach {result.target:.0%} held-out accuracy in {result.steps} steps."
    if p is None:
        return (
            f"With batch norm the network reaches {result.target:.0%} held-out accuracy after {b} steps; "
            f"without it, not within {result.steps} steps."
        )
    return (
        f"With batch norm the network reaches {result.target:.0%} held-out accuracy after {b} steps, "
        f"without it after {p}: {p / b:.1f}x fewer steps (held-out accuracy measured every {result.eval_every} steps)."
    )


def plot(result: DemoResult, path: str | os.PathLike[str]) -> None:
    """Figure 1 (a, b, c) of the paper: accuracy curves and one sigmoid input's percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    plot_comparison(result, axes)
    fig.suptitle(
        f"3x100 sigmoid net, SGD learning rate {result.learning_rate:g}, batch {result.batch_size}, seed {result.seed}",
        fontsize=10,
    )
    fig.savefig(path, dpi=110, format="png")  # the format given: saved under `path` exactly, no ".png" added
    plt.close(fig)


def plot_comparison(result: DemoResult, axes: Any) -> None:
    """Panels (a, b, c) of :func:`plot` on three given matplotlib axes."""
    p, b = result.plain, result.batchnorm
    ax = axes[0]
    ax.plot(p.steps, p.accuracy, color="tab:gray", ls="--", label="Without BN")
    ax.plot(b.steps, b.accuracy, color="tab:blue", label="With BN")
    ax.axhline(result.target, color="k", lw=0.6, ls=":")
    for c, color in ((p, "tab:gray"), (b, "tab:blue")):
        if c.steps_to_target is not None:
            ax.axvline(c.steps_to_target, color=color, lw=0.8, ls=":")
    ax.set_ylim(0, 1)
    ax.set_xlabel("training steps")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"(a) digits, {result.test_size} held-out images")
    ax.legend(loc="lower right")
    lo = min(p.percentiles.min(), b.percentiles.min())
    hi = max(p.percentiles.max(), b.percentiles.max())
    pad = 0.05 * (hi - lo if hi > lo else 1.0)
    for ax, c, title in ((axes[1], p, "(b) without BN"), (axes[2], b, "(c) with BN")):
        for j, q in enumerate(PERCENTILES):
            ax.plot(
                c.steps, c.percentiles[:, j], color="tab:blue" if c is b else "tab:gray", lw=1.5 if q == 50 else 0.8
            )
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("training steps")
        ax.set_title(
            f"{title}: a last-layer sigmoid's input,\n{', '.join(f'{q:.0f}' for q in PERCENTILES)}th percentiles"
        )


# ----------------------------------------------------------------------------- command line
MAX_STEPS = 10**7  # hours of training; more is a typo (the batch schedule is drawn up front)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps",
        type=_args.integer("steps", 1, MAX_STEPS),
        default=DEFAULT_STEPS,
        help=f"training steps per network (default {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--learning-rate",
        type=_args.number(0.0, open_low=True),
        default=DEFAULT_LEARNING_RATE,
        help=f"SGD learning rate (default {DEFAULT_LEARNING_RATE})",
    )
    parser.add_argument(
        "--seed",
        type=_args.integer("--seed", 0, 2**63 - 1),
        default=DEFAULT_SEED,
        help=f"seed of the split, weights and batches (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--target",
        type=_args.number(0.0, 1.0, open_low=True),
        default=DEFAULT_TARGET,
        help=f"held-out accuracy to count steps to (default {DEFAULT_TARGET})",
    )
    studies = parser.add_mutually_exclusive_group()
    studies.add_argument(
        "--all",
        action="store_true",
        help="also run the three studies (scaling, placement, optimizers): a table each, and a panel each "
        "below the comparison's in the one figure; under 2 minutes on 2 cores",
    )
    studies.add_argument(
        "--study",
        action="append",
        choices=STUDIES,
        help="run this study alone, without the comparison (repeat the option for several): scaling: the "
        "plain net on inputs of very different scales, raw and after scikit-learn's MinMaxScaler and "
        "StandardScaler, and the batch-norm net raw and after StandardScaler; placement: batch norm "
        "before each sigmoid against after it; optimizers: gamma and beta trained with SGD, SGD with "
        "momentum, RMSprop and Adam",
    )
    parser.add_argument(
        "--study-steps",
        type=_args.integer("--study-steps", 1, MAX_STEPS),
        default=DEFAULT_STUDY_STEPS,
        help=f"training steps of each placement and optimizers run, over 3 seeds each (default "
        f"{DEFAULT_STUDY_STEPS}); the scaling study trains for --steps",
    )
    parser.add_argument(
        "--output",
        type=_args.writable,
        default=DEFAULT_OUTPUT,
        help=f"where to save the plot (PNG, under exactly this name; default {DEFAULT_OUTPUT})",
    )


def main(args: argparse.Namespace) -> int:
    missing = _missing_dependencies(True)
    if missing:
        print(f"The demo needs {' and '.join(missing)}, which are not installed. Install them with:", file=sys.stderr)
        print(f"    {INSTALL_HINT}", file=sys.stderr)
        return 1
    if args.all or args.study:
        from . import demo_studies

        return demo_studies.main(args)
    print(
        f"Training a 3x100 sigmoid network on scikit-learn's digits, without and with batch norm "
        f"(same initialization and batches; SGD, learning rate {args.learning_rate:g}, {args.steps} steps, "
        f"seed {args.seed})",
        file=sys.stderr,
    )
    try:
        result = run(args.steps, args.learning_rate, args.seed, target=args.target, output=args.output)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(table(result))
    print()
    print(summary(result))
    print(f"Plot saved to {result.output}")
    return 0
