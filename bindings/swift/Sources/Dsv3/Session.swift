// Inference sessions: token-level prefill and decode over a latent KV cache per slot.

/// An inference session (dsv3_session) over a fixed number of sequence slots. Use it from one
/// thread at a time. It holds its own reference to the model's weights.
public final class Session {
    /// The C handle, owned by this object (freed in deinit).
    public let handle: OpaquePointer
    /// Logits per step: the model's vocabulary size.
    public let vocabSize: Int
    /// The number of sequence slots.
    public let slots: Int

    /// A session with `slots` empty sequences on `model`. On a GPU model each slot caches up to
    /// `maxLen` tokens (0 = min(max positions, 4096)); CPU caches grow as needed.
    public init(model: Model, slots: Int = 1, maxLen: Int = 0) throws {
        guard slots > 0 else {
            throw invalidArgument("slots must be positive, got \(slots)")
        }
        guard maxLen >= 0 else {
            throw invalidArgument("maxLen must not be negative, got \(maxLen)")
        }
        let vocab = model.info.vocabSize
        var out: OpaquePointer? = nil
        if maxLen == 0 {
            try check(dsv3_session_new(model.handle, slots, &out))
        } else {
            try check(dsv3_session_new_ex(model.handle, slots, maxLen, &out))
        }
        self.handle = try unwrap(out, "dsv3_session_new")
        self.vocabSize = vocab
        self.slots = slots
    }

    deinit {
        dsv3_session_free(handle)
    }

    /// Appends `ids` to `slot` (prefill when several, decode when one) and returns the logits of
    /// the last token (`vocabSize` floats). On failure the slot's cache is unchanged.
    public func step(ids: [Int32], slot: Int = 0) throws -> [Float] {
        try checkSlot(slot)
        var logits = [Float](repeating: 0, count: vocabSize)
        var needed = 0
        let h = handle
        let status = ids.withUnsafeBufferPointer { p in
            logits.withUnsafeMutableBufferPointer { l in
                dsv3_session_step(h, slot, p.baseAddress, p.count, l.baseAddress, l.count, &needed)
            }
        }
        try check(status)
        return logits
    }

    /// Appends `ids` to `slot` without computing logits (e.g. a prefill whose output is not needed).
    public func append(ids: [Int32], slot: Int = 0) throws {
        try checkSlot(slot)
        let h = handle
        let status = ids.withUnsafeBufferPointer { p in
            dsv3_session_step(h, slot, p.baseAddress, p.count, nil, 0, nil)
        }
        try check(status)
    }

    /// The number of tokens cached in `slot`.
    public func length(slot: Int = 0) throws -> Int {
        try checkSlot(slot)
        var n = 0
        try check(dsv3_session_length(handle, slot, &n))
        return n
    }

    /// Empties `slot`.
    public func reset(slot: Int = 0) throws {
        try checkSlot(slot)
        try check(dsv3_session_reset(handle, slot))
    }

    /// Keeps the first `length` tokens of `slot`.
    public func truncate(slot: Int = 0, to length: Int) throws {
        try checkSlot(slot)
        guard length >= 0 else {
            throw invalidArgument("length must be >= 0, got \(length)")
        }
        try check(dsv3_session_truncate(handle, slot, length))
    }

    /// size_t arguments come from Int: reject negative values before they wrap around in C.
    private func checkSlot(_ slot: Int) throws {
        guard slot >= 0 else {
            throw invalidArgument("slot must be >= 0, got \(slot)")
        }
    }
}
