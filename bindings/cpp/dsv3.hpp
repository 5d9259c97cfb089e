// dsv3.hpp: a header-only C++17 wrapper over the dsv3 C ABI (include/dsv3.h).
//
// - Handles (Model, Session, Tokenizer, Trainer, Grpo) are move-only RAII objects: the destructor frees
//   the C handle; a moved-from or default-constructed object is empty (operator bool is false),
//   safe to destroy or assign to, and its methods throw dsv3::Error (DSV3_ERR_NULL_ARGUMENT).
// - Every failure throws dsv3::Error: the dsv3_status code and dsv3_last_error()'s message.
// - Outputs are std::vector / std::string; the buffer-size protocol (DSV3_ERR_BUFFER_TOO_SMALL
//   and `needed`) is handled here.
// - Callbacks are std::function. An exception thrown by one never crosses the C ABI: it is
//   caught, the operation is stopped (generation ends, a load is cancelled, a GRPO step fails
//   before any optimizer step) and the exception is rethrown once the C call has returned.
// - Parameter structs take their defaults from the library (dsv3_*_params_default).
// - Thread safety is the C API's: a Model may be shared by threads; a Session, Tokenizer,
//   Trainer or Grpo is used by one thread at a time.
//
// Build: add include/ and bindings/cpp/ to the include path and link -ldsv3.
#ifndef DSV3_HPP
#define DSV3_HPP

#if (defined(_MSVC_LANG) ? _MSVC_LANG : __cplusplus) < 201703L
#error "dsv3.hpp needs C++17 or later"
#endif

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dsv3.h"

namespace dsv3 {

/// A failed dsv3 call: its status code and the library's message.
class Error : public std::runtime_error {
public:
    Error(dsv3_status code, const std::string& message) : std::runtime_error(message), code_(code) {}
    dsv3_status code() const noexcept { return code_; }

private:
    dsv3_status code_;
};

/// The name of a status code ("DSV3_ERR_IO", ...).
inline const char* status_name(dsv3_status s) noexcept {
    switch (s) {
    case DSV3_OK: return "DSV3_OK";
    case DSV3_ERR_NULL_ARGUMENT: return "DSV3_ERR_NULL_ARGUMENT";
    case DSV3_ERR_INVALID_ARGUMENT: return "DSV3_ERR_INVALID_ARGUMENT";
    case DSV3_ERR_IO: return "DSV3_ERR_IO";
    case DSV3_ERR_CONFIG: return "DSV3_ERR_CONFIG";
    case DSV3_ERR_WEIGHTS: return "DSV3_ERR_WEIGHTS";
    case DSV3_ERR_NON_FINITE: return "DSV3_ERR_NON_FINITE";
    case DSV3_ERR_UNSUPPORTED: return "DSV3_ERR_UNSUPPORTED";
    case DSV3_ERR_CANCELLED: return "DSV3_ERR_CANCELLED";
    case DSV3_ERR_BUFFER_TOO_SMALL: return "DSV3_ERR_BUFFER_TOO_SMALL";
    case DSV3_ERR_INTERNAL: return "DSV3_ERR_INTERNAL";
    }
    return "DSV3_ERR_UNKNOWN";
}

/// The library's version string.
inline std::string version() { return dsv3_version(); }

/// The ABI version the library implements; DSV3_ABI_VERSION is the header's.
inline uint32_t abi_version() noexcept { return dsv3_abi_version(); }

namespace detail {

/// Throws dsv3::Error for a failed status (reads this thread's last error right away).
inline void check(dsv3_status s) {
    if (s != DSV3_OK) {
        const char* msg = dsv3_last_error();
        throw Error(s, msg && *msg ? std::string(msg) : std::string(status_name(s)));
    }
}

/// A NUL-terminated copy of `s`; an embedded NUL would silently cut the string, so it throws.
inline std::string c_string(std::string_view s, const char* what) {
    if (s.find('\0') != std::string_view::npos) {
        throw Error(DSV3_ERR_INVALID_ARGUMENT, std::string("dsv3: ") + what + " contains a NUL byte");
    }
    return std::string(s);
}

/// Runs `call(buf, cap, &needed)` with a buffer of `guess` elements, grows it once to the
/// reported size on DSV3_ERR_BUFFER_TOO_SMALL, and trims it to the size written. The buffer
/// handed over is never NULL (NULL means "no output" to some calls).
template <typename T, typename Call>
std::vector<T> fill(size_t guess, Call&& call) {
    std::vector<T> buf(guess > 0 ? guess : 1);
    size_t needed = 0;
    dsv3_status s = call(buf.data(), buf.size(), &needed);
    if (s == DSV3_ERR_BUFFER_TOO_SMALL && needed > buf.size()) {
        buf.resize(needed);
        s = call(buf.data(), buf.size(), &needed);
    }
    check(s);
    buf.resize(needed);
    return buf;
}

template <typename T, void (*Free)(T*)>
struct Deleter {
    void operator()(T* p) const noexcept { Free(p); }
};

template <typename T, void (*Free)(T*)>
using Handle = std::unique_ptr<T, Deleter<T, Free>>;

/// What a C callback's user_data points to: the user's function and the exception it threw.
template <typename Fn>
struct Callback {
    const Fn* fn;
    std::exception_ptr error;

