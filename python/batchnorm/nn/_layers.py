"""PyTorch-style stateful layers: BatchNorm1d, BatchNorm2d, BatchNorm3d.

They behave as ``torch.nn.BatchNorm{1,2,3}d`` do (torch 2.13, CPU): channel axis 1,
``train()``/``eval()``, ``momentum=None`` for a cumulative average, the unbiased batch
variance in ``running_var``, ``track_running_stats=False``, torch's errors, and
``state_dict()``/``load_state_dict()`` with torch's keys. Parameters and buffers are
NumPy arrays; gradients come from an explicit ``backward(dy)`` of the last call.
``virtual_batch_size=k`` trains on ghost batches (``batchnorm._ghost``); ``m(x, mask=m)``
takes batch statistics from the positions a mask selects (padded sequences).

Every call is one pass of the C++ core over the caller's buffer (no copy, whatever the
strides, e.g. a NumPy view of a ``torch.channels_last`` tensor). State changes are
computed first and committed last, under a lock, so a call that raises changes nothing.
torch is never imported here: tensors handed to ``load_state_dict`` are read through
their own methods.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .. import _core, _ghost
from .._functional import CopyableLayer, _data, _mask, real_array

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

AXES = (1,)  # the channel axis of every PyTorch layout (NC, NCL, NCHW, NCDHW)
_PARAMS = ("weight", "bias")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _bfloat16() -> np.dtype[Any] | None:
    try:
        import ml_dtypes
    except ImportError:
        return None
    dt: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return dt


def _layer_dtype(dtype: Any) -> np.dtype[Any]:
    """float16, bfloat16, float32 or float64, from a name, a NumPy dtype or a torch dtype."""
    name = str(dtype).removeprefix("torch.") if not isinstance(dtype, (np.dtype, type)) else None
    if name == "bfloat16":
        bf16 = _bfloat16()
        if bf16 is None:
            raise TypeError('dtype="bfloat16" needs ml_dtypes (pip install "batchnorm[bfloat16]")')
        return bf16
    try:
        dt = np.dtype(name if name is not None else dtype)
    except TypeError:
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}") from None
    if dt.name not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}")
    if not dt.isnative:  # a big-endian layer would reject every (native) input as "mixed dtype"
        raise TypeError(f"dtype must be native-endian, got the big-endian {dtype!r}")
    return dt


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"num_features must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"num_features must be non-negative, got {value}")
    return int(value)


def _real(value: Any, name: str) -> Any:
    """value itself (kept as given, so messages print it as torch does), if a real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number{' or None' if name == 'momentum' else ''}, got {value!r}")
    try:
        float(value)
    except OverflowError:  # an int beyond float range: as the functional API's epsilon, a bad value
        raise ValueError(f"{name} must be representable as a float, got {value}") from None
    return value


def _batch_count(value: np.ndarray) -> np.ndarray:
    """A copy of value as int64, if it holds non-negative whole numbers (a NaN would become
    INT64_MIN, a negative count a division by zero in the cumulative average)."""
    a = real_array(value, "num_batches_tracked")
    f = a.astype(np.float64)
    if not np.all(np.isfinite(f) & (f >= 0) & (np.floor(f) == f)):
        raise ValueError(f"num_batches_tracked must be a non-negative whole number, got {a}")
    return np.array(a, dtype=np.int64, copy=True)


def _is_floating(dt: np.dtype[Any]) -> bool:
    return dt.kind == "f" or dt.name == "bfloat16"


def stat_dtype(dt: np.dtype[Any]) -> type[np.floating[Any]]:
    """The dtype of per-channel arrays the core takes for inputs of dtype dt."""
    return np.float64 if dt == np.float64 else np.float32


def _torch_size(shape: tuple[int, ...]) -> str:
    return f"torch.Size({list(shape)})"


def check_masked_count(count: int, shape: tuple[int, ...], where: str = "") -> None:
    """torch's "more than 1 value per channel" rule, for the positions a mask selects."""
    if count < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {count} selected by the mask"
            f"{where or ' in input size ' + _torch_size(shape)}"
        )


