// GRPO (group relative policy optimization, TRL's GRPOTrainer): a trainer that samples groups of
// completions for text prompts, scores them with built-in rule rewards and Swift reward closures,
// and learns from the group-relative advantages (dsv3_grpo_* of the C ABI).

/// How the GRPO loss is normalized (dsv3_grpo_params.loss_type, TRL's loss_type).
public enum GrpoLossType: Int32 {
    case grpo = 0
    case bnpo = 1
    case drGRPO = 2
    /// The default.
    case dapo = 3
}

/// How advantages are scaled (dsv3_grpo_params.scale_rewards, TRL's scale_rewards).
public enum GrpoScaleRewards: Int32 {
    /// By the std of the group's rewards (the default).
    case group = 0
    case batch = 1
    case none = 2
}

/// GRPO settings (dsv3_grpo_params, TRL's names). `GrpoParams()` has the C defaults (TRL's):
/// G 8, 256 tokens, temperature 1, top-p 1, μ 1, β 0, ε 0.2 / 0.2, dapo, group scaling, token
/// level, no reference reset.
public struct GrpoParams {
    /// Completions per prompt (G, >= 2).
    public var numGenerations: Int
    public var maxCompletionLength: Int
    /// Sampling temperature (> 0); the log-probs use the same.
    public var temperature: Float
    /// In (0, 1]; 1 = off.
    public var topP: Float
    /// 0 = off.
    public var topK: Int
    /// μ: optimizer steps per generation batch.
    public var numIterations: Int
    /// KL weight β (0 = no reference model).
    public var beta: Float
    public var epsilon: Float
    public var epsilonHigh: Float
    public var lossType: GrpoLossType
    public var scaleRewards: GrpoScaleRewards
    /// Sequence-level importance ratio (GSPO).
    public var sequenceLevel: Bool
    /// Reset the reference to the policy every this many optimizer steps (0 = never).
    public var refSyncSteps: UInt64
    public var refMixupAlpha: Float
    /// Seed of the sampling.
    public var seed: UInt64

    public init() {
        var raw = dsv3_grpo_params()
        _ = dsv3_grpo_params_default(&raw)
        numGenerations = Int(raw.num_generations)
        maxCompletionLength = Int(raw.max_completion_length)
        temperature = raw.temperature
        topP = raw.top_p
        topK = Int(raw.top_k)
        numIterations = Int(raw.num_iterations)
        beta = raw.beta
        epsilon = raw.epsilon
        epsilonHigh = raw.epsilon_high
        lossType = GrpoLossType(rawValue: raw.loss_type) ?? .dapo
        scaleRewards = GrpoScaleRewards(rawValue: raw.scale_rewards) ?? .group
        sequenceLevel = raw.sequence_level != 0
        refSyncSteps = raw.ref_sync_steps
        refMixupAlpha = raw.ref_mixup_alpha
        seed = raw.seed
    }

    /// The C struct (struct_size set by dsv3_grpo_params_default); the library validates values.
    func makeRaw() throws -> dsv3_grpo_params {
        func u32(_ value: Int, _ name: String) throws -> UInt32 {
            guard let v = UInt32(exactly: value) else {
                throw invalidArgument("\(name) must be in [0, 2^32), got \(value)")
            }
            return v
        }
        var raw = dsv3_grpo_params()
        try check(dsv3_grpo_params_default(&raw))
        raw.num_generations = try u32(numGenerations, "numGenerations")
        raw.max_completion_length = try u32(maxCompletionLength, "maxCompletionLength")
        raw.temperature = temperature
        raw.top_p = topP
        raw.top_k = try u32(topK, "topK")
        raw.num_iterations = try u32(numIterations, "numIterations")
        raw.beta = beta
        raw.epsilon = epsilon
        raw.epsilon_high = epsilonHigh
        raw.loss_type = lossType.rawValue
        raw.scale_rewards = scaleRewards.rawValue
        raw.sequence_level = sequenceLevel ? 1 : 0
        raw.ref_sync_steps = refSyncSteps
        raw.ref_mixup_alpha = refMixupAlpha
        raw.seed = seed
        return raw
    }
}