    /// Rethrows the callback's exception, if any, else throws for a failed status.
    void finish(dsv3_status s) const {
        if (error) std::rethrow_exception(error);
        check(s);
    }
};

extern "C" {
// C-linkage trampolines: they never let an exception out (it is stored, and the call is told to
// stop: return 1).
inline int32_t dsv3_cpp_token_trampoline(void* user_data, int32_t token) noexcept {
    auto* cb = static_cast<Callback<std::function<bool(int32_t)>>*>(user_data);
    try {
        return (*cb->fn)(token) ? 0 : 1;
    } catch (...) {
        cb->error = std::current_exception();
        return 1;
    }
}

inline int32_t dsv3_cpp_progress_trampoline(void* user_data, float fraction) noexcept {
    auto* cb = static_cast<Callback<std::function<bool(float)>>*>(user_data);
    try {
        return (*cb->fn)(fraction) ? 0 : 1;
    } catch (...) {
        cb->error = std::current_exception();
        return 1;
    }
}
}  // extern "C"

}  // namespace detail

/// How to load a model (defaults from dsv3_model_params_default: CPU, FP8 kept, absorbed MLA).
struct LoadOptions {
    /// 0 = CPU, 1 + N = CUDA GPU N (sessions and generate run there; DSV3_ERR_UNSUPPORTED
    /// without a driver or GPU).
    int32_t device;
    /// 0 = f32 (on a GPU: matches the CPU), 1 = bf16 (GPU only).
    int32_t dtype;
    /// Dequantize FP8 checkpoint weights to f32 at load (else keep FP8 + block scales).
    bool dequantize_fp8;
    /// MLA formulation: 0 = absorbed, 1 = naive (same results).
    int32_t attention;
    /// Called with the fraction loaded, in [0, 1]; return false to cancel (DSV3_ERR_CANCELLED).
    std::function<bool(float)> progress;

    LoadOptions() {
        dsv3_model_params p;
        detail::check(dsv3_model_params_default(&p));
        device = p.device;
        dtype = p.dtype;
        dequantize_fp8 = p.dequantize_fp8 != 0;
        attention = p.attention;
    }
};

/// Sampling settings (defaults from dsv3_sampling_params_default: greedy, 64 new tokens).
struct SamplingParams {
    /// 0 = greedy.
    float temperature;
    /// 0 = off.
    uint32_t top_k;
    /// 1 = off; in (0, 1].
    float top_p;
    uint64_t seed;
    uint32_t max_new_tokens;
    /// Tokens that end generation (the stop token is included in the output).
    std::vector<int32_t> stop_tokens;