def _to_numpy(value: Any) -> np.ndarray:
    """A NumPy array from an array-like or a (CPU) torch tensor, without importing torch."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # NumPy has no bfloat16: widen exactly
            t = t.float()
        return np.asarray(t.numpy())
    return np.asarray(value)


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict(..., strict=False)`` returns, as torch's ``_IncompatibleKeys``."""

    missing_keys: list[str]
    unexpected_keys: list[str]

    def __repr__(self) -> str:
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return f"_IncompatibleKeys(missing_keys={self.missing_keys}, unexpected_keys={self.unexpected_keys})"

    def __str__(self) -> str:
        return repr(self)


@dataclass(frozen=True)
class Saved:
    """What backward() needs from the last call: the input and the statistics it used."""

    x: np.ndarray
    weight: np.ndarray | None  # stat dtype, as used by the call
    mean: np.ndarray  # stat dtype
    inv_std: np.ndarray  # stat dtype, float(1/sqrt(var + eps)) as the core rounds it
    count: int  # values per channel the statistics came from (all ranks when synchronized)
    fixed: bool  # running statistics (no gradient through them) rather than batch ones
    comm: Any = None  # the communicator that shared the batch statistics (SyncBatchNorm)
    chunk: int | None = None  # ghost batches: the chunk size (mean and inv_std are then per chunk)
    mask: np.ndarray | None = None  # the mask of a masked call, as the core reads it


@dataclass(frozen=True)
class Batch:
    """The result of a training-style pass: output, statistics, and what the running
    statistics take (None when the batch is empty)."""

    y: np.ndarray
    mean: np.ndarray
    inv_std: np.ndarray
    count: int
    running: tuple[np.ndarray, np.ndarray] | None  # (mean, unbiased variance), float64; per chunk for ghosts
    comm: Any = None  # set when the statistics are global (SyncBatchNorm)
    chunks: int = 1  # batches the running statistics take (ghost batches: the chunks)


