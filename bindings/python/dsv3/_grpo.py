"""GRPO (group relative policy optimization): a trainer that samples groups of completions for
text prompts, scores them with built-in rule rewards and Python reward functions, and learns
from the group-relative advantages (TRL's GRPOTrainer, over dsv3_grpo_* of the C ABI)."""

from __future__ import annotations

import ctypes
import enum
import math
import numbers
import os
import threading
from contextlib import contextmanager
from ctypes import byref, c_char_p, c_float, c_uint32, c_void_p
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from . import _ffi
from ._ffi import lib
from ._handle import Handle
from ._model import Model
from ._tokenizer import Tokenizer
from ._trainer import _train_params

#: A Python reward: (prompt, completion, reference answer or None) -> reward, or None (or NaN)
#: when it does not apply to this completion.
RewardFn = Callable[[str, str, Optional[str]], Optional[float]]


class LossType(enum.IntEnum):
    """How the GRPO loss is normalized (dsv3_grpo_params.loss_type, TRL's loss_type)."""

    GRPO = 0
    BNPO = 1
    DR_GRPO = 2
    #: The default.
    DAPO = 3


class ScaleRewards(enum.IntEnum):
    """How advantages are scaled (dsv3_grpo_params.scale_rewards, TRL's scale_rewards)."""

    #: By the std of the group's rewards (the default).
    GROUP = 0
    BATCH = 1
    NONE = 2


_GRPO_FIELDS = [name for name, _ in _ffi.GrpoParams._fields_ if name != "struct_size"]
_GRPO_ENUMS = {"loss_type": LossType, "scale_rewards": ScaleRewards}
_GRPO_UNSIGNED = {
    "num_generations": 32,
    "max_completion_length": 32,
    "top_k": 32,
    "num_iterations": 32,
    "ref_sync_steps": 64,
    "seed": 64,
}
_GRPO_FLOATS = ("temperature", "top_p", "beta", "epsilon", "epsilon_high", "ref_mixup_alpha")
# dsv3_train_params fields that make no sense for a GRPO trainer: the weights come from the model
# (the seed only initializes presets), and dsv3_grpo_new keeps the routing bias fixed.
_TRAIN_EXCLUDED = {
    "seed": "`seed` is the GRPO sampling seed (the weights come from the model)",
    "bias_update_speed": "GRPO keeps the routing bias fixed (dsv3_grpo_new sets bias_update_speed to 0)",
}
_TRAIN_FIELDS = [name for name, _ in _ffi.TrainParams._fields_ if name != "struct_size" and name not in _TRAIN_EXCLUDED]

# On a reward function's exception the binding returns +inf to C: the library rejects a non-finite
# reward (DSV3_ERR_NON_FINITE) before any optimizer step, so the weights stay as they were and the
# step is not counted; the exception is then re-raised from step().
_ABORT = math.inf


def _enum_value(k: str, v: Any) -> int:
    table = _GRPO_ENUMS[k]
    if k == "scale_rewards" and isinstance(v, bool):  # TRL: True = "group", False = "none"
        return ScaleRewards.GROUP if v else ScaleRewards.NONE
    if isinstance(v, str):
        try:
            return table[v.upper()]
        except KeyError:
            names = [m.name.lower() for m in table]
            raise ValueError(f"{k} must be one of {names}, got {v!r}") from None
    if isinstance(v, int):
        return int(v)  # a raw C value: the library validates it
    raise TypeError(f"{k} must be a {table.__name__} or a str, not {type(v).__name__}")


def _grpo_params(params: Dict[str, Any]) -> _ffi.GrpoParams:
    """A dsv3_grpo_params: the C defaults, then the keyword arguments."""
    p = _ffi.new_params(_ffi.GrpoParams)
    for k, v in params.items():
        if k in _GRPO_ENUMS:
            v = _enum_value(k, v)
        elif k in _GRPO_UNSIGNED:
            v = _ffi.unsigned(v, k, _GRPO_UNSIGNED[k])
        elif k == "sequence_level":
            v = 1 if v else 0
        elif k in _GRPO_FLOATS:
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise TypeError(f"{k} must be a number, got {v!r}") from None
        setattr(p, k, v)
    return p