    SamplingParams() {
        dsv3_sampling_params p;
        detail::check(dsv3_sampling_params_default(&p));
        temperature = p.temperature;
        top_k = p.top_k;
        top_p = p.top_p;
        seed = p.seed;
        max_new_tokens = p.max_new_tokens;
    }
};

/// dsv3_train_params with the library's defaults (dsv3_train_params_default); set fields directly.
struct TrainParams : dsv3_train_params {
    TrainParams() : dsv3_train_params() { detail::check(dsv3_train_params_default(this)); }
};

/// dsv3_grpo_params with the library's defaults (dsv3_grpo_params_default: TRL's); set fields
/// directly.
struct GrpoParams : dsv3_grpo_params {
    GrpoParams() : dsv3_grpo_params() { detail::check(dsv3_grpo_params_default(this)); }
};

/// dsv3_grpo_metrics, struct_size set.
struct GrpoMetrics : dsv3_grpo_metrics {
    GrpoMetrics() : dsv3_grpo_metrics() { struct_size = sizeof(dsv3_grpo_metrics); }
};

/// A host reward for GRPO: (prompt, completion, the prompt's reference answer or nullopt) → the
/// completion's reward, or nullopt (or NaN) when it does not apply. The views live for the call.
using RewardFn = std::function<std::optional<float>(std::string_view prompt, std::string_view completion,
                                                    std::optional<std::string_view> answer)>;

namespace detail {

/// What a Grpo's reward callbacks share: the first exception of the running step.
struct GrpoState {
    std::exception_ptr error;
    bool stepping = false;
    size_t last_count = 0;  // completions of the last successful step
};

/// A reward callback's user_data (heap-allocated: stable while the Grpo moves).
struct GrpoReward {
    RewardFn fn;
    GrpoState* state;
};

extern "C" {
// A reward's exception is stored and +inf returned: the library rejects a non-finite reward
// (DSV3_ERR_NON_FINITE) before any optimizer step; later calls of the step are not run.
inline float dsv3_cpp_reward_trampoline(void* user_data, const char* prompt, const char* completion,
                                        const char* answer) noexcept {
    constexpr float abort_step = std::numeric_limits<float>::infinity();
    auto* r = static_cast<GrpoReward*>(user_data);
    if (r->state->error) return abort_step;
    try {
        const std::optional<float> v =
            r->fn(prompt, completion, answer ? std::optional<std::string_view>(answer) : std::nullopt);
        return v ? *v : std::numeric_limits<float>::quiet_NaN();
    } catch (...) {
        r->state->error = std::current_exception();
        return abort_step;
    }
}
}  // extern "C"

}  // namespace detail

/// dsv3_model_info, struct_size set.
struct ModelInfo : dsv3_model_info {
    ModelInfo() : dsv3_model_info() { struct_size = sizeof(dsv3_model_info); }
};

/// dsv3_step_metrics, struct_size set.
struct StepMetrics : dsv3_step_metrics {
    StepMetrics() : dsv3_step_metrics() { struct_size = sizeof(dsv3_step_metrics); }
};

class Session;
class Tokenizer;
class Trainer;

/// A loaded model. Immutable: share it (by reference) across threads, sessions and trainers.
class Model {
public:
    /// An empty model.
    Model() noexcept = default;

    /// Takes ownership of a C handle (may be NULL).
    explicit Model(dsv3_model* raw) noexcept : h_(raw) {}