/// Mean and std of one reward function over the last step's completions (NaN: it never applied).
public struct GrpoRewardStats {
    /// The name the reward was added with.
    public let name: String
    public let mean: Float
    public let std: Float
}

/// What one GRPO step reports (dsv3_grpo_metrics, TRL's metrics), plus the per-reward stats.
public struct GrpoMetrics {
    /// The step's index (0-based).
    public let step: UInt64
    /// Loss averaged over the μ optimizer steps.
    public let loss: Float
    /// Mean and std of the weighted reward over the batch.
    public let reward: Float
    public let rewardStd: Float
    /// Share of groups whose rewards are all equal (no learning signal).
    public let fracRewardZeroStd: Float
    public let kl: Float
    public let clipRatioLow: Float
    public let clipRatioHigh: Float
    public let clipRatioRegion: Float
    public let completionLengthMean: Float
    public let completionLengthMax: UInt64
    /// Share of completions cut at maxCompletionLength.
    public let clippedRatio: Float
    public let gradNorm: Float
    public let lr: Float
    /// Completion tokens sampled.
    public let completionTokens: UInt64
    /// Wall time of sampling (generation + rewards) and of learning (the μ optimizer steps).
    public let samplingSeconds: Double
    public let learningSeconds: Double
    /// Each reward function's mean and std over the step's completions, in the order added.
    public let rewards: [GrpoRewardStats]

    init(_ raw: dsv3_grpo_metrics, rewards: [GrpoRewardStats]) {
        step = raw.step
        loss = raw.loss
        reward = raw.reward
        rewardStd = raw.reward_std
        fracRewardZeroStd = raw.frac_reward_zero_std
        kl = raw.kl
        clipRatioLow = raw.clip_ratio_low
        clipRatioHigh = raw.clip_ratio_high
        clipRatioRegion = raw.clip_ratio_region
        completionLengthMean = raw.completion_length_mean
        completionLengthMax = raw.completion_length_max
        clippedRatio = raw.clipped_ratio
        gradNorm = raw.grad_norm
        lr = raw.lr
        completionTokens = raw.completion_tokens
        samplingSeconds = raw.sampling_s
        learningSeconds = raw.learning_s
        self.rewards = rewards
    }
}

/// A completion of the last step and its weighted reward (nil: no reward function applied).
public struct GrpoCompletion: Equatable {
    public let text: String
    public let reward: Float?
}

/// A Swift reward: (prompt, completion, the prompt's reference answer or nil) -> the completion's
/// reward, or nil (or NaN) when it does not apply (skipped in the weighted sum, as TRL's None).
/// An error it throws aborts the step (no optimizer step is taken) and `Grpo.step` rethrows it.
public typealias GrpoRewardFunction = (_ prompt: String, _ completion: String, _ answer: String?) throws -> Float?

/// What a Grpo and its reward boxes share: the first error of the running step, and whether a
/// step is running (a reward must not use the Grpo that calls it).
final class GrpoState {
    var error: Error?
    var stepping = false
}

/// A reward closure passed to C as `user_data` (an unretained Unmanaged pointer; the Grpo keeps
/// the box alive as long as its C handle).
final class RewardCallback {
    let body: GrpoRewardFunction
    let state: GrpoState

    init(_ body: @escaping GrpoRewardFunction, state: GrpoState) {
        self.body = body
        self.state = state
    }

    /// The reward, NaN for nil; +inf (the library then fails the step with DSV3_ERR_NON_FINITE
    /// before any optimizer step) when the closure threw, or once an earlier call of the step did.
    func score(_ prompt: UnsafePointer<CChar>?, _ completion: UnsafePointer<CChar>?,
               _ answer: UnsafePointer<CChar>?) -> Float {
        if state.error != nil {
            return Float.infinity
        }
        let p = prompt.map { String(cString: $0) } ?? ""
        let c = completion.map { String(cString: $0) } ?? ""
        let a = answer.map { String(cString: $0) }
        do {
            guard let value = try body(p, c, a) else {
                return Float.nan
            }
            return value
        } catch {
            state.error = error
            return Float.infinity
        }
    }
}

