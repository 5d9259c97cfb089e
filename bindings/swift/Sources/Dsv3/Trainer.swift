// Training: trainers from a model, a preset or a checkpoint; steps (plain and SFT-masked);
// metrics, expert loads, checkpoints.

/// The learning-rate schedule (dsv3_train_params.schedule).
public enum LRSchedule: Int32 {
    /// A constant learning rate `lr`.
    case constant = 0
    /// Linear warmup over `warmupSteps`, then cosine decay to `minLR` at `totalSteps`.
    case warmupCosine = 1
    /// DeepSeek-V3's step schedule over `totalSteps`.
    case deepSeekV3 = 2
}

/// The GEMM precision of the decoder's linear layers (dsv3_train_params.precision).
public enum Precision: Int32 {
    case f32 = 0
    case bf16 = 1
    case fp8 = 2
}

/// Training settings (dsv3_train_params). `TrainParams()` has the C defaults: lr 1e-3, warmup
/// (20) + cosine over 1000 steps to 1e-4, AdamW weight decay 0.1, clip 1.0, bias update 0.001,
/// sequence-wise α 1e-4, MTP λ 0.3, f32.
public struct TrainParams {
    public var lr: Float
    /// Final learning rate of the cosine schedule.
    public var minLR: Float
    public var warmupSteps: UInt64
    /// Steps the schedule spans (cosine and DeepSeek-V3).
    public var totalSteps: UInt64
    public var schedule: LRSchedule
    public var weightDecay: Float
    /// Global gradient-norm clip; 0 = off.
    public var clipNorm: Float
    /// Auxiliary-loss-free bias update speed γ; 0 = off.
    public var biasUpdateSpeed: Float
    /// Complementary sequence-wise balance loss α.
    public var seqAuxAlpha: Float
    /// Conventional auxiliary balance loss weight; 0 = off.
    public var auxLossAlpha: Float
    /// MTP loss weight (used when the model has MTP modules).
    public var mtpLambda: Float
    public var precision: Precision
    /// Keep the AdamW moments in bf16.
    public var bf16Moments: Bool
    /// Seed of the random initialization (Trainer.preset).
    public var seed: UInt64

    public init() {
        var raw = dsv3_train_params()
        _ = dsv3_train_params_default(&raw)
        lr = raw.lr
        minLR = raw.min_lr
        warmupSteps = raw.warmup_steps
        totalSteps = raw.total_steps
        schedule = LRSchedule(rawValue: raw.schedule) ?? .warmupCosine
        weightDecay = raw.weight_decay
        clipNorm = raw.clip_norm
        biasUpdateSpeed = raw.bias_update_speed
        seqAuxAlpha = raw.seq_aux_alpha
        auxLossAlpha = raw.aux_loss_alpha
        mtpLambda = raw.mtp_lambda
        precision = Precision(rawValue: raw.precision) ?? .f32
        bf16Moments = raw.bf16_moments != 0
        seed = raw.seed
    }

    func makeRaw() throws -> dsv3_train_params {
        var raw = dsv3_train_params()
        try check(dsv3_train_params_default(&raw))
        raw.lr = lr
        raw.min_lr = minLR
        raw.warmup_steps = warmupSteps
        raw.total_steps = totalSteps
        raw.schedule = schedule.rawValue
        raw.weight_decay = weightDecay
        raw.clip_norm = clipNorm
        raw.bias_update_speed = biasUpdateSpeed
        raw.seq_aux_alpha = seqAuxAlpha
        raw.aux_loss_alpha = auxLossAlpha
        raw.mtp_lambda = mtpLambda
        raw.precision = precision.rawValue
        raw.bf16_moments = bf16Moments ? 1 : 0
        raw.seed = seed
        return raw
    }
}

/// What one training step reports (dsv3_step_metrics).
public struct StepMetrics {
    /// The step's index (0-based).
    public let step: UInt64
    /// Mean next-token cross-entropy over the counted positions.
    public let loss: Float
    public let balanceLoss: Float
    public let mtpLoss: Float
    /// Global gradient norm before clipping.
    public let gradNorm: Float
    public let lr: Float
    public let tokens: UInt64
    public let tokensPerSecond: Double
    /// Largest (max load / mean load) over the MoE layers; 1 = balanced.
    public let maxOverMeanLoad: Float

    init(_ raw: dsv3_step_metrics) {
        step = raw.step
        loss = raw.loss
        balanceLoss = raw.balance_loss
        mtpLoss = raw.mtp_loss
        gradNorm = raw.grad_norm
        lr = raw.lr
        tokens = raw.tokens
        tokensPerSecond = raw.tokens_per_s
        maxOverMeanLoad = raw.max_over_mean_load
    }
}

/// A trainer (dsv3_trainer): f32 master weights, gradients, AdamW state. Use it from one thread
/// at a time.
public final class Trainer {
    /// The C handle, owned by this object (freed in deinit).
    public let handle: OpaquePointer

    init(owning handle: OpaquePointer) {
        self.handle = handle
    }

