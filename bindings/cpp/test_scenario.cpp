// The binding scenario in C++ (see ffi/tests/scenario.rs): load the tiny fixture model,
// greedy-generate 8 tokens (and the same through a Session + argmax), run 3 training steps on a
// fixed batch, load a missing path; values from bindings/testdata/expected.json (computed by the
// Rust API). Also: callbacks (stop, throw), the tokenizer, checkpoints, moves. Run from the
// repository root.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "dsv3.hpp"

namespace {

int failures = 0;

#define EXPECT(cond)                                                             \
    do {                                                                         \
        if (!(cond)) {                                                           \
            std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
            ++failures;                                                          \
        }                                                                        \
    } while (0)

// Runs `f`, expecting it to throw dsv3::Error with `code`; returns the error's message.
template <typename F>
std::string expect_error(dsv3_status code, F&& f, int line) {
    try {
        f();
    } catch (const dsv3::Error& e) {
        if (e.code() != code) {
            std::fprintf(stderr, "line %d: got %s (%s), expected %s\n", line, dsv3::status_name(e.code()), e.what(),
                         dsv3::status_name(code));
            ++failures;
        }
        return e.what();
    }
    std::fprintf(stderr, "line %d: no exception, expected %s\n", line, dsv3::status_name(code));
    ++failures;
    return "";
}
#define EXPECT_ERROR(code, body) expect_error(code, [&] { body; }, __LINE__)

// A tiny JSON reader for expected.json: the numbers of the array after "key" (nested arrays
// flattened), and the string value after "key".
std::vector<double> numbers(const std::string& json, const std::string& key) {
    std::vector<double> out;
    size_t p = json.find("\"" + key + "\"");
    if (p == std::string::npos) return out;
    p = json.find('[', p);
    int depth = 0;
    for (; p < json.size(); ++p) {
        const char c = json[p];
        if (c == '[') {
            ++depth;
        } else if (c == ']') {
            if (--depth == 0) break;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            char* end = nullptr;
            out.push_back(std::strtod(json.c_str() + p, &end));
            p = static_cast<size_t>(end - json.c_str()) - 1;
        }
    }
    return out;
}

std::string string_value(const std::string& json, const std::string& key) {
    size_t p = json.find("\"" + key + "\"");
    if (p == std::string::npos) return "";
    p = json.find('"', json.find(':', p)) + 1;
    return json.substr(p, json.find('"', p) - p);
}

double number_value(const std::string& json, const std::string& key) {
    const size_t p = json.find("\"" + key + "\"");
    if (p == std::string::npos) return 0;
    return std::strtod(json.c_str() + json.find(':', p) + 1, nullptr);
}

template <typename T>
std::vector<int32_t> ints(const std::vector<T>& v) {
    return std::vector<int32_t>(v.begin(), v.end());
}

int32_t argmax(const std::vector<float>& v) {
    return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

}  // namespace

static_assert(!std::is_copy_constructible_v<dsv3::Model>, "handles are move-only");
static_assert(!std::is_copy_assignable_v<dsv3::Session>, "handles are move-only");
static_assert(std::is_nothrow_move_constructible_v<dsv3::Tokenizer>, "moves do not throw");
static_assert(std::is_nothrow_move_assignable_v<dsv3::Trainer>, "moves do not throw");
static_assert(!std::is_copy_constructible_v<dsv3::Grpo>, "handles are move-only");
static_assert(std::is_nothrow_move_constructible_v<dsv3::Grpo> && std::is_nothrow_move_assignable_v<dsv3::Grpo>,
              "moves do not throw");

int main() {
    std::ifstream f("bindings/testdata/expected.json");
    if (!f) {
        std::cerr << "cannot read bindings/testdata/expected.json (run from the repository root)\n";
        return 1;
    }
    std::stringstream ss;
    ss << f.rdbuf();
    const std::string json = ss.str();
    const std::vector<int32_t> want_ids = ints(numbers(json, "generated"));
    const std::vector<int32_t> prompt = ints(numbers(json, "prompt"));
    const std::vector<int32_t> batch = ints(numbers(json, "batch"));
    const std::vector<double> want_losses = numbers(json, "losses");
    const double tol = number_value(json, "loss_rel_tolerance");
    const auto max_new = static_cast<uint32_t>(number_value(json, "max_new_tokens"));
    if (want_ids.size() != 8 || prompt.size() != 3 || batch.size() != 16 || want_losses.size() != 3 || tol <= 0 ||
        max_new != 8) {
        std::cerr << "unexpected contents of bindings/testdata/expected.json\n";
        return 1;
    }
    std::cout << "dsv3 " << dsv3::version() << ", ABI " << dsv3::abi_version() << "\n";
    EXPECT(dsv3::abi_version() == DSV3_ABI_VERSION);

    try {
        // Loading, with progress.
        std::vector<float> progress;
        dsv3::LoadOptions opts;
        opts.progress = [&](float x) {
            progress.push_back(x);
            return true;
        };
        dsv3::Model model = dsv3::Model::load(string_value(json, "model"), opts);
        EXPECT(model);
        EXPECT(!progress.empty() && progress.back() == 1.0f && std::is_sorted(progress.begin(), progress.end()));
        const dsv3::ModelInfo info = model.info();
        EXPECT(info.vocab_size == 99 && info.num_layers == 2 && info.params_total > 0);
        EXPECT(model.config_json().find("\"vocab_size\":99") != std::string::npos);

        // Greedy generation: the Rust API's ids, each streamed.
        dsv3::SamplingParams sp;
        EXPECT(sp.temperature == 0.0f && sp.top_p == 1.0f && sp.max_new_tokens == 64);  // library defaults
        sp.max_new_tokens = max_new;
        std::vector<int32_t> streamed;
        const std::vector<int32_t> ids = model.generate(prompt, sp, [&](int32_t t) {
            streamed.push_back(t);
            return true;
        });
        EXPECT(ids == want_ids);
        EXPECT(streamed == want_ids);
        EXPECT(model.generate(prompt, sp) == want_ids);  // no callback

        // A callback that stops after 3 tokens; a stop token; a callback that throws.
        int seen = 0;
        EXPECT(model.generate(prompt, sp, [&](int32_t) { return ++seen < 3; }) ==
               std::vector<int32_t>(want_ids.begin(), want_ids.begin() + 3));
        dsv3::SamplingParams stop = sp;
        stop.stop_tokens = {want_ids[1]};
        EXPECT(model.generate(prompt, stop) == std::vector<int32_t>(want_ids.begin(), want_ids.begin() + 2));
        seen = 0;
        bool caught = false;
        try {
            model.generate(prompt, sp, [&](int32_t) -> bool {
                if (++seen == 2) throw std::logic_error("thrown from on_token");
                return true;
            });
        } catch (const std::logic_error& e) {
            caught = std::string(e.what()) == "thrown from on_token";
        }
        EXPECT(caught && seen == 2);
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, model.generate({}, sp));
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, model.generate({1000}, sp));

