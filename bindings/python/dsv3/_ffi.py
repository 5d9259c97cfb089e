"""The C ABI (include/dsv3.h) through ctypes: finding and loading libdsv3, the structs, the
function prototypes, status codes and errors. Everything here is private to the package."""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
import sys
from array import array
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char_p,
    c_double,
    c_float,
    c_int32,
    c_int64,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, TypeVar

#: The ABI version this binding was written for (DSV3_ABI_VERSION in include/dsv3.h).
ABI_VERSION = 1

_T = TypeVar("_T")


class Status(enum.IntEnum):
    """dsv3_status: the result of every fallible call (DSV3_OK, DSV3_ERR_*). Stable values."""

    OK = 0
    NULL_ARGUMENT = 1
    INVALID_ARGUMENT = 2
    IO = 3
    CONFIG = 4
    WEIGHTS = 5
    NON_FINITE = 6
    UNSUPPORTED = 7
    CANCELLED = 8
    BUFFER_TOO_SMALL = 9
    INTERNAL = 10


class Dsv3Error(Exception):
    """A failed dsv3 call: `code` is its Status and `message` the library's dsv3_last_error()."""

    def __init__(self, code: int, message: str) -> None:
        try:
            code = Status(code)
        except ValueError:  # a status from a newer library: keep the number
            pass
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, Status) else str(self.code)
        return f"{self.message} [{name}]"


# ---------------------------------------------------------------------------------------------
# Finding the library

if sys.platform == "darwin":
    _LIB_NAME = "libdsv3.dylib"
elif sys.platform == "win32":
    _LIB_NAME = "dsv3.dll"
else:
    _LIB_NAME = "libdsv3.so"


def _candidates() -> List[Tuple[str, Optional[str]]]:
    """(description, path or None) in lookup order."""
    out: List[Tuple[str, Optional[str]]] = []
    env = os.environ.get("DSV3_LIBRARY")
    if env:
        return [(f"$DSV3_LIBRARY={env}", env)]
    # a repository checkout: bindings/python/dsv3/_ffi.py -> <root>/target/{release,debug}
    root = Path(__file__).resolve().parents[3]
    for profile in ("release", "debug"):
        p = root / "target" / profile / _LIB_NAME
        out.append((str(p), str(p)))
    found = ctypes.util.find_library("dsv3")
    out.append((f'ctypes.util.find_library("dsv3") -> {found}', found))
    return out


def _load_library() -> ctypes.CDLL:
    tried = []
    for what, path in _candidates():
        if path is None:
            tried.append(f"{what} (not found)")
            continue
        if os.path.sep in path and not os.path.exists(path):
            tried.append(f"{what} (no such file)")
            continue
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{what} ({e})")
    raise ImportError(
        "dsv3: cannot load the dsv3 C library; tried:\n  "
        + "\n  ".join(tried)
        + "\nBuild it with `cargo build --release -p dsv3-ffi` or set DSV3_LIBRARY to the path of "
        + _LIB_NAME
    )


lib = _load_library()

# ---------------------------------------------------------------------------------------------
# Structs (field for field as in include/dsv3.h; `struct_size` first)

PROGRESS_FN = CFUNCTYPE(c_int32, c_void_p, c_float)
TOKEN_FN = CFUNCTYPE(c_int32, c_void_p, c_int32)
#: dsv3_reward_fn: (user_data, prompt, completion, answer or NULL) -> reward, NaN = does not apply.
REWARD_FN = CFUNCTYPE(c_float, c_void_p, c_char_p, c_char_p, c_char_p)


class ModelParams(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("device", c_int32),
        ("dtype", c_int32),
        ("dequantize_fp8", c_int32),
        ("attention", c_int32),
        ("progress", PROGRESS_FN),
        ("user_data", c_void_p),
    ]


class ModelInfo(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("vocab_size", c_uint64),
        ("hidden_size", c_uint64),
        ("num_layers", c_uint64),
        ("num_attention_heads", c_uint64),
        ("num_experts", c_uint64),
        ("experts_per_token", c_uint64),
        ("num_mtp_modules", c_uint64),
        ("params_total", c_uint64),
        ("params_active", c_uint64),
        ("kv_cache_bytes_per_token", c_uint64),
        ("bos_token_id", c_int64),
        ("eos_token_id", c_int64),
    ]