    /// Loads the model in directory `path` (config.json + safetensors).
    static Model load(std::string_view path, const LoadOptions& options = LoadOptions()) {
        const std::string p = detail::c_string(path, "path");
        dsv3_model_params params;
        detail::check(dsv3_model_params_default(&params));
        params.device = options.device;
        params.dtype = options.dtype;
        params.dequantize_fp8 = options.dequantize_fp8 ? 1 : 0;
        params.attention = options.attention;
        detail::Callback<std::function<bool(float)>> cb{&options.progress, nullptr};
        if (options.progress) {
            params.progress = detail::dsv3_cpp_progress_trampoline;
            params.user_data = &cb;
        }
        dsv3_model* raw = nullptr;
        const dsv3_status s = dsv3_model_load(p.c_str(), &params, &raw);
        Model m(s == DSV3_OK ? raw : nullptr);
        cb.finish(s);
        return m;
    }

    /// The model's figures (vocabulary, sizes, parameter counts, BOS/EOS ids).
    ModelInfo info() const {
        ModelInfo i;
        detail::check(dsv3_model_get_info(h_.get(), &i));
        return i;
    }

    /// The model's config as JSON.
    std::string config_json() const {
        const auto buf = detail::fill<char>(4096, [&](char* b, size_t cap, size_t* needed) {
            return dsv3_model_config_json(h_.get(), b, cap, needed);
        });
        return std::string(buf.data(), buf.empty() ? 0 : buf.size() - 1);
    }

    /// Generates a continuation of `prompt` (non-empty) and returns the generated ids. `on_token`
    /// (optional) sees each token as it is sampled; returning false stops after that token.
    std::vector<int32_t> generate(const std::vector<int32_t>& prompt,
                                  const SamplingParams& params = SamplingParams(),
                                  const std::function<bool(int32_t)>& on_token = nullptr) const {
        dsv3_sampling_params p;
        detail::check(dsv3_sampling_params_default(&p));
        p.temperature = params.temperature;
        p.top_k = params.top_k;
        p.top_p = params.top_p;
        p.seed = params.seed;
        p.max_new_tokens = params.max_new_tokens;
        p.stop_tokens = params.stop_tokens.data();
        p.n_stop_tokens = params.stop_tokens.size();
        detail::Callback<std::function<bool(int32_t)>> cb{&on_token, nullptr};
        std::vector<int32_t> out(params.max_new_tokens > 0 ? params.max_new_tokens : 1);
        size_t n = 0;
        const dsv3_status s = dsv3_generate(h_.get(), prompt.data(), prompt.size(), &p,
                                            on_token ? detail::dsv3_cpp_token_trampoline : nullptr,
                                            on_token ? &cb : nullptr, out.data(), out.size(), &n);
        cb.finish(s);
        out.resize(n);
        return out;
    }

    /// Starts a session with `slots` sequences on this model.
    Session session(size_t slots = 1) const;

    dsv3_model* get() const noexcept { return h_.get(); }
    dsv3_model* release() noexcept { return h_.release(); }
    explicit operator bool() const noexcept { return h_ != nullptr; }

private:
    detail::Handle<dsv3_model, dsv3_model_free> h_;
};

/// An inference session: `slots` sequences, each with its own latent KV cache. One thread at a time.
class Session {
public:
    Session() noexcept = default;

    /// A session with `slots` empty sequences on `model` (which may be destroyed afterwards). On a
    /// GPU model each slot caches up to `max_len` tokens (0 = min(max positions, 4096)).
    explicit Session(const Model& model, size_t slots = 1, size_t max_len = 0) {
        dsv3_session* raw = nullptr;
        detail::check(dsv3_session_new_ex(model.get(), slots, max_len, &raw));
        h_.reset(raw);
        vocab_ = static_cast<size_t>(model.info().vocab_size);
    }

    /// Appends `ids` to `slot` (prefill when several, decode when one) and returns the logits of
    /// the last token (vocab_size floats).
    std::vector<float> step(size_t slot, const std::vector<int32_t>& ids) {
        return detail::fill<float>(vocab_, [&](float* b, size_t cap, size_t* needed) {
            return dsv3_session_step(h_.get(), slot, ids.data(), ids.size(), b, cap, needed);
        });
    }