/// The C reward callback: unboxes the closure.
let rewardTrampoline: dsv3_reward_fn = { userData, prompt, completion, answer in
    guard let userData = userData else { return Float.nan }
    let callback = Unmanaged<RewardCallback>.fromOpaque(userData).takeUnretainedValue()
    return callback.score(prompt, completion, answer)
}

/// A copy of `s` in C memory, NUL-terminated (free with deallocate()).
private func cStringCopy(_ s: String) -> UnsafeMutablePointer<CChar> {
    let bytes = Array(s.utf8)
    let p = UnsafeMutablePointer<CChar>.allocate(capacity: bytes.count + 1)
    for (i, b) in bytes.enumerated() {
        // CChar is Int8 or UInt8 depending on the platform: convert bit for bit.
        p[i] = CChar(truncatingIfNeeded: b)
    }
    p[bytes.count] = 0
    return p
}

/// A GRPO trainer (dsv3_grpo): the policy (a copy of a model's weights), its optimizer, the
/// reference model (β > 0), the reward functions and the last batch. Use it from one thread at a
/// time. Reward closures run on the thread calling `step`, one after another; they must not use
/// the Grpo that calls them (such calls throw DSV3_ERR_INVALID_ARGUMENT), and a closure that
/// captures its Grpo should do so `[weak]` or `[unowned]` (the Grpo keeps its closures).
public final class Grpo {
    /// The C handle, owned by this object (freed in deinit).
    public let handle: OpaquePointer
    /// Completions per prompt (G).
    public let numGenerations: Int
    /// The names of the reward functions, in the order added.
    public private(set) var rewardNames: [String] = []

    private let state = GrpoState()
    /// The boxes C holds as user_data: alive as long as the handle (released after deinit's free).
    private var callbacks: [RewardCallback] = []
    /// Whether a step of this object succeeded (there are completions to read).
    private var stepped = false

    init(owning handle: OpaquePointer, numGenerations: Int) {
        self.handle = handle
        self.numGenerations = numGenerations
    }

    /// A GRPO trainer starting from `model`'s weights (copied: the model is unaffected). `train`
    /// sets the optimizer (lr, schedule, clipping; its `seed` and `biasUpdateSpeed` are ignored:
    /// sampling uses `params.seed` and router biases stay fixed), `params` GRPO. Completions stop
    /// at the model's EOS (see `setStopTokens`). Add a reward before `step`.
    public convenience init(model: Model, train: TrainParams = TrainParams(),
                            params: GrpoParams = GrpoParams()) throws {
        var rawTrain = try train.makeRaw()
        var rawParams = try params.makeRaw()
        var out: OpaquePointer? = nil
        try check(dsv3_grpo_new(model.handle, &rawTrain, &rawParams, &out))
        let handle = try unwrap(out, "dsv3_grpo_new")
        self.init(owning: handle, numGenerations: params.numGenerations)
    }

    /// Resumes a checkpoint written by `save(to:)` (the policy, its optimizer state and the step
    /// count). `reference` is the frozen reference model for β > 0 (copied; nil: the loaded
    /// policy). Rewards are not saved: add them again.
    public static func load(from directory: String, reference: Model? = nil, train: TrainParams = TrainParams(),
                            params: GrpoParams = GrpoParams()) throws -> Grpo {
        var rawTrain = try train.makeRaw()
        var rawParams = try params.makeRaw()
        var out: OpaquePointer? = nil
        try check(dsv3_grpo_load(directory, reference?.handle, &rawTrain, &rawParams, &out))
        let handle = try unwrap(out, "dsv3_grpo_load")
        return Grpo(owning: handle, numGenerations: params.numGenerations)
    }

    deinit {
        dsv3_grpo_free(handle)
    }

