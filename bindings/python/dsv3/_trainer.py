"""Training: trainers from a model, a preset or a checkpoint; steps, metrics, expert loads."""

from __future__ import annotations

import dataclasses
import enum
import os
from ctypes import byref, c_uint32, c_void_p
from typing import Any, List, Sequence, Union

from . import _ffi
from ._ffi import lib
from ._handle import Handle
from ._model import Model


class Schedule(enum.IntEnum):
    """The learning-rate schedule (dsv3_train_params.schedule)."""

    CONSTANT = 0
    #: Linear warmup, then cosine decay to min_lr over total_steps (the default).
    WARMUP_COSINE = 1
    #: DeepSeek-V3's step schedule.
    DEEPSEEK_V3 = 2


class Precision(enum.IntEnum):
    """GEMM precision of the decoder's linear layers (dsv3_train_params.precision)."""

    F32 = 0
    BF16 = 1
    FP8 = 2


_FIELDS = [name for name, _ in _ffi.TrainParams._fields_ if name != "struct_size"]
_ENUMS = {"schedule": Schedule, "precision": Precision}


def _train_params(params: dict) -> _ffi.TrainParams:
    """A dsv3_train_params: the C defaults, then the keyword arguments (the field names of the
    struct: lr, min_lr, warmup_steps, total_steps, schedule, weight_decay, clip_norm,
    bias_update_speed, seq_aux_alpha, aux_loss_alpha, mtp_lambda, precision, bf16_moments, seed)."""
    p = _ffi.new_params(_ffi.TrainParams)
    for k, v in params.items():
        if k not in _FIELDS:
            raise TypeError(f"unknown training parameter {k!r}; the parameters are {', '.join(_FIELDS)}")
        if k in _ENUMS and isinstance(v, str):
            try:
                v = _ENUMS[k][v.upper()]
            except KeyError:
                names = [m.name.lower() for m in _ENUMS[k]]
                raise ValueError(f"{k} must be one of {names}, got {v!r}") from None
        if k in ("warmup_steps", "total_steps", "seed"):
            v = _ffi.unsigned(v, k)
        if k == "bf16_moments":
            v = 1 if v else 0
        setattr(p, k, v)
    return p


def default_train_params() -> dict:
    """The C library's default training parameters, as a dict."""
    p = _ffi.new_params(_ffi.TrainParams)
    return {k: getattr(p, k) for k in _FIELDS}


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """What one training step reports."""

    #: The step's index (0-based).
    step: int
    #: Mean next-token cross-entropy over the counted positions.
    loss: float
    balance_loss: float
    mtp_loss: float
    #: Global gradient norm before clipping.
    grad_norm: float
    lr: float
    tokens: int
    tokens_per_s: float
    #: Largest (max load / mean load) over the MoE layers; 1 = balanced.
    max_over_mean_load: float


class Trainer(Handle):
    """A trainer: f32 master weights, gradients and AdamW state. One thread at a time (calls
    from several threads are serialized).

    Keyword arguments are dsv3_train_params fields (C defaults for the rest): lr, min_lr,
    warmup_steps, total_steps, schedule (Schedule or "constant"/"warmup_cosine"/"deepseek_v3"),
    weight_decay, clip_norm, bias_update_speed, seq_aux_alpha, aux_loss_alpha, mtp_lambda,
    precision (Precision or "f32"/"bf16"/"fp8"), bf16_moments, seed.
    """

    _free = staticmethod(lib.dsv3_trainer_free)
    _kind = "trainer"

    def __init__(self, model: Model, **train_params: Any) -> None:
        """A trainer starting from `model`'s weights (copied: the model is unaffected)."""
        p = _train_params(train_params)
        out = c_void_p()
        with model._use() as ptr:
            _ffi.check(lib.dsv3_trainer_new(ptr, byref(p), byref(out)))
        super().__init__(out.value)

    @classmethod
    def _wrap(cls, ptr: int) -> "Trainer":
        t = cls.__new__(cls)
        Handle.__init__(t, ptr)
        return t

    @classmethod
    def from_preset(cls, name: str, **train_params: Any) -> "Trainer":
        """A trainer for a fresh, randomly initialized model of a preset ("tiny", "bench-4m",
        "bench-88m"), seeded with `seed`."""
        p = _train_params(train_params)
        out = c_void_p()
        _ffi.check(lib.dsv3_trainer_new_preset(_ffi.text_bytes(name, "preset"), byref(p), byref(out)))
        return cls._wrap(out.value)

    @classmethod
    def load(cls, directory: Union[str, "os.PathLike[str]"], **train_params: Any) -> "Trainer":
        """Resumes a checkpoint written by save() (or `dsv3 train`)."""
        p = _train_params(train_params)
        out = c_void_p()
        _ffi.check(lib.dsv3_trainer_load(_ffi.path_bytes(directory), byref(p), byref(out)))
        return cls._wrap(out.value)

    def _step(self, batch: Sequence[Sequence[int]], mask: Any) -> StepMetrics:
        rows, cols, flat = _ffi.rectangular(batch, "batch")
        ids, _ = _ffi.int32_array(flat, "batch")
        m = _ffi.out_struct(_ffi.StepMetrics)
        if mask is None:
            with self._use() as ptr:
                _ffi.check(lib.dsv3_trainer_step(ptr, ids, rows, cols, byref(m)))
        else:
            mrows, mcols, mflat = _ffi.rectangular(mask, "mask")
            if (mrows, mcols) != (rows, cols - 1):
                raise ValueError(f"mask must be [{rows}][{cols - 1}] (batch x seq_len - 1), got [{mrows}][{mcols}]")
            fmask, _ = _ffi.float_array(mflat, "mask")
            with self._use() as ptr:
                _ffi.check(lib.dsv3_trainer_step_sft(ptr, ids, fmask, rows, cols, byref(m)))
        return StepMetrics(**{f.name: getattr(m, f.name) for f in dataclasses.fields(StepMetrics)})

    def step(self, batch: Sequence[Sequence[int]]) -> StepMetrics:
        """One optimizer step on `batch` (equal-length sequences of token ids, each of at least 2),
        next-token loss on every position. On failure the weights are unchanged."""
        return self._step(batch, None)

    def step_sft(self, batch: Sequence[Sequence[int]], mask: Sequence[Sequence[float]]) -> StepMetrics:
        """Like step() with a loss mask [batch][seq_len - 1]: position t (predicting token t+1)
        counts with weight mask[t] (1 = completion token, 0 = prompt)."""
        return self._step(batch, mask)

    def expert_load(self, layer: int) -> List[int]:
        """Tokens routed to each expert of MoE layer `layer` (0 = the first MoE layer) in the last
        step."""
        layer = _ffi.unsigned(layer, "layer")
        with self._use() as ptr:
            buf, n = _ffi.fill_buffer(
                lambda out, cap, needed: lib.dsv3_trainer_expert_load(ptr, layer, out, cap, needed), c_uint32, 256
            )
        return list(buf[:n])

    def save(self, directory: Union[str, "os.PathLike[str]"]) -> None:
        """Writes a checkpoint directory (HF-format model + optimizer + trainer state),
        atomically."""
        with self._use() as ptr:
            _ffi.check(lib.dsv3_trainer_save(ptr, _ffi.path_bytes(directory)))

    def model(self) -> Model:
        """A Model with the trainer's current weights (a snapshot, for inference)."""
        out = c_void_p()
        with self._use() as ptr:
            _ffi.check(lib.dsv3_trainer_model(ptr, byref(out)))
        return Model(out.value)
