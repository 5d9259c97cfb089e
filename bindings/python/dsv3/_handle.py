"""Ownership of a C handle: close() frees it once (also from __del__ as a safety net), and a lock
keeps one thread at a time in the C calls of handles that the C API says are single-threaded."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional


class Handle:
    _free: Callable[[int], None]
    _kind = "handle"
    #: True for handles that may be used by several threads at once (a model).
    _shared = False

    def __init__(self, ptr: int) -> None:
        self._ptr: Optional[int] = ptr
        self._lock = threading.Lock()
        self._busy = 0  # calls in flight (shared handles)

    @contextmanager
    def _use(self) -> Iterator[int]:
        """The raw pointer, for the duration of one C call (or a series of them)."""
        if self._shared:
            with self._lock:
                ptr = self._live()
                self._busy += 1
            try:
                yield ptr
            finally:
                with self._lock:
                    self._busy -= 1
        else:
            with self._lock:
                yield self._live()

    def _live(self) -> int:
        if self._ptr is None:
            raise ValueError(f"the {self._kind} is closed")
        return self._ptr

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        """Frees the C object. Closing again is a no-op."""
        with self._lock:
            if self._shared and self._busy:
                raise RuntimeError(f"the {self._kind} is in use by a call in progress")
            ptr, self._ptr = self._ptr, None
        if ptr is not None:
            type(self)._free(ptr)

    def __enter__(self):
        self._live()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # a safety net: the object was never closed (or __init__ failed half-way)
        ptr = getattr(self, "_ptr", None)
        if ptr is not None:
            self._ptr = None
            try:
                type(self)._free(ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def __repr__(self) -> str:
        state = "closed" if self._ptr is None else f"at 0x{self._ptr:x}"
        return f"<dsv3.{type(self).__name__} {state}>"
