"""GRPO from Python (dsv3.Grpo over dsv3_grpo_*): a Python reward next to a built-in one, its
calls and its rise over training (the setup of ffi/tests/abi.rs grpo_with_host_and_builtin_rewards),
None / NaN for rewards that do not apply, exceptions in reward functions, bad parameters, stop
tokens, snapshots and checkpoints."""

import math

import pytest

import dsv3
from dsv3 import Dsv3Error, Status

PROMPTS = ["ab", "cd", "no answer"]
ANSWERS = ["x", "y", None]
G = 4
PROBE = [97, 98, 99]  # "abc": logits of a snapshot on these show whether the weights moved


def lowercase_share(completion):
    return sum("a" <= ch <= "z" for ch in completion) / max(1, len(completion))


def tiny_model():
    """A fresh tiny model (byte-level vocabulary: no tokenizer needed), via the Trainer API."""
    with dsv3.Trainer.from_preset("tiny", schedule="constant", lr=1e-3) as t:
        return t.model()


def grpo(**params):
    kw = dict(num_generations=G, max_completion_length=5, lr=1e-3, schedule="constant")
    kw.update(params)
    with tiny_model() as m:
        return dsv3.Grpo(m, **kw)


def probe_logits(g):
    with g.model() as snap, snap.session() as s:
        return list(s.step(0, PROBE))


