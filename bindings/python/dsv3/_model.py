"""Models, generation and inference sessions."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
from array import array
from ctypes import byref, c_float, c_int32, c_size_t, c_void_p
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from . import _ffi
from ._ffi import lib
from ._handle import Handle

_DEVICES = {"cpu": 0, "cuda": 1}
_DTYPES = {"f32": 0, "float32": 0, "bf16": 1, "bfloat16": 1}
_ATTENTION = {"absorbed": 0, "naive": 1}


def _choice(value: Union[str, int], table: Dict[str, int], what: str) -> int:
    if isinstance(value, str):
        try:
            return table[value.lower()]
        except KeyError:
            raise ValueError(f"{what} must be one of {sorted(set(table))}, got {value!r}") from None
    return int(value)  # a raw C value: the library validates it


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What dsv3_model_get_info reports."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    #: Routed experts per MoE layer (0 for a dense model).
    num_experts: int
    experts_per_token: int
    #: MTP modules loaded.
    num_mtp_modules: int
    params_total: int
    #: Parameters used per token.
    params_active: int
    #: Latent KV cache per token over all layers, f32 bytes.
    kv_cache_bytes_per_token: int
    #: BOS / first EOS token id, or None.
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]


class Model(Handle):
    """A loaded model. Immutable once loaded: share it across threads and sessions (the C calls
    run without the GIL, so threads generating on one model run in parallel)."""

    _free = staticmethod(lib.dsv3_model_free)
    _kind = "model"
    _shared = True

    @classmethod
    def load(
        cls,
        path: Union[str, "os.PathLike[str]"],
        dequantize_fp8: bool = False,
        attention: Union[str, int] = "absorbed",
        progress: Optional[Callable[[float], Optional[bool]]] = None,
        *,
        device: Union[str, int] = "cpu",
        dtype: Union[str, int] = "f32",
    ) -> "Model":
        """Loads the model in directory `path` (config.json + safetensors, HF layout).

        dequantize_fp8: dequantize FP8 checkpoint weights to f32 at load (default: keep them FP8).
        attention: "absorbed" (default) or "naive" MLA; same results.
        progress: called with the fraction loaded in [0, 1]; returning False cancels the load
            (Dsv3Error with Status.CANCELLED). An exception it raises cancels the load and is
            re-raised here.
        device: "cpu", "cuda" (the first GPU) or "cuda:N"; sessions and generate() then run on the
            GPU (needs an NVIDIA driver; without one: Dsv3Error with Status.UNSUPPORTED). Trainers
            made from the model train on the CPU.
        dtype: "f32" (on a GPU: matches the CPU to ~1e-4) or "bf16" (GPU only).
        """
        p = _ffi.new_params(_ffi.ModelParams)
        if isinstance(device, str) and device.lower().startswith("cuda:"):
            p.device = 1 + int(device[5:])
        else:
            p.device = _choice(device, _DEVICES, "device")
        p.dtype = _choice(dtype, _DTYPES, "dtype")
        p.dequantize_fp8 = 1 if dequantize_fp8 else 0
        p.attention = _choice(attention, _ATTENTION, "attention")
        guard = _ffi.CallbackGuard()
        if progress is not None:
            cb = _ffi.PROGRESS_FN(lambda _user, fraction: guard.run(lambda: progress(fraction)))
            p.progress = cb  # kept alive by `cb` (and `p`) until the call returns
        out = c_void_p()
        st = lib.dsv3_model_load(_ffi.path_bytes(path), byref(p), byref(out))
        err = None if st == _ffi.Status.OK else _ffi.Dsv3Error(st, _ffi.last_error())
        model = cls(out.value) if out.value else None
        guard.reraise()  # the callback's exception comes first (the load was cancelled for it)
        if err is not None:
            raise err
        assert model is not None
        return model

    def info(self) -> ModelInfo:
        """The model's figures."""
        s = _ffi.out_struct(_ffi.ModelInfo)
        with self._use() as ptr:
            _ffi.check(lib.dsv3_model_get_info(ptr, byref(s)))
        values = {f.name: getattr(s, f.name) for f in dataclasses.fields(ModelInfo)}
        for k in ("bos_token_id", "eos_token_id"):
            if values[k] < 0:
                values[k] = None
        return ModelInfo(**values)

    def config(self) -> Dict[str, Any]:
        """The model's config (as the engine parsed it) as a dict."""
        with self._use() as ptr:
            buf, _ = _ffi.fill_buffer(
                lambda b, cap, needed: lib.dsv3_model_config_json(ptr, b, cap, needed), ctypes.c_char, 4096
            )
        return json.loads(buf.value.decode("utf-8"))

    def generate(
        self,
        prompt_ids: Iterable[int],
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        max_new_tokens: int = 64,
        stop_tokens: Iterable[int] = (),
        on_token: Optional[Callable[[int], Optional[bool]]] = None,
    ) -> List[int]:
        """Generates a continuation of `prompt_ids` (non-empty) and returns the new ids.

        temperature 0 is greedy; top_k 0 and top_p 1 are off. A stop token ends generation and is
        included in the output. `on_token(id)` sees each token as it is made; returning False
        stops (that token is kept). An exception it raises stops generation and is re-raised.
        """
        prompt, n_prompt = _ffi.int32_array(prompt_ids, "prompt_ids")
        stops, n_stops = _ffi.int32_array(stop_tokens, "stop_tokens")
        max_new_tokens = _ffi.unsigned(max_new_tokens, "max_new_tokens", 32)
        p = _ffi.new_params(_ffi.SamplingParams)
        p.temperature = temperature
        p.top_k = _ffi.unsigned(top_k, "top_k", 32)
        p.top_p = top_p
        p.seed = _ffi.unsigned(seed, "seed")
        p.max_new_tokens = max_new_tokens
        p.stop_tokens = ctypes.cast(stops, ctypes.POINTER(c_int32)) if n_stops else None
        p.n_stop_tokens = n_stops
        guard = _ffi.CallbackGuard()
        cb = _ffi.TOKEN_FN(lambda _user, tok: guard.run(lambda: on_token(tok))) if on_token else _ffi.TOKEN_FN()
        out = (c_int32 * max(1, max_new_tokens))()
        n_out = c_size_t(0)
        with self._use() as ptr:
            st = lib.dsv3_generate(ptr, prompt, n_prompt, byref(p), cb, None, out, max_new_tokens, byref(n_out))
            err = None if st == _ffi.Status.OK else _ffi.Dsv3Error(st, _ffi.last_error())
        guard.reraise()
        if err is not None:
            raise err
        return list(out[: n_out.value])

    def session(self, slots: int = 1, max_len: int = 0) -> "Session":
        """An inference session with `slots` empty sequences. On a GPU model each slot's latent
        cache holds `max_len` tokens (0: min(max_position_embeddings, 4096)), allocated now; on the
        CPU caches grow as needed."""
        vocab = self.info().vocab_size
        slots = _ffi.unsigned(slots, "slots")
        max_len = _ffi.unsigned(max_len, "max_len")
        out = c_void_p()
        with self._use() as ptr:
            _ffi.check(lib.dsv3_session_new_ex(ptr, slots, max_len, byref(out)))
        return Session(out.value, slots, vocab)

    def tokenizer(self) -> "Any":
        """The model's tokenizer (Tokenizer.for_model(self))."""
        from ._tokenizer import Tokenizer

        return Tokenizer.for_model(self)