class _BatchNorm(CopyableLayer):
    """The common base of BatchNorm1d/2d/3d (and SyncBatchNorm); see the module docstring."""

    _new_lock = staticmethod(threading.Lock)
    virtual_batch_size: int | None = None  # layers pickled before it existed

    def __init__(  # noqa: PLR0917 - torch's positional signature
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: Any = "float32",
        *,
        virtual_batch_size: int | None = None,
    ) -> None:
        self.num_features = _count(num_features)
        self.virtual_batch_size = _ghost.check_size(virtual_batch_size)
        self.eps: float = _real(eps, "eps")
        self.momentum: float | None = None if momentum is None else _real(momentum, "momentum")
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = _layer_dtype(dtype)
        self.training = True
        self.grads: dict[str, np.ndarray] = {}
        self._precise_stats: Any = None  # an accumulator while inside bn.precise_statistics (_precise.py)
        self._lock = self._new_lock()
        self._saved: Saved | None = None
        c, dt = self.num_features, self.dtype
        self._weight: np.ndarray | None = np.ones(c, dt) if self.affine else None
        self._bias: np.ndarray | None = np.zeros(c, dt) if self.affine else None
        self._running_mean: np.ndarray | None = np.zeros(c, dt) if self.track_running_stats else None
        self._running_var: np.ndarray | None = np.ones(c, dt) if self.track_running_stats else None
        self._num_batches_tracked: np.ndarray | None = np.array(0, np.int64) if self.track_running_stats else None

    # ---- parameters and buffers (NumPy arrays, or None where the layer has none)

    def _set_vector(self, name: str, value: Any) -> None:
        current = getattr(self, "_" + name)
        if value is current and current is not None:  # m.weight -= ...: updated in place already
            return
        if value is None:
            if current is not None:
                raise ValueError(f"{name} cannot be set to None on this layer")
            return
        if current is None:
            raise ValueError(f"this layer has no {name} (affine={self.affine}, track={self.track_running_stats})")
        a = np.array(real_array(_to_numpy(value), name), dtype=self.dtype, copy=True)
        if a.shape != (self.num_features,):
            raise ValueError(f"{name} must have shape ({self.num_features},), got {a.shape}")
        with self._lock:
            setattr(self, "_" + name, a)

    @property
    def weight(self) -> np.ndarray | None:
        """gamma, shape (num_features,), or None when affine=False."""
        return self._weight

    @weight.setter
    def weight(self, value: Any) -> None:
        self._set_vector("weight", value)

    @property
    def bias(self) -> np.ndarray | None:
        """beta, shape (num_features,), or None when affine=False."""
        return self._bias

    @bias.setter
    def bias(self, value: Any) -> None:
        self._set_vector("bias", value)

    @property
    def running_mean(self) -> np.ndarray | None:
        """Running mean (None when track_running_stats=False)."""
        return self._running_mean

    @running_mean.setter
    def running_mean(self, value: Any) -> None:
        self._set_vector("running_mean", value)

    @property
    def running_var(self) -> np.ndarray | None:
        """Running unbiased variance (None when track_running_stats=False)."""
        return self._running_var

    @running_var.setter
    def running_var(self, value: Any) -> None:
        self._set_vector("running_var", value)

    @property
    def num_batches_tracked(self) -> np.ndarray | None:
        """Training calls so far: an int64 0-d array (None when track_running_stats=False)."""
        return self._num_batches_tracked

    @num_batches_tracked.setter
    def num_batches_tracked(self, value: Any) -> None:
        if self._num_batches_tracked is None:
            raise ValueError("this layer has no num_batches_tracked (track_running_stats=False)")
        a = _batch_count(_to_numpy(value))
        if a.shape != ():
            raise ValueError(f"num_batches_tracked must be a scalar, got shape {a.shape}")
        with self._lock:
            self._num_batches_tracked = a

    @property
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        """{"weight", "bias"} (empty when affine=False): the arrays an optimizer updates in
        place from ``grads`` (``bn.optimizers``)."""
        if self._weight is None or self._bias is None:
            return {}
        return {"weight": self._weight, "bias": self._bias}

    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0 (in place)."""
        with self._lock:
            if self._running_mean is not None and self._running_var is not None:
                self._running_mean[...] = 0
                self._running_var[...] = 1
            if self._num_batches_tracked is not None:
                self._num_batches_tracked[...] = 0

    def reset_parameters(self) -> None:
        """Running statistics reset, weight = 1, bias = 0."""
        self.reset_running_stats()
        with self._lock:
            if self._weight is not None and self._bias is not None:
                self._weight[...] = 1
                self._bias[...] = 0

    # ---- modes

    def train(self, mode: bool = True) -> _BatchNorm:
        """Training mode (batch statistics, running statistics updated); returns self."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        return self

    def eval(self) -> _BatchNorm:
        """Inference mode (running statistics, if tracked); returns self."""
        return self.train(False)

    # ---- forward

    def _check_input_dim(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def __call__(self, x: Any, mask: Any = None) -> np.ndarray:
        return self.forward(x, mask)

    def _input(self, x: Any) -> np.ndarray:
        a = x if type(x) is np.ndarray else _to_numpy(x)
        self._check_input_dim(a)
        if not _is_floating(a.dtype):
            raise TypeError(f"expected a floating-point input (float16, bfloat16, float32, float64), got {a.dtype}")
        if not a.dtype.isnative:  # say so, rather than torch's "mixed dtype" (torch has no such tensors)
            fix = "x.astype(x.dtype.newbyteorder('='))"
            raise TypeError(f"input is a big-endian array (dtype {a.dtype.str}); convert it with {fix}")
        return _data(a, "input", 0)  # aligned (copied only if the buffer is misaligned)

    def _check_compatible(self, x: np.ndarray) -> None:
        """torch's dtype and channel-count errors (RuntimeError), for the tensors the pass uses."""
        uses_running = self._running_mean is not None  # torch passes them whenever they exist
        mixed_ok = self.dtype == np.float32 and x.dtype.name in ("float16", "bfloat16")  # torch's mixed mode
        if (self._weight is not None or uses_running) and x.dtype != self.dtype and not mixed_ok:
            if self.dtype == np.float32:
                raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        channels = x.shape[1]
        if channels != self.num_features:
            if uses_running:
                raise RuntimeError(f"running_mean should contain {channels} elements not {self.num_features}")
            if self._weight is not None:
                raise RuntimeError(f"weight should contain {channels} elements not {self.num_features}")

    def _check_eps(self, batch_stats: bool) -> None:
        if batch_stats and self.eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if self.eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")

    @staticmethod
    def _verify_batch_size(x: np.ndarray) -> None:
        if x.shape[0] * math.prod(x.shape[2:]) == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {_torch_size(x.shape)}"
            )

    def forward(self, x: Any, mask: Any = None) -> np.ndarray:
        """Normalize x (N, C, ...) along axis 1; see the class docstring for the modes.
        With ``virtual_batch_size=k``, training normalizes each chunk of k samples with its
        own statistics, as ``np.concatenate([m(c) for c in np.split(x, range(k, len(x), k))])``.

        ``mask`` (boolean or 0/1, x's shape without the channel axis, e.g. (N, L) for
        (N, C, L), or broadcastable to it): batch statistics come from the positions where
        it is true, every position is normalized with them, and the running statistics
        take the masked mean and the variance unbiased with the masked count. Where the
        call uses the running statistics (eval) it changes nothing. With
        ``virtual_batch_size`` it is a ValueError."""
        x = self._input(x)
        batch_stats = self.training or self._running_mean is None
        chunk = _ghost.chunk_of(self.virtual_batch_size, self.training, x.shape[0], mask)
        self._check_pass(x if chunk is None else _ghost.smallest(x, chunk), batch_stats)
        m = self._layer_mask(mask, x, batch_stats)
        return self._run(x, batch_stats, chunk=chunk, mask=m)

    @staticmethod
    def _layer_mask(mask: Any, x: np.ndarray, batch_stats: bool) -> np.ndarray | None:
        """The mask as the core reads it (checked), or None where the call takes no batch statistics."""
        if mask is None:
            return None
        m = _mask(_to_numpy(mask), x, AXES)
        return m if batch_stats else None

    def _run(
        self, x: np.ndarray, batch_stats: bool, comm: Any = None, chunk: int | None = None, mask: Any = None
    ) -> np.ndarray:
        """The pass on a checked input, then the commit of the state it changes."""
        with self._lock:  # a consistent snapshot of what the pass reads
            sdt = stat_dtype(x.dtype)
            weight = None if self._weight is None else np.array(self._weight, sdt)
            bias = None if self._bias is None else np.array(self._bias, sdt)
            running = (
                None
                if batch_stats or self._running_mean is None or self._running_var is None
                else (np.array(self._running_mean, sdt), np.array(self._running_var, sdt))
            )
        if running is None:
            batch = (
                self._batch_pass(x, weight, bias, comm, mask)
                if chunk is None
                else self._ghost_pass(x, weight, bias, chunk)
            )
            saved = Saved(x, weight, batch.mean, batch.inv_std, batch.count, False, batch.comm, chunk, mask)
            y = batch.y
            update = self.training and self.track_running_stats
            with self._lock:
                if update and self._precise_stats is not None:  # bn.precise_statistics: pool the batch's
                    self._precise_stats.add(  # values instead of updating the running statistics
                        x, AXES, None if mask is None else np.expand_dims(mask, 1)
                    )
                elif update:
                    self._commit_running(batch.running, batch.chunks)
                self._saved = saved
            return y
        mean, var = running
        y = np.empty_like(x)
        inv_std = np.empty_like(var)
        _core.normalize(x, y, AXES, mean, var, weight, bias, float(self.eps), False, inv_std=inv_std)
        with self._lock:
            self._saved = Saved(x, weight, mean, inv_std, 0, True)
        return y

    def _check_pass(self, x: np.ndarray, batch_stats: bool) -> None:
        """The checks torch's F.batch_norm makes before the pass (errors in torch's order)."""
        if batch_stats:
            self._verify_batch_size(x)
        self._check_eps(batch_stats)
        self._check_compatible(x)

    def _batch_pass(
        self, x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, comm: Any, mask: Any = None
    ) -> Batch:
        """One training pass of the core on this process's batch (comm: see SyncBatchNorm)."""
        sdt = stat_dtype(x.dtype)
        c = x.shape[1]
        y = np.empty_like(x)
        count = x.shape[0] * math.prod(x.shape[2:])
        if count == 0:  # torch: an empty output, running statistics untouched
            return Batch(y, np.zeros(c, sdt), np.ones(c, sdt), 0, None)
        if mask is not None:
            check_masked_count(int(np.count_nonzero(mask)), x.shape)
        mean = np.empty(c, sdt)
        var = np.empty(c, sdt)
        inv_std = np.empty(c, sdt)
        count = _core.forward(x, y, AXES, weight, bias, float(self.eps), False, mean, var, inv_std, mask=mask)
        unbiased = var.astype(np.float64) * (count / (count - 1)) if count > 1 else np.full(c, np.nan)
        return Batch(y, mean, inv_std, count, (mean.astype(np.float64), unbiased))

    def _ghost_pass(self, x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, chunk: int) -> Batch:
        """One training pass over ghost batches of `chunk` samples: statistics per chunk."""
        sdt = stat_dtype(x.dtype)
        ch = _ghost.chunks(x.shape[0], chunk)
        shape = (ch.number, x.shape[1])
        y = np.empty_like(x)
        if x.size == 0:  # every chunk empty: as torch on each, running statistics untouched
            return Batch(y, np.zeros(shape, sdt), np.ones(shape, sdt), 0, None, chunks=ch.number)
        mean, var, inv_std = np.empty(shape, sdt), np.empty(shape, sdt), np.empty(shape, sdt)
        _ghost.forward(x, y, weight, bias, float(self.eps), ch, mean, var, inv_std)
        unbiased = _ghost.unbiased(var, ch.values(_ghost.values_per_sample(x)))
        return Batch(y, mean, inv_std, 0, (mean.astype(np.float64), unbiased), chunks=ch.number)

    def _commit_running(self, stats: tuple[np.ndarray, np.ndarray] | None, batches: int = 1) -> None:
        """num_batches_tracked += batches and the running update by each batch's statistics
        in turn (rows of stats); call with the lock held."""
        nbt = self._num_batches_tracked
        rm, rv = self._running_mean, self._running_var
        if nbt is None or rm is None or rv is None:
            return
        if stats is not None:
            weights = _ghost.factors(self.momentum, int(nbt), batches)
            mean, unbiased = (s.reshape(batches, -1) for s in stats)
            new_mean = _ghost.running_after(rm, mean, weights).astype(self.dtype)
            new_var = _ghost.running_after(rv, unbiased, weights).astype(self.dtype)
            rm[...] = new_mean  # both computed first: nothing that can fail runs between the writes
            rv[...] = new_var
        nbt += batches

    # ---- backward

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the last call with respect to its input, for the output gradient dy.

        Batch statistics (training, or track_running_stats=False): the full batch-norm
        gradient; running statistics (eval): dx = weight * dy / sqrt(running_var + eps).
        Sets ``self.grads`` to {"weight": sum(dy * x_hat), "bias": sum(dy)} (affine only).
        The last input is kept by reference (as autograd saves it): changing it in place
        between the call and backward changes the gradient.
        """
        saved = self._last_call()
        g = self._backward_input(saved, dy)
        dx = np.empty_like(saved.x)
        dgamma, dbeta = self._backward_pass(saved, g, dx)
        grads = {} if self._weight is None else {"weight": dgamma.astype(self.dtype), "bias": dbeta.astype(self.dtype)}
        with self._lock:
            self.grads = grads
        return dx

    def _last_call(self) -> Saved:
        with self._lock:
            saved = self._saved
        if saved is None:
            raise RuntimeError("backward() called before any forward call of this layer")
        return saved

    def _backward_input(self, saved: Saved, dy: Any) -> np.ndarray:
        """dy checked against the saved input (shape; dtype cast to the input's)."""
        x = saved.x
        g = _to_numpy(dy)
        if g.shape != x.shape:
            raise ValueError(f"dy has shape {g.shape}; expected {x.shape}, the shape of the last input")
        if g.dtype != x.dtype:
            if not _is_floating(g.dtype):
                raise TypeError(f"dy must be a floating-point array, got {g.dtype}")
            g = g.astype(x.dtype)
        return _data(g, "dy", 0)

    def _backward_pass(self, saved: Saved, dy: np.ndarray, dx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sdt = stat_dtype(saved.x.dtype)
        if saved.chunk is not None:  # ghost batches: gradients per chunk, summed
            dgammas, dbetas = np.zeros_like(saved.mean), np.zeros_like(saved.mean)
            if saved.x.size:
                ch = _ghost.chunks(saved.x.shape[0], saved.chunk)
                _ghost.backward(dy, saved.x, dx, saved.mean, saved.inv_std, saved.weight, ch, dgammas, dbetas)
            return dgammas.sum(0, dtype=np.float64).astype(sdt), dbetas.sum(0, dtype=np.float64).astype(sdt)
        c = saved.mean.shape[0]
        dgamma = np.empty(c, sdt)
        dbeta = np.empty(c, sdt)
        _core.backward(
            dy, saved.x, dx, AXES, saved.mean, saved.inv_std, saved.weight, None, False, dgamma, dbeta, saved.fixed,
            mask=saved.mask,
        )  # fmt: skip
        return dgamma, dbeta

    # ---- state dict

    def _state_names(self) -> list[str]:
        names = list(_PARAMS) if self.affine else []
        return names + (list(_BUFFERS) if self.track_running_stats else [])

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """torch's keys, in torch's order: weight, bias, running_mean, running_var,
        num_batches_tracked (those the layer has). The values are copies."""
        with self._lock:
            return OrderedDict((k, np.array(getattr(self, "_" + k), copy=True)) for k in self._state_names())

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Load torch-keyed values (NumPy arrays, array-likes or CPU torch tensors).

        As torch: with ``strict`` missing and unexpected keys are errors; shape mismatches
        always are (a 1-element array loads into num_batches_tracked); a state dict without
        torch's ``_metadata`` version 2 may omit num_batches_tracked (the current value
        stays). All errors are reported together in one RuntimeError, and the layer is
        left unchanged by a load that raises.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict)}.")
        names = self._state_names()
        metadata = getattr(state_dict, "_metadata", None)
        version = metadata.get("", {}).get("version") if isinstance(metadata, Mapping) else None
        optional = {"num_batches_tracked"} if (version is None or version < 2) else set()
        missing = [k for k in names if k not in state_dict and k not in optional]
        unexpected = [k for k in state_dict if k not in names]
        errors: list[str] = []
        new: dict[str, np.ndarray] = {}
        for k in names:
            if k not in state_dict:
                continue
            try:
                value = _to_numpy(state_dict[k])
            except Exception as e:
                errors.append(f'While copying the parameter named "{k}", an exception occurred: {e!r}.')
                continue
            expected: tuple[int, ...] = () if k == "num_batches_tracked" else (self.num_features,)
            if k == "num_batches_tracked" and value.shape == (1,):
                value = value.reshape(())
            if value.shape != expected:
                errors.append(
                    f"size mismatch for {k}: copying a param with shape {_torch_size(value.shape)} from "
                    f"checkpoint, the shape in current model is {_torch_size(expected)}."
                )
                continue
            try:
                if k == "num_batches_tracked":
                    new[k] = _batch_count(value)
                else:
                    new[k] = np.array(real_array(value, k), dtype=self.dtype, copy=True)
            except (TypeError, ValueError) as e:
                errors.append(f'While copying the parameter named "{k}", an exception occurred: {e!r}.')
        if strict:
            if unexpected:
                errors.insert(
                    0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected))
                )
            if missing:
                errors.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
        if errors:
            raise RuntimeError(
                "Error(s) in loading state_dict for {}:\n\t{}".format(type(self).__name__, "\n\t".join(errors))
            )
        with self._lock:  # in place, as torch's copy_ (references to the arrays see the values)
            for k, v in new.items():
                target = getattr(self, "_" + k)
                target[...] = v
        return IncompatibleKeys(missing, unexpected)

    # ---- misc

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )
        if self.dtype != np.float32:
            s = f"{s}, dtype={self.dtype.name}"
        return s if self.virtual_batch_size is None else f"{s}, virtual_batch_size={self.virtual_batch_size}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) inputs, as ``torch.nn.BatchNorm1d``."""

    def _check_input_dim(self, x: np.ndarray) -> None:
        if x.ndim not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {x.ndim}D input)")


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) inputs, as ``torch.nn.BatchNorm2d``."""

    def _check_input_dim(self, x: np.ndarray) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected 4D input (got {x.ndim}D input)")


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) inputs, as ``torch.nn.BatchNorm3d``."""

    def _check_input_dim(self, x: np.ndarray) -> None:
        if x.ndim != 5:
            raise ValueError(f"expected 5D input (got {x.ndim}D input)")