    /// Appends `ids` to `slot` without computing the logits' copy (e.g. a prompt's prefix).
    void append(size_t slot, const std::vector<int32_t>& ids) {
        detail::check(dsv3_session_step(h_.get(), slot, ids.data(), ids.size(), nullptr, 0, nullptr));
    }

    /// Empties `slot`.
    void reset(size_t slot) { detail::check(dsv3_session_reset(h_.get(), slot)); }

    /// Keeps the first `len` tokens of `slot`.
    void truncate(size_t slot, size_t len) { detail::check(dsv3_session_truncate(h_.get(), slot, len)); }

    /// Tokens cached in `slot`.
    size_t length(size_t slot) const {
        size_t n = 0;
        detail::check(dsv3_session_length(h_.get(), slot, &n));
        return n;
    }

    dsv3_session* get() const noexcept { return h_.get(); }
    dsv3_session* release() noexcept { return h_.release(); }
    explicit operator bool() const noexcept { return h_ != nullptr; }

private:
    detail::Handle<dsv3_session, dsv3_session_free> h_;
    size_t vocab_ = 0;
};

inline Session Model::session(size_t slots) const { return Session(*this, slots); }

/// A tokenizer: a HF tokenizer.json or the built-in byte tokenizer. One thread at a time.
class Tokenizer {
public:
    Tokenizer() noexcept = default;
    explicit Tokenizer(dsv3_tokenizer* raw) noexcept : h_(raw) {}

    /// Loads a HF tokenizer.json.
    static Tokenizer load(std::string_view path) {
        const std::string p = detail::c_string(path, "path");
        dsv3_tokenizer* raw = nullptr;
        detail::check(dsv3_tokenizer_load(p.c_str(), &raw));
        return Tokenizer(raw);
    }

    /// The model directory's tokenizer.json, or the byte tokenizer for a byte-level vocabulary.
    static Tokenizer for_model(const Model& model) {
        dsv3_tokenizer* raw = nullptr;
        detail::check(dsv3_tokenizer_for_model(model.get(), &raw));
        return Tokenizer(raw);
    }

    /// The ids of UTF-8 `text`; `add_special` adds the tokenizer's special tokens (e.g. BOS).
    std::vector<int32_t> encode(std::string_view text, bool add_special = true) const {
        const std::string t = detail::c_string(text, "text");
        return detail::fill<int32_t>(t.size() + 2, [&](int32_t* b, size_t cap, size_t* needed) {
            return dsv3_tokenizer_encode(h_.get(), t.c_str(), add_special ? 1 : 0, b, cap, needed);
        });
    }

    /// The UTF-8 text of `ids`; `skip_special` drops special tokens.
    std::string decode(const std::vector<int32_t>& ids, bool skip_special = true) const {
        const auto buf = detail::fill<char>(ids.size() * 4 + 1, [&](char* b, size_t cap, size_t* needed) {
            return dsv3_tokenizer_decode(h_.get(), ids.data(), ids.size(), skip_special ? 1 : 0, b, cap, needed);
        });
        return std::string(buf.data(), buf.empty() ? 0 : buf.size() - 1);
    }

    /// The id of a token string (throws DSV3_ERR_INVALID_ARGUMENT if there is none).
    int32_t token_to_id(std::string_view token) const {
        const std::string t = detail::c_string(token, "token");
        int32_t id = -1;
        detail::check(dsv3_tokenizer_token_to_id(h_.get(), t.c_str(), &id));
        return id;
    }

    /// The vocabulary size, added tokens included.
    size_t vocab_size() const {
        size_t n = 0;
        detail::check(dsv3_tokenizer_vocab_size(h_.get(), &n));
        return n;
    }