class SamplingParams(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("temperature", c_float),
        ("top_k", c_uint32),
        ("top_p", c_float),
        ("seed", c_uint64),
        ("max_new_tokens", c_uint32),
        ("stop_tokens", POINTER(c_int32)),
        ("n_stop_tokens", c_size_t),
    ]


class TrainParams(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("lr", c_float),
        ("min_lr", c_float),
        ("warmup_steps", c_uint64),
        ("total_steps", c_uint64),
        ("schedule", c_int32),
        ("weight_decay", c_float),
        ("clip_norm", c_float),
        ("bias_update_speed", c_float),
        ("seq_aux_alpha", c_float),
        ("aux_loss_alpha", c_float),
        ("mtp_lambda", c_float),
        ("precision", c_int32),
        ("bf16_moments", c_int32),
        ("seed", c_uint64),
    ]


class StepMetrics(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("step", c_uint64),
        ("loss", c_float),
        ("balance_loss", c_float),
        ("mtp_loss", c_float),
        ("grad_norm", c_float),
        ("lr", c_float),
        ("tokens", c_uint64),
        ("tokens_per_s", c_double),
        ("max_over_mean_load", c_float),
    ]


class GrpoParams(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("num_generations", c_uint32),
        ("max_completion_length", c_uint32),
        ("temperature", c_float),
        ("top_p", c_float),
        ("top_k", c_uint32),
        ("num_iterations", c_uint32),
        ("beta", c_float),
        ("epsilon", c_float),
        ("epsilon_high", c_float),
        ("loss_type", c_int32),
        ("scale_rewards", c_int32),
        ("sequence_level", c_int32),
        ("ref_sync_steps", c_uint64),
        ("ref_mixup_alpha", c_float),
        ("seed", c_uint64),
    ]


class GrpoMetrics(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("step", c_uint64),
        ("loss", c_float),
        ("reward", c_float),
        ("reward_std", c_float),
        ("frac_reward_zero_std", c_float),
        ("kl", c_float),
        ("clip_ratio_low", c_float),
        ("clip_ratio_high", c_float),
        ("clip_ratio_region", c_float),
        ("completion_length_mean", c_float),
        ("completion_length_max", c_uint64),
        ("clipped_ratio", c_float),
        ("grad_norm", c_float),
        ("lr", c_float),
        ("completion_tokens", c_uint64),
        ("sampling_s", c_double),
        ("learning_s", c_double),
    ]


# ---------------------------------------------------------------------------------------------
# Prototypes

_H = c_void_p  # every opaque handle
_S = c_int32  # dsv3_status (a C enum: int)
P = POINTER