        // The same through a session: prefill, then decode with argmax.
        dsv3::Session session(model, 1);
        std::vector<float> logits = session.step(0, prompt);
        EXPECT(logits.size() == info.vocab_size);
        for (size_t i = 0; i < want_ids.size(); ++i) {
            const int32_t best = argmax(logits);
            EXPECT(best == want_ids[i]);
            logits = session.step(0, {best});
        }
        EXPECT(session.length(0) == prompt.size() + want_ids.size());
        session.truncate(0, prompt.size());
        EXPECT(session.length(0) == prompt.size());
        EXPECT(argmax(session.step(0, {want_ids[0]})) == want_ids[1]);
        session.reset(0);
        EXPECT(session.length(0) == 0);
        session.append(0, std::vector<int32_t>(prompt.begin(), prompt.end() - 1));
        EXPECT(argmax(session.step(0, {prompt.back()})) == want_ids[0]);
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, session.length(1));
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, session.step(0, {-1}));
        EXPECT(session.length(0) == prompt.size());  // a failed step leaves the cache unchanged

        // Three training steps: the Rust API's losses, decreasing.
        dsv3::TrainParams tp;
        tp.schedule = static_cast<int32_t>(number_value(json, "schedule"));
        tp.lr = static_cast<float>(number_value(json, "lr"));
        EXPECT(tp.schedule == 0 && tp.lr == 5e-3f && tp.clip_norm == 1.0f);
        dsv3::Trainer trainer(model, tp);
        std::vector<float> losses;
        for (int i = 0; i < 3; ++i) {
            const dsv3::StepMetrics m = trainer.step(batch, 2, 8);
            EXPECT(m.step == static_cast<uint64_t>(i) && m.tokens > 0 && m.lr == tp.lr);
            if (std::fabs(m.loss - want_losses[i]) > tol * want_losses[i]) {
                std::fprintf(stderr, "step %d loss %.9g, Rust gave %.9g\n", i, m.loss, want_losses[i]);
                ++failures;
            }
            losses.push_back(m.loss);
        }
        EXPECT(losses[1] < losses[0] && losses[2] < losses[1]);
        const std::vector<uint32_t> load = trainer.expert_load(0);
        EXPECT(load.size() == info.num_experts);
        uint64_t routed = 0;
        for (uint32_t x : load) routed += x;
        EXPECT(routed == batch.size() * info.experts_per_token);
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, trainer.expert_load(99));
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, trainer.step(batch, 2, 7));  // shape mismatch (wrapper)
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, trainer.step_sft(batch, std::vector<float>(13, 1.0f), 2, 8));
        const dsv3::StepMetrics sft = trainer.step_sft(batch, std::vector<float>(14, 1.0f), 2, 8);
        EXPECT(sft.step == 3 && std::isfinite(sft.loss));

        // Checkpoint round trip; the trainer's weights as a model.
        const std::filesystem::path dir = std::filesystem::temp_directory_path() / "dsv3_cpp_scenario_ckpt";
        std::filesystem::remove_all(dir);
        trainer.save(dir.string());
        dsv3::Trainer resumed = dsv3::Trainer::load(dir.string(), tp);
        const dsv3::Model snapshot = trainer.model();
        EXPECT(resumed.model().generate(prompt, sp) == snapshot.generate(prompt, sp));
        std::filesystem::remove_all(dir);
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, dsv3::Trainer::preset("no-such-preset", tp));
        dsv3::TrainParams bad = tp;
        bad.schedule = 7;
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, dsv3::Trainer(model, bad));

        // Tokenizers: a tokenizer.json; the byte-level default; none for this model's vocabulary.
        const dsv3::Tokenizer tok = dsv3::Tokenizer::load("tests/fixtures/tokenizer/tokenizer.json");
        EXPECT(tok.vocab_size() == 300);
        const std::string text = "12345+678=13023";
        const std::vector<int32_t> enc = tok.encode(text);
        EXPECT(enc == (std::vector<int32_t>{0, 18, 19, 20, 21, 22, 12, 23, 24, 25, 30, 18, 20, 17, 19, 20}));
        EXPECT(tok.encode(text, false) == std::vector<int32_t>(enc.begin() + 1, enc.end()));
        EXPECT(tok.decode(enc) == text);
        EXPECT(tok.decode(enc, false).size() > text.size());
        EXPECT(tok.decode({}).empty());
        EXPECT(tok.token_to_id("<｜end▁of▁sentence｜>") == 1);
        const std::string long_text(5000, 'x');
        EXPECT(tok.decode(tok.encode(long_text, false)) == long_text);
        const std::string bos = tok.decode({0}, false);  // special tokens' text outgrows the first buffer
        EXPECT(bos.size() > 4 && tok.decode({0, 0, 0, 0}, false).find(bos) == 0 &&
               tok.decode({0, 0, 0, 0}, false).size() >= 4 * bos.size());
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, tok.token_to_id("<no such token>"));
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, tok.encode(std::string("a\0b", 3)));
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, dsv3::Tokenizer::for_model(model));
        EXPECT_ERROR(DSV3_ERR_IO, dsv3::Tokenizer::load("/nonexistent/tokenizer.json"));

        // Cancelling a load from the progress callback, and throwing from it.
        dsv3::LoadOptions cancel;
        cancel.progress = [](float) { return false; };
        EXPECT_ERROR(DSV3_ERR_CANCELLED, dsv3::Model::load("tests/fixtures/v3_tiny", cancel));
        dsv3::LoadOptions throwing;
        throwing.progress = [](float) -> bool { throw std::runtime_error("thrown from progress"); };
        caught = false;
        try {
            dsv3::Model::load("tests/fixtures/v3_tiny", throwing);
        } catch (const dsv3::Error&) {
        } catch (const std::runtime_error& e) {
            caught = std::string(e.what()) == "thrown from progress";
        }
        EXPECT(caught);
        dsv3::LoadOptions cuda;
        cuda.device = 1;
        EXPECT_ERROR(DSV3_ERR_UNSUPPORTED, dsv3::Model::load("tests/fixtures/v3_tiny", cuda));

        // A missing model: DSV3_ERR_IO and a message naming the file.
        const std::string missing = string_value(json, "missing_model");
        const std::string msg = EXPECT_ERROR(DSV3_ERR_IO, dsv3::Model::load(missing));
        EXPECT(msg.find(string_value(json, "missing_model_error_contains")) != std::string::npos);
        EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, dsv3::Model::load(std::string("a\0b", 3)));

        // GRPO on a fresh tiny (byte-level) model: a C++ reward next to a built-in one, counted
        // calls, nullopt for a prompt without an answer, an exception, errors, a move. Small
        // batches (valgrind); the reward's rise is ffi/tests/abi.rs's and the Python tests' check.
        {
            dsv3::TrainParams gtp;
            gtp.schedule = 0;
            gtp.lr = 1e-3f;
            const dsv3::Model tiny = dsv3::Trainer::preset("tiny", gtp).model();
            dsv3::GrpoParams gp;
            EXPECT(gp.num_generations == 8 && gp.loss_type == 3);  // library defaults (TRL's)
            gp.num_generations = 2;
            gp.max_completion_length = 3;
            dsv3::GrpoParams bad_gp = gp;
            bad_gp.loss_type = 9;
            EXPECT(EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, dsv3::Grpo(tiny, gtp, bad_gp)).find("loss_type") !=
                   std::string::npos);
            dsv3::Grpo grpo(tiny, gtp, gp);
            EXPECT(grpo && grpo.num_generations() == 2 && grpo.completions().empty());
            const std::vector<std::string> prompts = {"ab", "no answer"};
            const std::vector<std::optional<std::string>> answers = {"x", std::nullopt};
            EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, grpo.step(prompts, answers));  // no reward yet
            size_t calls = 0;
            int throw_at = 0;  // the call that throws (0: none)
            grpo.add_reward("lower", 1.0f,
                            [&](std::string_view prompt, std::string_view completion,
                                std::optional<std::string_view> answer) -> std::optional<float> {
                                ++calls;
                                if (int(calls) == throw_at) throw std::logic_error("thrown from a reward");
                                if (prompt.empty()) return 0.0f;
                                if (!answer) return std::nullopt;
                                size_t lower = 0;
                                for (char c : completion) lower += c >= 'a' && c <= 'z';
                                return float(lower) / float(std::max<size_t>(1, completion.size()));
                            });
            grpo.add_reward("exact", 0.5f);
            EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, grpo.add_reward("bogus"));
            const dsv3::GrpoMetrics gm = grpo.step(prompts, answers);
            EXPECT(gm.step == 0 && gm.completion_length_max <= 3 && std::isfinite(gm.loss));
            EXPECT(calls == prompts.size() * 2);  // once per completion
            const auto stats = grpo.reward_stats(0);
            EXPECT(stats.first == gm.reward && stats.first >= 0 && stats.first <= 1);
            EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, grpo.reward_stats(2));
            const std::vector<dsv3::Grpo::Completion> done = grpo.completions();
            EXPECT(done.size() == 4);
            for (size_t i = 0; i < done.size(); ++i) EXPECT(std::isnan(done[i].reward) == (i >= 2));

            // A throwing reward: rethrown, not called again, no optimizer step taken.
            const auto probe = [&] { return grpo.model().session().step(0, {97, 98, 99}); };
            const std::vector<float> before = probe();
            calls = 0;
            throw_at = 3;
            bool caught = false;
            try {
                grpo.step(prompts, answers);
            } catch (const std::logic_error& e) {
                caught = std::string(e.what()) == "thrown from a reward";
            }
            EXPECT(caught && calls == 3);
            EXPECT(probe() == before);
            throw_at = 0;

            EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, grpo.step(prompts, {"x"}));  // wrapper: sizes
            EXPECT_ERROR(DSV3_ERR_INVALID_ARGUMENT, grpo.set_stop_tokens({100000}));
            std::vector<uint32_t> every(259);
            for (uint32_t t = 0; t < every.size(); ++t) every[t] = t;
            grpo.set_stop_tokens(every);  // every token stops: one-token completions

            const std::filesystem::path gdir = std::filesystem::temp_directory_path() / "dsv3_cpp_grpo_ckpt";
            std::filesystem::remove_all(gdir);
            grpo.save(gdir.string());
            EXPECT(std::filesystem::exists(gdir / "model.safetensors"));
            {
                // resumes as a GRPO trainer with its step count; rewards are added again
                dsv3::Grpo resumed = dsv3::Grpo::load(gdir.string(), nullptr, gtp, gp);
                resumed.add_reward("exact");
                EXPECT(resumed.step(prompts, answers).step == 1);
            }
            EXPECT_ERROR(DSV3_ERR_IO, dsv3::Grpo::load((gdir / "missing").string()));
            std::filesystem::remove_all(gdir);

            // A move keeps the rewards working; the moved-from Grpo throws. The failed step was not
            // counted, and this one learns.
            dsv3::Grpo g2 = std::move(grpo);
            calls = 0;
            const dsv3::GrpoMetrics gm2 = g2.step(prompts, answers);
            EXPECT(gm2.step == 1 && gm2.completion_length_max == 1 && calls == 4);
            EXPECT(g2.model().session().step(0, {97, 98, 99}) != before);
            EXPECT(!grpo);  // NOLINT(bugprone-use-after-move)
            EXPECT_ERROR(DSV3_ERR_NULL_ARGUMENT, grpo.step(prompts));
        }

        // Moves: the moved-from object is empty, safe to use (throws) and to destroy.
        dsv3::Model moved = std::move(model);
        EXPECT(moved && !model);  // NOLINT(bugprone-use-after-move)
        EXPECT_ERROR(DSV3_ERR_NULL_ARGUMENT, model.info());
        EXPECT(moved.generate(prompt, sp) == want_ids);
        dsv3::Session s2;
        s2 = std::move(session);
        EXPECT(s2 && !session);
        EXPECT(s2.length(0) == prompt.size());
        EXPECT_ERROR(DSV3_ERR_NULL_ARGUMENT, session.step(0, {1}));
        dsv3::Trainer t2(std::move(trainer));
        EXPECT(t2 && !trainer);
        EXPECT(t2.step(batch, 2, 8).step == 4);
        EXPECT_ERROR(DSV3_ERR_NULL_ARGUMENT, trainer.step(batch, 2, 8));
        dsv3::Tokenizer tok2 = dsv3::Tokenizer::load("tests/fixtures/tokenizer/tokenizer.json");
        tok2 = dsv3::Tokenizer();  // move-assigning frees the old handle
        EXPECT(!tok2);
        moved = dsv3::Model();
        EXPECT(!moved);
        // A session outlives its model.
        EXPECT(s2.step(0, {want_ids[0]}).size() == info.vocab_size);
    } catch (const dsv3::Error& e) {
        std::cerr << "unexpected dsv3::Error " << dsv3::status_name(e.code()) << ": " << e.what() << "\n";
        return 1;
    } catch (const std::exception& e) {
        std::cerr << "unexpected exception: " << e.what() << "\n";
        return 1;
    }
    if (failures) {
        std::cerr << failures << " check(s) failed\n";
        return 1;
    }
    std::cout << "C++ scenario: ok\n";
    return 0;
}