    dsv3_tokenizer* get() const noexcept { return h_.get(); }
    dsv3_tokenizer* release() noexcept { return h_.release(); }
    explicit operator bool() const noexcept { return h_ != nullptr; }

private:
    detail::Handle<dsv3_tokenizer, dsv3_tokenizer_free> h_;
};

/// A trainer: f32 master weights, gradients, AdamW state. One thread at a time.
class Trainer {
public:
    Trainer() noexcept = default;
    explicit Trainer(dsv3_trainer* raw) noexcept : h_(raw) {}

    /// Starts from `model`'s weights (copied).
    explicit Trainer(const Model& model, const TrainParams& params = TrainParams()) {
        dsv3_trainer* raw = nullptr;
        detail::check(dsv3_trainer_new(model.get(), &params, &raw));
        h_.reset(raw);
    }

    /// A fresh, randomly initialized model of a preset ("tiny", "bench-4m", "bench-88m"),
    /// seeded with params.seed.
    static Trainer preset(std::string_view name, const TrainParams& params = TrainParams()) {
        const std::string n = detail::c_string(name, "preset");
        dsv3_trainer* raw = nullptr;
        detail::check(dsv3_trainer_new_preset(n.c_str(), &params, &raw));
        return Trainer(raw);
    }

    /// Resumes a checkpoint written by save() (or `dsv3 train`).
    static Trainer load(std::string_view dir, const TrainParams& params = TrainParams()) {
        const std::string d = detail::c_string(dir, "dir");
        dsv3_trainer* raw = nullptr;
        detail::check(dsv3_trainer_load(d.c_str(), &params, &raw));
        return Trainer(raw);
    }

    /// One optimizer step on `batch` x `seq_len` token ids (row-major), next-token loss on
    /// every position.
    StepMetrics step(const std::vector<int32_t>& ids, size_t batch, size_t seq_len) {
        check_shape(ids.size(), batch * seq_len, "ids");
        StepMetrics m;
        detail::check(dsv3_trainer_step(h_.get(), ids.data(), batch, seq_len, &m));
        return m;
    }

    /// Like step() with a loss mask of batch x (seq_len - 1) weights (1 = completion, 0 = prompt).
    StepMetrics step_sft(const std::vector<int32_t>& ids, const std::vector<float>& loss_mask, size_t batch,
                         size_t seq_len) {
        check_shape(ids.size(), batch * seq_len, "ids");
        check_shape(loss_mask.size(), seq_len > 0 ? batch * (seq_len - 1) : 0, "loss_mask");
        StepMetrics m;
        detail::check(dsv3_trainer_step_sft(h_.get(), ids.data(), loss_mask.data(), batch, seq_len, &m));
        return m;
    }

    /// Tokens routed to each expert of MoE layer `moe_layer` (0 = the first MoE layer) in the
    /// last step.
    std::vector<uint32_t> expert_load(size_t moe_layer) const {
        return detail::fill<uint32_t>(64, [&](uint32_t* b, size_t cap, size_t* needed) {
            return dsv3_trainer_expert_load(h_.get(), moe_layer, b, cap, needed);
        });
    }

    /// Writes a checkpoint directory (atomically).
    void save(std::string_view dir) {
        const std::string d = detail::c_string(dir, "dir");
        detail::check(dsv3_trainer_save(h_.get(), d.c_str()));
    }

    /// A model with the trainer's current weights (a snapshot, for inference).
    Model model() const {
        dsv3_model* raw = nullptr;
        detail::check(dsv3_trainer_model(h_.get(), &raw));
        return Model(raw);
    }

    dsv3_trainer* get() const noexcept { return h_.get(); }
    dsv3_trainer* release() noexcept { return h_.release(); }
    explicit operator bool() const noexcept { return h_ != nullptr; }

private:
    // The C call reads exactly its shape's elements: a vector of another size is an error here.
    static void check_shape(size_t have, size_t want, const char* what) {
        if (have != want) {
            throw Error(DSV3_ERR_INVALID_ARGUMENT, std::string("dsv3: ") + what + " has " + std::to_string(have) +
                                                       " elements, the shape needs " + std::to_string(want));
        }
    }