    /// Adds a reward with `weight` (a completion's reward is the weighted sum). Without `reward`,
    /// `name` picks a built-in rule reward: "accuracy" (`\boxed{}` / `<answer>` vs the reference
    /// answer), "exact" (the completion's first line vs the reference), "format" (R1's
    /// `<think>…</think><answer>…</answer>`), "language" (English reasoning), "language-zh".
    /// With `reward`, Swift computes it, once per completion (`name` labels its stats). Names are
    /// unique.
    public func addReward(_ name: String, weight: Float = 1, _ reward: GrpoRewardFunction? = nil) throws {
        try live()
        if name.utf8.contains(0) {
            throw invalidArgument("reward name contains a NUL byte")
        }
        let box = reward.map { RewardCallback($0, state: state) }
        let callback: dsv3_reward_fn? = box == nil ? nil : rewardTrampoline
        let userData: UnsafeMutableRawPointer? = box.map { Unmanaged.passUnretained($0).toOpaque() }
        try check(dsv3_grpo_add_reward(handle, name, weight, callback, userData))
        if let box = box {
            callbacks.append(box)
        }
        rewardNames.append(name)
    }

    /// Completions end after any of these token ids (replacing the default, the model's EOS; an
    /// empty list: only maxCompletionLength ends them).
    public func setStopTokens(_ tokens: [UInt32]) throws {
        try live()
        let h = handle
        let status = tokens.withUnsafeBufferPointer { t in
            dsv3_grpo_set_stop_tokens(h, t.baseAddress, t.count)
        }
        try check(status)
    }

    /// One GRPO step: samples `numGenerations` completions of each prompt, scores them with the
    /// rewards, and takes μ optimizer steps. `answers` is nil or has one entry per prompt (nil: no
    /// reference). `tokenizer` encodes the prompts and decodes the completions; nil for a
    /// byte-level model. A reward closure's error is rethrown (no optimizer step was taken); on
    /// any failure the weights are unchanged (unless μ > 1 and an optimizer step already ran).
    public func step(prompts: [String], answers: [String?]? = nil, tokenizer: Tokenizer? = nil) throws -> GrpoMetrics {
        try live()
        if let answers = answers, answers.count != prompts.count {
            throw invalidArgument("answers has \(answers.count) entries for \(prompts.count) prompts")
        }
        for (i, p) in prompts.enumerated() where p.utf8.contains(0) {
            throw invalidArgument("prompts[\(i)] contains a NUL byte")
        }
        for (i, a) in (answers ?? []).enumerated() where a?.utf8.contains(0) ?? false {
            throw invalidArgument("answers[\(i)] contains a NUL byte")
        }
        var owned: [UnsafeMutablePointer<CChar>] = []
        defer {
            for p in owned {
                p.deallocate()
            }
        }
        var cPrompts: [UnsafePointer<CChar>?] = []
        for p in prompts {
            let c = cStringCopy(p)
            owned.append(c)
            cPrompts.append(UnsafePointer(c))
        }
        var cAnswers: [UnsafePointer<CChar>?]? = nil
        if let answers = answers {
            var list: [UnsafePointer<CChar>?] = []
            for a in answers {
                if let a = a {
                    let c = cStringCopy(a)
                    owned.append(c)
                    list.append(UnsafePointer(c))
                } else {
                    list.append(nil)
                }
            }
            cAnswers = list
        }
        var metrics = dsv3_grpo_metrics()
        // stride, not size: C's sizeof includes the tail padding.
        metrics.struct_size = MemoryLayout<dsv3_grpo_metrics>.stride
        let h = handle
        let tok = tokenizer?.handle
        state.error = nil
        state.stepping = true
        let status = cPrompts.withUnsafeBufferPointer { (p: UnsafeBufferPointer<UnsafePointer<CChar>?>) -> dsv3_status in
            guard let cAnswers = cAnswers else {
                return dsv3_grpo_step(h, tok, p.baseAddress, nil, p.count, &metrics)
            }
            return cAnswers.withUnsafeBufferPointer { (a: UnsafeBufferPointer<UnsafePointer<CChar>?>) -> dsv3_status in
                dsv3_grpo_step(h, tok, p.baseAddress, a.baseAddress, p.count, &metrics)
            }
        }
        state.stepping = false
        if let error = state.error {
            state.error = nil
            throw error
        }
        try check(status)
        stepped = true
        var stats: [GrpoRewardStats] = []
        for i in 0..<rewardNames.count {
            stats.append(try rewardStats(i))
        }
        return GrpoMetrics(metrics, rewards: stats)
    }