def test_python_reward_rises_next_to_a_builtin():
    calls = []

    def lower(prompt, completion, answer):
        calls.append((prompt, answer))
        if answer is None:
            return None  # does not apply: NaN to C
        return lowercase_share(completion)

    with grpo(beta=0.04) as g:
        assert g.num_generations == G
        g.add_reward("lower", 1.0, lower)
        g.add_reward("exact", weight=0.5)
        assert g.rewards == ["lower", "exact"]
        assert g.completions() == []
        rewards = []
        steps = 40
        for i in range(steps):
            m = g.step(PROMPTS, ANSWERS)
            assert m["step"] == i
            rewards.append(m["reward"])
        # once per completion, with each prompt's text and answer
        assert len(calls) == steps * len(PROMPTS) * G
        assert set(calls) == set(zip(PROMPTS, ANSWERS))
        first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
        assert last > first + 0.1, rewards
        # the metrics of the last step
        assert m["completions/max_length"] <= 5 and m["completion_tokens"] <= len(PROMPTS) * G * 5
        assert m["kl"] > 0, "beta > 0: the policy moved away from the reference"
        assert m["sampling_s"] > 0 and m["learning_s"] > 0
        assert m["learning_rate"] == pytest.approx(1e-3)
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
        mean, std = g.reward_stats("lower")
        assert (mean, std) == g.reward_stats(0) == (m["rewards/lower/mean"], m["rewards/lower/std"])
        assert 0 < mean <= 1 and std >= 0
        assert g.reward_stats(1) == (m["rewards/exact/mean"], m["rewards/exact/std"])
        with pytest.raises(Dsv3Error) as e:
            g.reward_stats(2)
        assert e.value.code == Status.INVALID_ARGUMENT
        with pytest.raises(ValueError, match="no reward named"):
            g.reward_stats("format")
        # the completions: G per prompt, in prompt order; the prompt without an answer has no
        # applicable reward (None), the others lower + 0.5 * exact of the text the reward saw
        done = g.completions()
        assert len(done) == len(PROMPTS) * G
        for i, (text, reward) in enumerate(done):
            assert isinstance(text, str)
            if ANSWERS[i // G] is None:
                assert reward is None, (i, text, reward)
            else:
                extra = reward - lowercase_share(text)
                assert min(abs(extra), abs(extra - 0.5)) < 1e-5, (i, text, reward)


def test_rewards_that_never_apply_and_an_explicit_tokenizer():
    seen = []

    def nan_reward(prompt, completion, answer):
        seen.append(answer)
        return float("nan")  # the same as None

    with grpo() as g, g.model() as snap, dsv3.Tokenizer.for_model(snap) as tok:
        g.add_reward("nan", 2.0, nan_reward)
        g.add_reward("exact")
        m = g.step(["ab", "cd"], tokenizer=tok)  # no answers at all
        assert seen == [None] * (2 * G)
        assert math.isnan(m["reward"]) and math.isnan(m["rewards/nan/mean"]) and math.isnan(m["rewards/exact/mean"])
        assert [r for _, r in g.completions()] == [None] * (2 * G)
        # with an answer, "exact" applies (0 or 1) and the NaN reward is still skipped
        m = g.step(["ab", "cd"], [None, "zzzzz"], tokenizer=tok)
        assert m["step"] == 1
        rewards = [r for _, r in g.completions()]
        assert rewards[:G] == [None] * G
        assert all(r in (0.0, 1.0) for r in rewards[G:]), rewards
        assert math.isnan(g.reward_stats("nan")[0])


class Boom(Exception):
    pass


def test_reward_exceptions_are_reraised_and_take_no_step():
    state = {"mode": "ok", "calls": 0}

    def reward(prompt, completion, answer):
        state["calls"] += 1
        mode = state["mode"]
        if mode == "raise" and state["calls"] == 3:
            raise Boom("from the reward")
        if mode == "str":
            return "high"
        if mode == "inf":
            return math.inf
        if mode == "reenter":
            g.completions()
        return lowercase_share(completion)

    with grpo() as g:
        g.add_reward("lower", fn=reward)
        assert g.step(PROMPTS, ANSWERS)["step"] == 0
        before = probe_logits(g)
        steps_taken = 1

        state.update(mode="raise", calls=0)
        with pytest.raises(Boom, match="from the reward"):
            g.step(PROMPTS, ANSWERS)
        assert state["calls"] == 3, "the reward is not called again after it raised"
        assert probe_logits(g) == before, "a failed step takes no optimizer step"

        state["mode"] = "str"
        with pytest.raises(TypeError, match="'high'"):
            g.step(PROMPTS, ANSWERS)
        state["mode"] = "reenter"
        with pytest.raises(RuntimeError, match="cannot use the GRPO trainer"):
            g.step(PROMPTS, ANSWERS)
        state["mode"] = "inf"  # a non-finite reward is the library's error
        with pytest.raises(Dsv3Error) as e:
            g.step(PROMPTS, ANSWERS)
        assert e.value.code == Status.NON_FINITE and "lower" in e.value.message
        assert probe_logits(g) == before

        # the trainer is still usable: the failed steps were not counted, the next one learns
        state["mode"] = "ok"
        assert g.step(PROMPTS, ANSWERS)["step"] == steps_taken
        assert len(g.completions()) == len(PROMPTS) * G
        assert probe_logits(g) != before


def test_bad_parameters_and_arguments():
    with tiny_model() as m:
        with pytest.raises(Dsv3Error) as e:
            dsv3.Grpo(m, num_generations=1)
        assert e.value.code == Status.INVALID_ARGUMENT and "generations" in e.value.message
        with pytest.raises(Dsv3Error) as e:
            dsv3.Grpo(m, loss_type=9)
        assert e.value.code == Status.INVALID_ARGUMENT and "loss_type" in e.value.message
        with pytest.raises(Dsv3Error) as e:
            dsv3.Grpo(m, top_p=1.5)
        assert "top_p" in e.value.message
        with pytest.raises(Dsv3Error) as e:
            dsv3.Grpo(m, temperature=0)
        assert "temperature" in e.value.message
        with pytest.raises(Dsv3Error) as e:
            dsv3.Grpo(m, lr=-1)
        assert "lr" in e.value.message
        with pytest.raises(ValueError, match="loss_type must be one of"):
            dsv3.Grpo(m, loss_type="ppo")
        with pytest.raises(ValueError, match="num_generations"):
            dsv3.Grpo(m, num_generations=-2)
        with pytest.raises(TypeError, match="unknown GRPO trainer parameter 'learning_rate'"):
            dsv3.Grpo(m, learning_rate=1e-3)
        with pytest.raises(TypeError, match="bias_update_speed"):
            dsv3.Grpo(m, bias_update_speed=0.1)
        with pytest.raises(TypeError, match="beta must be a number"):
            dsv3.Grpo(m, beta="high")
        # the enums by name, by value and TRL's bool for scale_rewards
        dsv3.Grpo(m, loss_type="dr_grpo", scale_rewards=False, sequence_level=True).close()
        dsv3.Grpo(m, loss_type=dsv3.LossType.BNPO, scale_rewards="batch").close()
        p = dsv3.default_grpo_params()
        want = (8, dsv3.LossType.DAPO, dsv3.ScaleRewards.GROUP)
        assert (p["num_generations"], p["loss_type"], p["scale_rewards"]) == want

    with grpo() as g:
        with pytest.raises(Dsv3Error) as e:
            g.step(PROMPTS, ANSWERS)
        assert e.value.code == Status.INVALID_ARGUMENT and "reward" in e.value.message
        with pytest.raises(Dsv3Error) as e:
            g.add_reward("bogus")
        assert "no built-in reward 'bogus'" in e.value.message
        with pytest.raises(Dsv3Error) as e:
            g.add_reward("exact", weight=math.inf)
        assert "finite" in e.value.message
        with pytest.raises(TypeError, match="callable"):
            g.add_reward("mine", fn=3)
        g.add_reward("exact")
        with pytest.raises(ValueError, match="already added"):
            g.add_reward("exact", 2.0)
        assert g.rewards == ["exact"]
        with pytest.raises(ValueError, match="answers has 2 entries for 3 prompts"):
            g.step(PROMPTS, ["x", "y"])
        with pytest.raises(TypeError, match="single string"):
            g.step("ab")
        with pytest.raises(ValueError, match="NUL"):
            g.step(["a\0b"])
        with pytest.raises(Dsv3Error) as e:
            g.step([])
        assert e.value.code == Status.INVALID_ARGUMENT
        with pytest.raises(Dsv3Error) as e:
            g.set_stop_tokens([100_000])
        assert "100000" in e.value.message
        with pytest.raises(ValueError):
            g.set_stop_tokens([-1])
        with pytest.raises(Dsv3Error) as e:
            g.reward_stats(0)  # no step yet
        assert "no step" in e.value.message


def test_stop_tokens_snapshot_checkpoint_and_close(tmp_path):
    m = tiny_model()
    g = dsv3.Grpo(m, num_generations=G, max_completion_length=5, schedule="constant", lr=1e-3)
    m.close()  # the trainer has its own copy of the weights
    g.add_reward("lower", fn=lambda p, c, a: lowercase_share(c))
    assert g.step(PROMPTS)["completions/max_length"] <= 5
    g.set_stop_tokens(range(259))  # every token stops: one-token completions
    m1 = g.step(PROMPTS)
    assert m1["completions/max_length"] == 1 and m1["completion_tokens"] == len(PROMPTS) * G
    assert all(len(t) == 1 for t, _ in g.completions())  # one byte: a character or U+FFFD
    g.set_stop_tokens([])  # none: max_completion_length ends them all
    m2 = g.step(PROMPTS)
    assert m2["completions/mean_length"] == 5 and m2["completions/clipped_ratio"] == 1

    g.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    want = probe_logits(g)
    with dsv3.Trainer.load(tmp_path / "ckpt", schedule="constant", lr=1e-3) as resumed:
        with resumed.model() as snap, snap.session() as s:
            assert list(s.step(0, PROBE)) == want
    # resume as a GRPO trainer: same policy, the step count carries over; rewards are added again
    with dsv3.Grpo.load(tmp_path / "ckpt", num_generations=G, max_completion_length=5, lr=1e-3) as g2:
        assert probe_logits(g2) == want
        g2.add_reward("exact")
        assert g2.step(PROMPTS, ANSWERS)["step"] == 3
    with pytest.raises(Dsv3Error):
        dsv3.Grpo.load(tmp_path / "missing")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(Dsv3Error) as e:
        g.save(tmp_path / "file" / "ckpt")
    assert e.value.code == Status.IO

    g.close()
    g.close()
    assert g.closed
    with pytest.raises(ValueError, match="closed"):
        g.step(PROMPTS)