    detail::Handle<dsv3_trainer, dsv3_trainer_free> h_;
};

/// A GRPO trainer: the policy (a copy of a model's weights), its optimizer, the reference model
/// (beta > 0), reward functions and the last batch. One thread at a time.
class Grpo {
public:
    /// A completion of the last step and its weighted reward (NaN: no reward function applied).
    struct Completion {
        std::string text;
        float reward;
    };

    Grpo() noexcept = default;

    /// Starts from `model`'s weights (copied); `train` sets the optimizer (lr, schedule, ...),
    /// `params` GRPO (num_generations, max_completion_length, beta, ...). Completions stop at the
    /// model's EOS (see set_stop_tokens). Add a reward before step().
    explicit Grpo(const Model& model, const TrainParams& train = TrainParams(),
                  const GrpoParams& params = GrpoParams()) {
        dsv3_grpo* raw = nullptr;
        detail::check(dsv3_grpo_new(model.get(), &train, &params, &raw));
        h_.reset(raw);
        state_ = std::make_unique<detail::GrpoState>();
        generations_ = params.num_generations;
    }

    /// Resumes a checkpoint written by save(): the policy, its optimizer state and the step count.
    /// `reference` is the frozen reference for beta > 0 (copied; nullptr: the loaded policy).
    /// Rewards are not saved: add them again.
    static Grpo load(std::string_view dir, const Model* reference = nullptr, const TrainParams& train = TrainParams(),
                     const GrpoParams& params = GrpoParams()) {
        const std::string d = detail::c_string(dir, "dir");
        dsv3_grpo* raw = nullptr;
        detail::check(dsv3_grpo_load(d.c_str(), reference ? reference->get() : nullptr, &train, &params, &raw));
        Grpo g;
        g.h_.reset(raw);
        g.state_ = std::make_unique<detail::GrpoState>();
        g.generations_ = params.num_generations;
        return g;
    }

    /// Adds a reward with `weight`. Without `fn`, `name` is a built-in ("accuracy", "exact",
    /// "format", "language", "language-zh"); with `fn`, it is called once per completion and
    /// `name` labels its metrics. An exception `fn` throws fails the step (no optimizer step is
    /// taken) and step() rethrows it; `fn` must not use this Grpo.
    void add_reward(std::string_view name, float weight = 1.0f, RewardFn fn = nullptr) {
        live();
        const std::string n = detail::c_string(name, "name");
        std::unique_ptr<detail::GrpoReward> r;
        if (fn) r.reset(new detail::GrpoReward{std::move(fn), state_.get()});
        rewards_.reserve(rewards_.size() + 1);  // the push_back below cannot fail once C holds r
        detail::check(dsv3_grpo_add_reward(h_.get(), n.c_str(), weight,
                                           r ? detail::dsv3_cpp_reward_trampoline : nullptr, r.get()));
        if (r) rewards_.push_back(std::move(r));
    }

    /// Completions end after any of these tokens (replacing the default, the model's EOS).
    void set_stop_tokens(const std::vector<uint32_t>& tokens) {
        live();
        detail::check(dsv3_grpo_set_stop_tokens(h_.get(), tokens.data(), tokens.size()));
    }