class Session(Handle):
    """An inference session over a fixed number of sequence slots, each with its KV cache.
    One thread at a time (calls from several threads are serialized)."""

    _free = staticmethod(lib.dsv3_session_free)
    _kind = "session"

    def __init__(self, ptr: int, slots: int, vocab_size: int) -> None:
        """Internal: use Model.session()."""
        super().__init__(ptr)
        self.slots = slots
        self.vocab_size = vocab_size

    def step(self, slot: int, ids: Iterable[int], logits: bool = True) -> Optional["array[float]"]:
        """Appends `ids` to `slot` (prefill when several, decode when one) and returns the logits
        of the last token as an array('f') of vocab_size floats (None when logits=False). On
        failure the slot's cache is unchanged."""
        buf, n = _ffi.int32_array(ids, "ids")
        slot = _ffi.unsigned(slot, "slot")
        needed = c_size_t(0)
        if logits:
            out = array("f", bytes(4 * self.vocab_size))
            dst = (c_float * self.vocab_size).from_buffer(out)
        else:
            out, dst = None, None
        with self._use() as ptr:
            _ffi.check(lib.dsv3_session_step(ptr, slot, buf, n, dst, self.vocab_size if logits else 0, byref(needed)))
        return out

    def length(self, slot: int = 0) -> int:
        """Tokens cached in `slot`."""
        n = c_size_t(0)
        with self._use() as ptr:
            _ffi.check(lib.dsv3_session_length(ptr, _ffi.unsigned(slot, "slot"), byref(n)))
        return n.value

    def reset(self, slot: int = 0) -> None:
        """Empties `slot`."""
        with self._use() as ptr:
            _ffi.check(lib.dsv3_session_reset(ptr, _ffi.unsigned(slot, "slot")))

    def truncate(self, slot: int, length: int) -> None:
        """Keeps the first `length` tokens of `slot`."""
        with self._use() as ptr:
            _ffi.check(lib.dsv3_session_truncate(ptr, _ffi.unsigned(slot, "slot"), _ffi.unsigned(length, "length")))