    /// A trainer starting from `model`'s weights (copied: the model is unaffected).
    public convenience init(model: Model, params: TrainParams = TrainParams()) throws {
        var raw = try params.makeRaw()
        var out: OpaquePointer? = nil
        try check(dsv3_trainer_new(model.handle, &raw, &out))
        let handle = try unwrap(out, "dsv3_trainer_new")
        self.init(owning: handle)
    }

    deinit {
        dsv3_trainer_free(handle)
    }

    /// A trainer for a fresh, randomly initialized model of a preset ("tiny", "bench-4m",
    /// "bench-88m"), seeded with `params.seed`.
    public static func preset(_ name: String, params: TrainParams = TrainParams()) throws -> Trainer {
        var raw = try params.makeRaw()
        var out: OpaquePointer? = nil
        try check(dsv3_trainer_new_preset(name, &raw, &out))
        let handle = try unwrap(out, "dsv3_trainer_new_preset")
        return Trainer(owning: handle)
    }

    /// Resumes a checkpoint directory written by `save(to:)` (or `dsv3 train`).
    public static func load(from directory: String, params: TrainParams = TrainParams()) throws -> Trainer {
        var raw = try params.makeRaw()
        var out: OpaquePointer? = nil
        try check(dsv3_trainer_load(directory, &raw, &out))
        let handle = try unwrap(out, "dsv3_trainer_load")
        return Trainer(owning: handle)
    }

    /// Writes a checkpoint directory (HF-format model + optimizer + trainer state), atomically:
    /// a failure leaves a previous checkpoint at `directory` intact.
    public func save(to directory: String) throws {
        try check(dsv3_trainer_save(handle, directory))
    }

    /// One optimizer step on `batch` sequences of `seqLen` ids (`ids` row-major, `batch * seqLen`
    /// of them), next-token loss on every position. On failure the weights are unchanged.
    public func step(ids: [Int32], batch: Int, seqLen: Int) throws -> StepMetrics {
        try checkShape(ids.count, batch: batch, seqLen: seqLen)
        var metrics = dsv3_step_metrics()
        // stride, not size: C's sizeof includes the tail padding (64 bytes, not 60).
        metrics.struct_size = MemoryLayout<dsv3_step_metrics>.stride
        let h = handle
        let status = ids.withUnsafeBufferPointer { p in
            dsv3_trainer_step(h, p.baseAddress, batch, seqLen, &metrics)
        }
        try check(status)
        return StepMetrics(metrics)
    }

    /// Like `step`, with a loss mask of `batch * (seqLen - 1)` weights: position t (predicting
    /// token t+1) counts with weight lossMask[t] (1 = completion token, 0 = prompt): SFT.
    public func stepSFT(ids: [Int32], lossMask: [Float], batch: Int, seqLen: Int) throws -> StepMetrics {
        try checkShape(ids.count, batch: batch, seqLen: seqLen)
        guard lossMask.count == batch * (seqLen - 1) else {
            throw invalidArgument("lossMask has \(lossMask.count) weights, batch * (seqLen - 1) is \(batch * (seqLen - 1))")
        }
        var metrics = dsv3_step_metrics()
        metrics.struct_size = MemoryLayout<dsv3_step_metrics>.stride
        let h = handle
        let status = ids.withUnsafeBufferPointer { p in
            lossMask.withUnsafeBufferPointer { m in
                dsv3_trainer_step_sft(h, p.baseAddress, m.baseAddress, batch, seqLen, &metrics)
            }
        }
        try check(status)
        return StepMetrics(metrics)
    }

    /// Tokens routed to each expert of MoE layer `moeLayer` (0 = the first MoE layer) in the
    /// last step.
    public func expertLoad(moeLayer: Int) throws -> [UInt32] {
        guard moeLayer >= 0 else {
            throw invalidArgument("moeLayer must be >= 0, got \(moeLayer)")
        }
        var needed = 0
        let first = dsv3_trainer_expert_load(handle, moeLayer, nil, 0, &needed)
        if first == DSV3_OK {
            return []
        }
        if first != DSV3_ERR_BUFFER_TOO_SMALL {
            try check(first)
        }
        var loads = [UInt32](repeating: 0, count: needed)
        let h = handle
        let status = loads.withUnsafeMutableBufferPointer { b in
            dsv3_trainer_expert_load(h, moeLayer, b.baseAddress, b.count, &needed)
        }
        try check(status)
        return loads
    }

    /// A model with the trainer's current weights (a snapshot, for inference).
    public func snapshotModel() throws -> Model {
        var out: OpaquePointer? = nil
        try check(dsv3_trainer_model(handle, &out))
        let handle = try unwrap(out, "dsv3_trainer_model")
        return Model(owning: handle)
    }

    /// The C side reads batch * seqLen ids: make sure the array has exactly that many.
    private func checkShape(_ count: Int, batch: Int, seqLen: Int) throws {
        guard batch > 0, seqLen >= 2, count % seqLen == 0, count / seqLen == batch else {
            throw invalidArgument("ids has \(count) tokens, need batch (\(batch)) * seqLen (\(seqLen)) with batch >= 1, seqLen >= 2")
        }
    }
}