_PROTOS = {
    "dsv3_version": (c_char_p, []),
    "dsv3_abi_version": (c_uint32, []),
    "dsv3_last_error": (c_char_p, []),
    "dsv3_model_params_default": (_S, [P(ModelParams)]),
    "dsv3_model_load": (_S, [c_char_p, P(ModelParams), P(_H)]),
    "dsv3_model_free": (None, [_H]),
    "dsv3_model_get_info": (_S, [_H, P(ModelInfo)]),
    "dsv3_model_config_json": (_S, [_H, c_char_p, c_size_t, P(c_size_t)]),
    "dsv3_session_new": (_S, [_H, c_size_t, P(_H)]),
    "dsv3_session_new_ex": (_S, [_H, c_size_t, c_size_t, P(_H)]),
    "dsv3_session_free": (None, [_H]),
    "dsv3_session_step": (_S, [_H, c_size_t, P(c_int32), c_size_t, P(c_float), c_size_t, P(c_size_t)]),
    "dsv3_session_length": (_S, [_H, c_size_t, P(c_size_t)]),
    "dsv3_session_reset": (_S, [_H, c_size_t]),
    "dsv3_session_truncate": (_S, [_H, c_size_t, c_size_t]),
    "dsv3_sampling_params_default": (_S, [P(SamplingParams)]),
    "dsv3_generate": (
        _S,
        [_H, P(c_int32), c_size_t, P(SamplingParams), TOKEN_FN, c_void_p, P(c_int32), c_size_t, P(c_size_t)],
    ),
    "dsv3_tokenizer_load": (_S, [c_char_p, P(_H)]),
    "dsv3_tokenizer_for_model": (_S, [_H, P(_H)]),
    "dsv3_tokenizer_free": (None, [_H]),
    "dsv3_tokenizer_encode": (_S, [_H, c_char_p, c_int32, P(c_int32), c_size_t, P(c_size_t)]),
    "dsv3_tokenizer_decode": (_S, [_H, P(c_int32), c_size_t, c_int32, c_char_p, c_size_t, P(c_size_t)]),
    "dsv3_tokenizer_token_to_id": (_S, [_H, c_char_p, P(c_int32)]),
    "dsv3_tokenizer_vocab_size": (_S, [_H, P(c_size_t)]),
    "dsv3_train_params_default": (_S, [P(TrainParams)]),
    "dsv3_trainer_new": (_S, [_H, P(TrainParams), P(_H)]),
    "dsv3_trainer_new_preset": (_S, [c_char_p, P(TrainParams), P(_H)]),
    "dsv3_trainer_free": (None, [_H]),
    "dsv3_trainer_step": (_S, [_H, P(c_int32), c_size_t, c_size_t, P(StepMetrics)]),
    "dsv3_trainer_step_sft": (_S, [_H, P(c_int32), P(c_float), c_size_t, c_size_t, P(StepMetrics)]),
    "dsv3_trainer_expert_load": (_S, [_H, c_size_t, P(c_uint32), c_size_t, P(c_size_t)]),
    "dsv3_trainer_save": (_S, [_H, c_char_p]),
    "dsv3_trainer_load": (_S, [c_char_p, P(TrainParams), P(_H)]),
    "dsv3_trainer_model": (_S, [_H, P(_H)]),
    "dsv3_grpo_params_default": (_S, [P(GrpoParams)]),
    "dsv3_grpo_new": (_S, [_H, P(TrainParams), P(GrpoParams), P(_H)]),
    "dsv3_grpo_load": (_S, [c_char_p, _H, P(TrainParams), P(GrpoParams), P(_H)]),
    "dsv3_grpo_free": (None, [_H]),
    "dsv3_grpo_add_reward": (_S, [_H, c_char_p, c_float, REWARD_FN, c_void_p]),
    "dsv3_grpo_set_stop_tokens": (_S, [_H, P(c_uint32), c_size_t]),
    "dsv3_grpo_step": (_S, [_H, _H, P(c_char_p), P(c_char_p), c_size_t, P(GrpoMetrics)]),
    "dsv3_grpo_reward_stats": (_S, [_H, c_size_t, P(c_float), P(c_float)]),
    "dsv3_grpo_completion": (_S, [_H, c_size_t, c_char_p, c_size_t, P(c_size_t), P(c_float)]),
    "dsv3_grpo_model": (_S, [_H, P(_H)]),
    "dsv3_grpo_save": (_S, [_H, c_char_p]),
}

for _name, (_res, _args) in _PROTOS.items():
    try:
        _f = getattr(lib, _name)
    except AttributeError as e:  # pragma: no cover - an older or foreign library
        raise ImportError(f"dsv3: the loaded library {lib._name} has no {_name}: {e}") from None
    _f.restype = _res
    _f.argtypes = _args

if lib.dsv3_abi_version() != ABI_VERSION:
    raise ImportError(
        f"dsv3: {lib._name} implements ABI version {lib.dsv3_abi_version()}, "
        f"this binding needs {ABI_VERSION}"
    )


def last_error() -> str:
    msg = lib.dsv3_last_error()
    return msg.decode("utf-8", "replace") if msg else ""


def check(status: int) -> None:
    """Raises Dsv3Error for a failed status, with this thread's last-error message (read at once,
    before any other dsv3 call on the thread)."""
    if status != Status.OK:
        raise Dsv3Error(status, last_error())


def defaults(struct: type, fill: Callable) -> Structure:
    """A parameter struct filled by its C *_default function. The library writes its own struct;
    to be safe against a library whose struct is larger, it writes into a padded buffer, and a
    size other than ours means the layouts differ."""
    buf = ctypes.create_string_buffer(ctypes.sizeof(struct) + 256)
    check(fill(ctypes.cast(buf, POINTER(struct))))
    p = struct.from_buffer_copy(buf.raw[: ctypes.sizeof(struct)])
    if p.struct_size != ctypes.sizeof(struct):
        raise ImportError(
            f"dsv3: {struct.__name__} is {p.struct_size} bytes in {lib._name} but "
            f"{ctypes.sizeof(struct)} bytes in this binding: rebuild the library or update the binding"
        )
    return p


# Checked once at import: a mismatch means the binding and the library disagree on a layout.
_DEFAULTS = {
    ModelParams: lib.dsv3_model_params_default,
    SamplingParams: lib.dsv3_sampling_params_default,
    TrainParams: lib.dsv3_train_params_default,
    GrpoParams: lib.dsv3_grpo_params_default,
}
for _s, _f in _DEFAULTS.items():
    defaults(_s, _f)