    /// Mean and std of reward function `index` (in the order added) over the last step's
    /// completions; NaN where it never applied. Throws before the first step.
    public func rewardStats(_ index: Int) throws -> GrpoRewardStats {
        try live()
        guard index >= 0 else {
            throw invalidArgument("reward index must be >= 0, got \(index)")
        }
        var mean: Float = 0
        var std: Float = 0
        try check(dsv3_grpo_reward_stats(handle, index, &mean, &std))
        let name = index < rewardNames.count ? rewardNames[index] : ""
        return GrpoRewardStats(name: name, mean: mean, std: std)
    }

    /// The stats of the reward added as `name`.
    public func rewardStats(named name: String) throws -> GrpoRewardStats {
        guard let index = rewardNames.firstIndex(of: name) else {
            throw invalidArgument("no reward named '\(name)'; the rewards are \(rewardNames)")
        }
        return try rewardStats(index)
    }

    /// The number of completions of the last step (prompts × numGenerations). Throws
    /// DSV3_ERR_INVALID_ARGUMENT before the first step.
    public func numCompletions() throws -> Int {
        try live()
        var n = 0
        try check(dsv3_grpo_num_completions(handle, &n))
        return n
    }

    /// Completion `i` of the last step (prompt i / numGenerations, sample i % numGenerations).
    public func completion(_ i: Int) throws -> GrpoCompletion {
        try live()
        guard i >= 0 else {
            throw invalidArgument("completion index must be >= 0, got \(i)")
        }
        var needed = 0
        var reward: Float = 0
        var buf = [CChar](repeating: 0, count: 256)
        var status = completionInto(i, &buf, &needed, &reward)
        if status == DSV3_ERR_BUFFER_TOO_SMALL {
            buf = [CChar](repeating: 0, count: needed)
            status = completionInto(i, &buf, &needed, &reward)
        }
        try check(status)
        return GrpoCompletion(text: stringFromCBuffer(buf, count: needed), reward: reward.isNaN ? nil : reward)
    }

    /// The last step's completions, prompt by prompt; empty before the first step.
    public func completions() throws -> [GrpoCompletion] {
        try live()
        if !stepped {
            return []
        }
        let n = try numCompletions()
        var out: [GrpoCompletion] = []
        out.reserveCapacity(n)
        for i in 0..<n {
            out.append(try completion(i))
        }
        return out
    }

    /// A model with the policy's current weights (a snapshot, for inference).
    public func snapshotModel() throws -> Model {
        try live()
        var out: OpaquePointer? = nil
        try check(dsv3_grpo_model(handle, &out))
        let handle = try unwrap(out, "dsv3_grpo_model")
        return Model(owning: handle)
    }

    /// Writes the policy as a checkpoint directory (HF-format model + optimizer + state),
    /// atomically; `Grpo.load(from:)` resumes it with its step count, `Trainer.load(from:)` as a
    /// plain trainer.
    public func save(to directory: String) throws {
        try live()
        try check(dsv3_grpo_save(handle, directory))
    }

    /// Refuses a call from inside one of this object's reward closures (C is using the trainer).
    private func live() throws {
        if state.stepping {
            throw invalidArgument("Grpo: a reward function cannot use the Grpo that is calling it")
        }
    }

    private func completionInto(_ i: Int, _ buf: inout [CChar], _ needed: inout Int,
                                _ reward: inout Float) -> dsv3_status {
        let h = handle
        return buf.withUnsafeMutableBufferPointer { b in
            dsv3_grpo_completion(h, i, b.baseAddress, b.count, &needed, &reward)
        }
    }
}