def _split_params(params: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(training keywords, GRPO keywords); a TypeError names an unknown keyword."""
    train, grpo = {}, {}
    for k, v in params.items():
        if k in _GRPO_FIELDS:
            grpo[k] = v
        elif k in _TRAIN_FIELDS:
            train[k] = v
        else:
            why = f" ({_TRAIN_EXCLUDED[k]})" if k in _TRAIN_EXCLUDED else ""
            raise TypeError(
                f"unknown GRPO trainer parameter {k!r}{why}; the GRPO parameters are "
                f"{', '.join(_GRPO_FIELDS)}; the training parameters are {', '.join(_TRAIN_FIELDS)}"
            )
    return train, grpo


def default_grpo_params() -> Dict[str, Any]:
    """The C library's default GRPO parameters (TRL's defaults), as a dict."""
    p = _ffi.new_params(_ffi.GrpoParams)
    out: Dict[str, Any] = {k: getattr(p, k) for k in _GRPO_FIELDS}
    for k, table in _GRPO_ENUMS.items():
        out[k] = table(out[k])
    out["sequence_level"] = bool(out["sequence_level"])
    return out


def _text(b: Optional[bytes]) -> Optional[str]:
    return None if b is None else b.decode("utf-8", "replace")


class Grpo(Handle):
    """A GRPO trainer: the policy (a copy of the model's weights), its optimizer, the reference
    model (beta > 0), the reward functions and the last batch. One thread at a time (calls from
    several threads are serialized).

    Keyword arguments are the fields of dsv3_grpo_params (TRL's names; C defaults for the rest,
    see default_grpo_params()): num_generations (G, >= 2), max_completion_length, temperature,
    top_p, top_k, num_iterations (mu), beta, epsilon, epsilon_high, loss_type (LossType or
    "grpo"/"bnpo"/"dr_grpo"/"dapo"), scale_rewards (ScaleRewards or "group"/"batch"/"none", or a
    bool), sequence_level (GSPO), ref_sync_steps, ref_mixup_alpha, seed (of the sampling); and the
    optimizer's fields of dsv3_train_params: lr, min_lr, warmup_steps, total_steps, schedule,
    weight_decay, clip_norm, seq_aux_alpha, aux_loss_alpha, mtp_lambda, precision, bf16_moments.
    """

    _free = staticmethod(lib.dsv3_grpo_free)
    _kind = "GRPO trainer"

    def __init__(self, model: Model, **params: Any) -> None:
        """A GRPO trainer starting from `model`'s weights (copied: the model is unaffected).
        Completions stop at the model's EOS (see set_stop_tokens). Add a reward before step()."""
        train, grpo = _split_params(params)
        tp = _train_params(train)
        gp = _grpo_params(grpo)
        out = c_void_p()
        with model._use() as ptr:
            _ffi.check(lib.dsv3_grpo_new(ptr, byref(tp), byref(gp), byref(out)))
        self._setup(out.value, gp.num_generations)

    @classmethod
    def load(
        cls,
        directory: Union[str, "os.PathLike[str]"],
        reference: Optional[Model] = None,
        **params: Any,
    ) -> "Grpo":
        """Resumes a checkpoint written by save(): the policy, its optimizer state and the step
        count. `reference` is the frozen reference for beta > 0 (copied; None: the loaded policy).
        Keyword arguments as for Grpo(); rewards are not saved: add them again."""
        train, grpo = _split_params(params)
        tp = _train_params(train)
        gp = _grpo_params(grpo)
        out = c_void_p()
        with reference._use() if reference is not None else _null() as rptr:
            _ffi.check(lib.dsv3_grpo_load(_ffi.path_bytes(directory), rptr, byref(tp), byref(gp), byref(out)))
        self = cls.__new__(cls)
        self._setup(out.value, gp.num_generations)
        return self

    def _setup(self, ptr: Optional[int], num_generations: int) -> None:
        super().__init__(ptr)
        #: Completions per prompt (G).
        self.num_generations: int = num_generations
        self._rewards: List[str] = []
        self._callbacks: List[Any] = []  # the CFUNCTYPE objects C holds, alive as long as we are
        self._guard = _ffi.CallbackGuard()
        self._stepping: Optional[int] = None  # the thread inside step() (reward functions run on it)
        self._last_count = 0  # completions of the last successful step

    # A reward function runs inside step(), on the thread holding the lock: a call back into the
    # trainer would deadlock (or alias the trainer C is stepping), so it raises instead.
    def _reentered(self) -> None:
        if self._stepping is not None and self._stepping == threading.get_ident():
            raise RuntimeError("a reward function cannot use the GRPO trainer that is calling it")

    @contextmanager
    def _use(self) -> Iterator[int]:
        self._reentered()
        with super()._use() as ptr:
            yield ptr

    def close(self) -> None:
        self._reentered()
        super().close()

    @property
    def rewards(self) -> List[str]:
        """The names of the reward functions, in the order added."""
        return list(self._rewards)

    def add_reward(self, name: str, weight: float = 1.0, fn: Optional[RewardFn] = None) -> None:
        """Adds a reward function with `weight` (the rewards' weighted sum is a completion's
        reward).

        Without `fn`, `name` picks a built-in rule reward: "accuracy" (`\\boxed{}` / `<answer>`
        vs the reference answer), "exact" (the completion's first line vs the reference),
        "format" (R1's `<think>...</think><answer>...</answer>`), "language" (English reasoning),
        "language-zh".

        With `fn(prompt, completion, answer)`, Python computes it (`name` labels its metrics): it
        is called once per completion with the texts and the prompt's reference answer (None when
        the prompt has none), and returns a float, or None (or NaN) when the reward does not apply
        (skipped in the weighted sum, as TRL's None). An exception it raises fails the step (no
        optimizer step is taken) and is re-raised from step(); it must not call this trainer.
        """
        b = _ffi.text_bytes(name, "name")
        if name in self._rewards:
            raise ValueError(f"a reward named {name!r} was already added (names label the metrics)")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise TypeError(f"weight must be a number, got {weight!r}") from None
        if fn is None:
            cb = _ffi.REWARD_FN()
        elif not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        else:
            guard = self._guard

            def score(prompt: bytes, completion: bytes, answer: Optional[bytes]) -> float:
                r = fn(_text(prompt), _text(completion), _text(answer))  # type: ignore[arg-type]
                if r is None:
                    return math.nan
                if not isinstance(r, numbers.Real):
                    raise TypeError(f"reward {name!r} returned {r!r}: a reward is a float or None")
                return float(r)

            cb = _ffi.REWARD_FN(lambda _user, p, c, a: guard.value(lambda: score(p, c, a), _ABORT))
        with self._use() as ptr:
            _ffi.check(lib.dsv3_grpo_add_reward(ptr, b, weight, cb, None))
        self._callbacks.append(cb)
        self._rewards.append(name)

    def set_stop_tokens(self, tokens: Sequence[int]) -> None:
        """Completions end after any of these token ids (replacing the default, the model's EOS;
        an empty list: only max_completion_length ends them)."""
        ids = [_ffi.unsigned(t, "stop token", 32) for t in tokens]
        arr = (c_uint32 * max(1, len(ids)))(*ids)
        with self._use() as ptr:
            _ffi.check(lib.dsv3_grpo_set_stop_tokens(ptr, arr, len(ids)))

    def step(
        self,
        prompts: Sequence[str],
        answers: Optional[Sequence[Optional[str]]] = None,
        tokenizer: Optional[Tokenizer] = None,
    ) -> Dict[str, float]:
        """One GRPO step: samples num_generations completions of each prompt, scores them with
        the rewards, and takes num_iterations optimizer steps. `answers` (one per prompt, None
        for a prompt without a reference) go to the rewards. `tokenizer` encodes the prompts and
        decodes the completions; None for a byte-level model.

        Returns the step's metrics under TRL's names: step, loss, reward, reward_std,
        frac_reward_zero_std, kl, clip_ratio/low_mean, clip_ratio/high_mean,
        clip_ratio/region_mean, completions/mean_length, completions/max_length,
        completions/clipped_ratio, grad_norm, learning_rate, and rewards/NAME/mean and
        rewards/NAME/std per reward function (NaN: it never applied); plus completion_tokens,
        sampling_s and learning_s. On failure no optimizer step was taken (unless
        num_iterations > 1 and one already ran).
        """
        if isinstance(prompts, (str, bytes)):
            raise TypeError("prompts must be a sequence of str, not a single string")
        ps = [_ffi.text_bytes(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        n = len(ps)
        c_prompts = (c_char_p * max(1, n))(*ps)
        c_answers = None
        if answers is not None:
            if isinstance(answers, (str, bytes)):
                raise TypeError("answers must be a sequence of str or None, not a single string")
            ans = [None if a is None else _ffi.text_bytes(a, f"answers[{i}]") for i, a in enumerate(answers)]
            if len(ans) != n:
                raise ValueError(f"answers has {len(ans)} entries for {n} prompts")
            c_answers = (c_char_p * max(1, n))(*ans)
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a dsv3.Tokenizer or None, not {type(tokenizer).__name__}")
        m = _ffi.out_struct(_ffi.GrpoMetrics)
        with self._use() as ptr, (tokenizer._use() if tokenizer is not None else _null()) as tok:
            self._guard.error = None
            self._stepping = threading.get_ident()
            try:
                st = lib.dsv3_grpo_step(ptr, tok, c_prompts, c_answers, n, byref(m))
            finally:
                self._stepping = None
            err = None if st == _ffi.Status.OK else _ffi.Dsv3Error(st, _ffi.last_error())
            stats = [self._stats(ptr, i) for i in range(len(self._rewards))] if err is None else []
        self._guard.reraise()  # a reward function's exception (the step failed for it)
        if err is not None:
            raise err
        self._last_count = n * self.num_generations
        out: Dict[str, float] = {
            "step": m.step,
            "loss": m.loss,
            "reward": m.reward,
            "reward_std": m.reward_std,
            "frac_reward_zero_std": m.frac_reward_zero_std,
            "kl": m.kl,
            "clip_ratio/low_mean": m.clip_ratio_low,
            "clip_ratio/high_mean": m.clip_ratio_high,
            "clip_ratio/region_mean": m.clip_ratio_region,
            "completions/mean_length": m.completion_length_mean,
            "completions/max_length": m.completion_length_max,
            "completions/clipped_ratio": m.clipped_ratio,
            "grad_norm": m.grad_norm,
            "learning_rate": m.lr,
            "completion_tokens": m.completion_tokens,
            "sampling_s": m.sampling_s,
            "learning_s": m.learning_s,
        }
        for name, (mean, std) in zip(self._rewards, stats):
            out[f"rewards/{name}/mean"] = mean
            out[f"rewards/{name}/std"] = std
        return out

    @staticmethod
    def _stats(ptr: int, index: int) -> Tuple[float, float]:
        mean, std = c_float(), c_float()
        _ffi.check(lib.dsv3_grpo_reward_stats(ptr, index, byref(mean), byref(std)))
        return mean.value, std.value

    def reward_stats(self, reward: Union[int, str]) -> Tuple[float, float]:
        """(mean, std) of one reward function (its index in the order added, or its name) over
        the last step's completions; NaN where it never applied. Dsv3Error before any step."""
        if isinstance(reward, str):
            try:
                index = self._rewards.index(reward)
            except ValueError:
                raise ValueError(f"no reward named {reward!r}; the rewards are {self._rewards}") from None
        else:
            index = _ffi.unsigned(reward, "reward index")
        with self._use() as ptr:
            return self._stats(ptr, index)

    def completions(self) -> List[Tuple[str, Optional[float]]]:
        """The last step's completions as (text, reward), prompt by prompt (completion i is
        prompt i // num_generations); the reward is None when no reward function applied.
        Empty before the first step."""
        out: List[Tuple[str, Optional[float]]] = []
        r = c_float()
        with self._use() as ptr:
            for i in range(self._last_count):
                buf, needed = _ffi.fill_buffer(
                    lambda b, cap, need, i=i: lib.dsv3_grpo_completion(ptr, i, b, cap, need, byref(r)),
                    ctypes.c_char,
                    256,
                )
                # `needed` counts the NUL; a completion may itself hold NULs (a byte tokenizer's 0)
                text = buf.raw[: needed - 1].decode("utf-8", "replace")
                out.append((text, None if math.isnan(r.value) else r.value))
        return out

    def model(self) -> Model:
        """A Model with the policy's current weights (a snapshot, for inference)."""
        out = c_void_p()
        with self._use() as ptr:
            _ffi.check(lib.dsv3_grpo_model(ptr, byref(out)))
        return Model(out.value)

    def save(self, directory: Union[str, "os.PathLike[str]"]) -> None:
        """Writes the policy as a checkpoint directory (HF-format model.safetensors + optimizer +
        state), atomically; Trainer.load() resumes it (as a plain trainer)."""
        with self._use() as ptr:
            _ffi.check(lib.dsv3_grpo_save(ptr, _ffi.path_bytes(directory)))


@contextmanager
def _null() -> Iterator[None]:
    yield None
