"""The binding scenario (as tests/c/scenario.c): load the tiny fixture model, greedy-generate 8
tokens and compare with the Rust API's ids (bindings/testdata/expected.json), the same through a
session, 3 training steps with the Rust API's losses, a missing model; then the rest of the
binding: callbacks, closing, the tokenizer fixture, trainer checkpoints, threads."""

import json
import threading
from pathlib import Path

import pytest

import dsv3
from dsv3 import Dsv3Error, Status

ROOT = Path(__file__).resolve().parents[3]
EXPECTED = json.loads((ROOT / "bindings/testdata/expected.json").read_text())
TOKENIZER = ROOT / "tests/fixtures/tokenizer"


@pytest.fixture(scope="module")
def model():
    with dsv3.Model.load(ROOT / EXPECTED["model"]) as m:
        yield m


def argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


# ---- the scenario ---------------------------------------------------------------------------


def test_version():
    assert dsv3.version()
    assert dsv3.ABI_VERSION == 1


def test_greedy_generation_matches_rust(model):
    seen = []
    ids = model.generate(EXPECTED["prompt"], max_new_tokens=EXPECTED["max_new_tokens"], on_token=seen.append)
    assert ids == EXPECTED["generated"]
    assert seen == EXPECTED["generated"]


def test_session_argmax_matches_rust(model):
    info = model.info()
    with model.session() as s:
        logits = s.step(0, EXPECTED["prompt"])
        assert len(logits) == info.vocab_size
        for want in EXPECTED["generated"]:
            best = argmax(logits)
            assert best == want
            logits = s.step(0, [best])
        assert s.length(0) == len(EXPECTED["prompt"]) + len(EXPECTED["generated"])
        s.truncate(0, 3)
        assert s.length(0) == 3
        s.reset(0)
        assert s.length(0) == 0
        assert s.step(0, EXPECTED["prompt"], logits=False) is None


def test_training_losses_match_rust(model):
    t = EXPECTED["train"]
    with dsv3.Trainer(model, schedule=t["schedule"], lr=t["lr"]) as trainer:
        losses = []
        for i in range(t["steps"]):
            m = trainer.step(t["batch"])
            assert m.step == i
            assert m.tokens == sum(len(r) for r in t["batch"])
            losses.append(m.loss)
    for have, want in zip(losses, t["losses"]):
        assert abs(have - want) <= EXPECTED["loss_rel_tolerance"] * want, (losses, t["losses"])
    assert losses[0] > losses[1] > losses[2]


def test_missing_model_raises_io_error():
    with pytest.raises(Dsv3Error) as e:
        dsv3.Model.load(EXPECTED["missing_model"])
    assert e.value.code == Status.IO
    assert EXPECTED["missing_model_error_contains"] in e.value.message
    assert EXPECTED["missing_model_error_contains"] in str(e.value)


# ---- handles --------------------------------------------------------------------------------


def test_close_twice_and_use_after_close():
    m = dsv3.Model.load(ROOT / EXPECTED["model"])
    s = m.session(2)
    t = dsv3.Trainer(m)
    m.close()
    m.close()
    assert m.closed
    with pytest.raises(ValueError, match="closed"):
        m.info()
    # sessions and trainers hold their own reference to the model
    assert len(s.step(1, [1, 2, 3])) == 99
    s.close()
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.step(0, [1])
    t.close()
    t.close()
    with dsv3.Tokenizer.load(TOKENIZER / "tokenizer.json") as tok:
        pass
    tok.close()
    # __del__ frees handles that were never closed
    dsv3.Model.load(ROOT / EXPECTED["model"]).session()


def test_model_info_and_config(model):
    info = model.info()
    assert (info.vocab_size, info.hidden_size, info.num_layers) == (99, 32, 2)
    assert info.num_experts == 8
    assert info.params_active <= info.params_total
    assert (info.bos_token_id, info.eos_token_id) == (0, 1)
    assert model.config()["vocab_size"] == 99


def test_naive_attention_gives_the_same_tokens():
    with dsv3.Model.load(ROOT / EXPECTED["model"], attention="naive") as m:
        assert m.generate(EXPECTED["prompt"], max_new_tokens=8) == EXPECTED["generated"]
    with pytest.raises(ValueError):
        dsv3.Model.load(ROOT / EXPECTED["model"], attention="sideways")
    with pytest.raises(Dsv3Error) as e:
        dsv3.Model.load(ROOT / EXPECTED["model"], attention=7)
    assert e.value.code == Status.INVALID_ARGUMENT


# ---- callbacks ------------------------------------------------------------------------------


def test_on_token_false_stops(model):
    seen = []
    ids = model.generate(EXPECTED["prompt"], max_new_tokens=8, on_token=lambda t: seen.append(t) or len(seen) < 3)
    assert ids == EXPECTED["generated"][:3] == seen


def test_stop_tokens(model):
    stop = EXPECTED["generated"][2]
    ids = model.generate(EXPECTED["prompt"], max_new_tokens=8, stop_tokens=[stop])
    assert ids == EXPECTED["generated"][:3]