def new_params(struct: type) -> Structure:
    return defaults(struct, _DEFAULTS[struct])


def out_struct(struct: type) -> Structure:
    """An output struct with struct_size set (dsv3_model_info, dsv3_step_metrics)."""
    s = struct()
    s.struct_size = ctypes.sizeof(struct)
    return s


# ---------------------------------------------------------------------------------------------
# Buffers


def int32_array(ids: Iterable[int], what: str = "ids") -> Tuple["ctypes.Array", int]:
    """Token ids as (a C int32 array, its length); a TypeError/OverflowError for anything that
    is not an int32. The array is never empty (C gets a valid pointer and length 0)."""
    try:
        a = array("i", ids)
    except (OverflowError, TypeError) as e:
        raise type(e)(f"{what}: every element must be an int32 token id ({e})") from None
    if a.itemsize != 4:  # pragma: no cover - no such platform in practice
        raise ImportError("dsv3 needs a 4-byte C int")
    n = len(a)
    return ((c_int32 * n).from_buffer(a) if n else (c_int32 * 1)()), n


def float_array(values: Iterable[float], what: str) -> Tuple["ctypes.Array", int]:
    """Numbers as (a C float array, its length)."""
    try:
        a = array("f", values)
    except TypeError as e:
        raise TypeError(f"{what}: every element must be a number ({e})") from None
    n = len(a)
    return ((c_float * n).from_buffer(a) if n else (c_float * 1)()), n


def unsigned(value: int, what: str, bits: int = 64) -> int:
    """A non-negative integer that fits `bits` bits (ctypes would wrap it silently)."""
    v = int(value)
    if v != value or not 0 <= v < (1 << bits):
        raise ValueError(f"{what} must be an integer in [0, 2^{bits}), got {value!r}")
    return v


def fill_buffer(call: Callable[[object, int, object], int], ctype: type, guess: int) -> Tuple[object, int]:
    """Runs a C function that fills a buffer (`call(buf, cap, needed_ptr)`), growing the buffer
    once when the library answers DSV3_ERR_BUFFER_TOO_SMALL. Returns (buffer, needed)."""
    needed = c_size_t(0)
    cap = max(1, guess)
    for _ in range(3):
        buf = (ctype * cap)()
        st = call(buf, cap, ctypes.byref(needed))
        if st == Status.BUFFER_TOO_SMALL and needed.value > cap:
            cap = needed.value
            continue
        check(st)
        return buf, needed.value
    check(st)  # pragma: no cover - the size kept growing
    raise AssertionError("unreachable")  # pragma: no cover


def rectangular(batch: Sequence[Sequence[_T]], what: str) -> Tuple[int, int, List[_T]]:
    """(rows, columns, flat row-major list) of a rectangular batch."""
    rows = [list(r) for r in batch]
    if not rows:
        raise ValueError(f"{what}: empty batch")
    width = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            raise ValueError(f"{what}: row {i} has {len(r)} elements, row 0 has {width}")
    return len(rows), width, [x for r in rows for x in r]


def path_bytes(path: "os.PathLike[str] | str") -> bytes:
    b = os.fsencode(path)
    if b"\0" in b:
        raise ValueError("path contains a NUL character")
    return b


def text_bytes(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    b = text.encode("utf-8")
    if b"\0" in b:
        raise ValueError(f"{what} contains a NUL character, which the C API cannot take")
    return b


class CallbackGuard:
    """Wraps a Python callback for C: an exception inside it is caught (ctypes would print and
    swallow it), the C side is told to stop, and `reraise()` raises it after the C call returns."""

    def __init__(self) -> None:
        self.error: Optional[BaseException] = None

    def run(self, fn: Callable[[], object]) -> int:
        if self.error is not None:
            return 1
        try:
            return 1 if fn() is False else 0
        except BaseException as e:  # noqa: BLE001 - re-raised by reraise()
            self.error = e
            return 1

    def value(self, fn: Callable[[], _T], failed: _T) -> _T:
        """Runs fn() and returns its result; returns `failed` when it raises (the exception is
        kept for reraise()) and, without running fn, for every call after that."""
        if self.error is not None:
            return failed
        try:
            return fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by reraise()
            self.error = e
            return failed

    def reraise(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e


def version() -> str:
    """The library's version string."""
    return lib.dsv3_version().decode()
