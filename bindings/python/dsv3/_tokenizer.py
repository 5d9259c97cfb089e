"""Tokenizers: a HF tokenizer.json, or a model's own (its tokenizer.json or the byte tokenizer)."""

from __future__ import annotations

import ctypes
import os
from ctypes import byref, c_int32, c_size_t, c_void_p
from typing import TYPE_CHECKING, Iterable, List, Union

from . import _ffi
from ._ffi import lib
from ._handle import Handle

if TYPE_CHECKING:
    from ._model import Model


class Tokenizer(Handle):
    """A tokenizer. One thread at a time (calls from several threads are serialized)."""

    _free = staticmethod(lib.dsv3_tokenizer_free)
    _kind = "tokenizer"

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "Tokenizer":
        """Loads a HF tokenizer.json."""
        out = c_void_p()
        _ffi.check(lib.dsv3_tokenizer_load(_ffi.path_bytes(path), byref(out)))
        return cls(out.value)

    @classmethod
    def for_model(cls, model: "Model") -> "Tokenizer":
        """The tokenizer of a model's directory: its tokenizer.json, or the built-in byte
        tokenizer for a byte-level vocabulary (259 ids: bytes, then <bos>, <eos>, <pad>)."""
        out = c_void_p()
        with model._use() as ptr:
            _ffi.check(lib.dsv3_tokenizer_for_model(ptr, byref(out)))
        return cls(out.value)

    def encode(self, text: str, add_special: bool = True) -> List[int]:
        """The ids of `text`; add_special adds the tokenizer's special tokens (e.g. BOS)."""
        b = _ffi.text_bytes(text, "text")
        flag = 1 if add_special else 0
        with self._use() as ptr:
            buf, n = _ffi.fill_buffer(
                lambda out, cap, needed: lib.dsv3_tokenizer_encode(ptr, b, flag, out, cap, needed),
                c_int32,
                len(b) + 8,
            )
        return list(buf[:n])

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """The text of `ids`; skip_special drops special tokens."""
        arr, n = _ffi.int32_array(ids, "ids")
        flag = 1 if skip_special else 0
        with self._use() as ptr:
            buf, needed = _ffi.fill_buffer(
                lambda out, cap, needed: lib.dsv3_tokenizer_decode(ptr, arr, n, flag, out, cap, needed),
                ctypes.c_char,
                8 * n + 16,
            )
        # `needed` counts the NUL; a decoded text may itself hold NULs (byte 0 of a byte tokenizer)
        return buf.raw[: needed - 1].decode("utf-8", "replace")

    def token_to_id(self, token: str) -> int:
        """The id of a token string (e.g. "<｜end▁of▁sentence｜>"); Dsv3Error with
        Status.INVALID_ARGUMENT when the vocabulary has no such token."""
        out = c_int32()
        b = _ffi.text_bytes(token, "token")
        with self._use() as ptr:
            _ffi.check(lib.dsv3_tokenizer_token_to_id(ptr, b, byref(out)))
        return out.value

    @property
    def vocab_size(self) -> int:
        """The vocabulary size, added tokens included."""
        out = c_size_t()
        with self._use() as ptr:
            _ffi.check(lib.dsv3_tokenizer_vocab_size(ptr, byref(out)))
        return out.value