def test_callback_exception_is_reraised(model):
    class Boom(Exception):
        pass

    calls = []

    def on_token(t):
        calls.append(t)
        raise Boom("from on_token")

    with pytest.raises(Boom, match="from on_token"):
        model.generate(EXPECTED["prompt"], max_new_tokens=8, on_token=on_token)
    assert len(calls) == 1  # generation stopped at once

    def progress(fraction):
        raise Boom("from progress")

    with pytest.raises(Boom, match="from progress"):
        dsv3.Model.load(ROOT / EXPECTED["model"], progress=progress)
    # the model still works afterwards
    assert model.generate(EXPECTED["prompt"], max_new_tokens=8) == EXPECTED["generated"]


def test_progress_and_cancel():
    fractions = []
    with dsv3.Model.load(ROOT / EXPECTED["model"], progress=fractions.append):
        pass
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)
    with pytest.raises(Dsv3Error) as e:
        dsv3.Model.load(ROOT / EXPECTED["model"], progress=lambda f: f < 0.5)
    assert e.value.code == Status.CANCELLED


# ---- argument errors ------------------------------------------------------------------------


def test_bad_arguments(model):
    with pytest.raises(Dsv3Error) as e:
        model.generate([], max_new_tokens=4)
    assert e.value.code == Status.INVALID_ARGUMENT
    with pytest.raises(Dsv3Error) as e:
        model.generate([1, 1000], max_new_tokens=4)
    assert e.value.code == Status.INVALID_ARGUMENT and "1000" in e.value.message
    with pytest.raises(OverflowError):
        model.generate([1 << 40])
    with pytest.raises(TypeError):
        model.generate(["a"])
    with pytest.raises(ValueError):
        model.generate([1], max_new_tokens=-1)
    with model.session() as s, pytest.raises(Dsv3Error) as e:
        s.step(1, [1])
    assert e.value.code == Status.INVALID_ARGUMENT
    with pytest.raises(Dsv3Error) as e:
        model.session(0)
    assert e.value.code == Status.INVALID_ARGUMENT
    with pytest.raises(TypeError, match="unknown training parameter"):
        dsv3.Trainer(model, learning_rate=1.0)


# ---- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_golden():
    golden = json.loads((TOKENIZER / "golden.json").read_text())
    with dsv3.Tokenizer.load(TOKENIZER / "tokenizer.json") as tok:
        assert tok.vocab_size == golden["vocab_size"]
        assert tok.token_to_id("<｜begin▁of▁sentence｜>") == golden["bos_id"]
        assert tok.token_to_id("<｜end▁of▁sentence｜>") == golden["eos_id"]
        for case in golden["cases"]:
            assert tok.encode(case["text"]) == case["ids"], case["text"]
            assert tok.encode(case["text"], add_special=False) == case["ids_no_special"], case["text"]
            assert tok.decode(case["ids"]) == case["decoded"], case["text"]
        with pytest.raises(Dsv3Error) as e:
            tok.token_to_id("<no such token>")
        assert e.value.code == Status.INVALID_ARGUMENT
        with pytest.raises(ValueError):
            tok.encode("a\0b")
    with pytest.raises(Dsv3Error) as e:
        dsv3.Tokenizer.load("/nonexistent/tokenizer.json")
    assert e.value.code == Status.IO and "/nonexistent/tokenizer.json" in e.value.message


def test_tokenizer_for_model(model):
    # v3_tiny has no tokenizer.json and a 99-id vocabulary: no tokenizer
    with pytest.raises(Dsv3Error) as e:
        dsv3.Tokenizer.for_model(model)
    assert e.value.code == Status.INVALID_ARGUMENT


# ---- training -------------------------------------------------------------------------------


def test_preset_sft_checkpoint_and_snapshot(tmp_path):
    batch = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    mask = [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]
    with dsv3.Trainer.from_preset("tiny", seed=3, schedule="constant", lr=1e-3) as t:
        m = t.step_sft(batch, mask)
        assert m.loss > 0 and m.step == 0
        load = t.expert_load(0)
        assert load and all(x >= 0 for x in load)
        with pytest.raises(ValueError, match="mask"):
            t.step_sft(batch, [[1, 1], [1, 1]])
        with pytest.raises(ValueError, match="row 1"):
            t.step([[1, 2, 3], [1, 2]])
        with pytest.raises(Dsv3Error) as e:
            t.expert_load(1000)
        assert e.value.code == Status.INVALID_ARGUMENT
        t.save(tmp_path / "ckpt")
        with t.model() as snap:
            want = snap.generate([1, 2, 3], max_new_tokens=5)
    with dsv3.Trainer.load(tmp_path / "ckpt", schedule="constant", lr=1e-3) as t2:
        with t2.model() as snap:
            assert snap.generate([1, 2, 3], max_new_tokens=5) == want
        assert t2.step(batch).step == 1
    with pytest.raises(Dsv3Error) as e:
        dsv3.Trainer.from_preset("huge")
    assert e.value.code != Status.OK


def test_default_train_params():
    p = dsv3.default_train_params()
    assert p["schedule"] == dsv3.Schedule.WARMUP_COSINE
    assert abs(p["lr"] - 1e-3) < 1e-9


# ---- threads --------------------------------------------------------------------------------


def test_one_model_many_threads(model):
    results = [None] * 4

    def run(i):
        results[i] = model.generate(EXPECTED["prompt"], max_new_tokens=8)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == [EXPECTED["generated"]] * 4