    /// One GRPO step on text `prompts`: samples num_generations completions of each, scores them,
    /// takes num_iterations optimizer steps. `answers` is empty or has one entry per prompt
    /// (nullopt: no reference). `tokenizer` is NULL for a byte-level model.
    GrpoMetrics step(const std::vector<std::string>& prompts,
                     const std::vector<std::optional<std::string>>& answers = {},
                     const Tokenizer* tokenizer = nullptr) {
        live();
        if (!answers.empty() && answers.size() != prompts.size()) {
            throw Error(DSV3_ERR_INVALID_ARGUMENT, "dsv3: answers has " + std::to_string(answers.size()) +
                                                       " entries for " + std::to_string(prompts.size()) + " prompts");
        }
        std::vector<std::string> ps;
        std::vector<const char*> p_ptrs, a_ptrs;
        std::vector<std::string> as;
        ps.reserve(prompts.size());
        as.reserve(answers.size());
        for (const std::string& p : prompts) ps.push_back(detail::c_string(p, "prompt"));
        for (const std::string& p : ps) p_ptrs.push_back(p.c_str());
        for (const auto& a : answers) {
            as.push_back(a ? detail::c_string(*a, "answer") : std::string());
            a_ptrs.push_back(a ? as.back().c_str() : nullptr);
        }
        GrpoMetrics m;
        state_->error = nullptr;
        state_->stepping = true;
        const dsv3_status s = dsv3_grpo_step(h_.get(), tokenizer ? tokenizer->get() : nullptr, p_ptrs.data(),
                                             answers.empty() ? nullptr : a_ptrs.data(), prompts.size(), &m);
        state_->stepping = false;
        if (std::exception_ptr e = std::exchange(state_->error, nullptr)) std::rethrow_exception(e);
        detail::check(s);
        state_->last_count = prompts.size() * generations_;
        return m;
    }

    /// (mean, std) of reward function `index` (in the order added) over the last step; NaN where
    /// it never applied.
    std::pair<float, float> reward_stats(size_t index) const {
        live();
        float mean = 0, std = 0;
        detail::check(dsv3_grpo_reward_stats(h_.get(), index, &mean, &std));
        return {mean, std};
    }

    /// The last step's completions (prompt i / num_generations, sample i % num_generations);
    /// empty before the first step.
    std::vector<Completion> completions() const {
        live();
        std::vector<Completion> out;
        for (size_t i = 0; i < state_->last_count; ++i) {
            float reward = 0;
            const auto buf = detail::fill<char>(256, [&](char* b, size_t cap, size_t* needed) {
                return dsv3_grpo_completion(h_.get(), i, b, cap, needed, &reward);
            });
            out.push_back({std::string(buf.data(), buf.empty() ? 0 : buf.size() - 1), reward});
        }
        return out;
    }

    /// Completions per prompt (G).
    uint32_t num_generations() const noexcept { return generations_; }

    /// A model with the policy's current weights (a snapshot, for inference).
    Model model() const {
        live();
        dsv3_model* raw = nullptr;
        detail::check(dsv3_grpo_model(h_.get(), &raw));
        return Model(raw);
    }

    /// Writes the policy as a checkpoint directory (atomically); Trainer::load resumes it.
    void save(std::string_view dir) {
        live();
        const std::string d = detail::c_string(dir, "dir");
        detail::check(dsv3_grpo_save(h_.get(), d.c_str()));
    }

    dsv3_grpo* get() const noexcept { return h_.get(); }
    explicit operator bool() const noexcept { return h_ != nullptr; }

private:
    // An empty (moved-from) Grpo, or a call from inside one of its own rewards (which would alias
    // the trainer the C step is using), throws.
    void live() const {
        if (!h_) throw Error(DSV3_ERR_NULL_ARGUMENT, "dsv3: the Grpo is empty (default-constructed or moved from)");
        if (state_->stepping) {
            throw Error(DSV3_ERR_INVALID_ARGUMENT, "dsv3: a reward function cannot use the Grpo that is calling it");
        }
    }

    // Declared before h_: destroyed after the C trainer that calls them.
    std::unique_ptr<detail::GrpoState> state_;
    std::vector<std::unique_ptr<detail::GrpoReward>> rewards_;
    uint32_t generations_ = 0;
    detail::Handle<dsv3_grpo, dsv3_grpo_free> h_;
};

}  // namespace dsv3

#endif  // DSV3_HPP
