// Tokenizers: a HF tokenizer.json, or a model's own tokenizer.

/// A tokenizer (dsv3_tokenizer). Use it from one thread at a time.
public final class Tokenizer {
    /// The C handle, owned by this object (freed in deinit).
    public let handle: OpaquePointer

    init(owning handle: OpaquePointer) {
        self.handle = handle
    }

    /// Loads a HF `tokenizer.json`.
    public convenience init(path: String) throws {
        var out: OpaquePointer? = nil
        try check(dsv3_tokenizer_load(path, &out))
        let handle = try unwrap(out, "dsv3_tokenizer_load")
        self.init(owning: handle)
    }

    /// The tokenizer of a model: the tokenizer.json of its directory, or the built-in byte
    /// tokenizer for a byte-level vocabulary (259 ids). Throws DSV3_ERR_INVALID_ARGUMENT when the
    /// model has neither.
    public convenience init(model: Model) throws {
        var out: OpaquePointer? = nil
        try check(dsv3_tokenizer_for_model(model.handle, &out))
        let handle = try unwrap(out, "dsv3_tokenizer_for_model")
        self.init(owning: handle)
    }

    deinit {
        dsv3_tokenizer_free(handle)
    }

    /// The vocabulary size, added tokens included.
    public var vocabSize: Int {
        var n = 0
        let status = dsv3_tokenizer_vocab_size(handle, &n)
        precondition(status == DSV3_OK, "dsv3_tokenizer_vocab_size: \(String(cString: dsv3_last_error()))")
        return n
    }

    /// The ids of `text`; `addSpecial` adds the tokenizer's special tokens (e.g. BOS).
    public func encode(_ text: String, addSpecial: Bool = true) throws -> [Int32] {
        let special: Int32 = addSpecial ? 1 : 0
        var needed = 0
        // A first guess that fits most texts; on DSV3_ERR_BUFFER_TOO_SMALL, once more at the
        // size the library asked for.
        var ids = [Int32](repeating: 0, count: text.utf8.count + 8)
        var status = encodeInto(text, special, &ids, &needed)
        if status == DSV3_ERR_BUFFER_TOO_SMALL {
            ids = [Int32](repeating: 0, count: needed)
            status = encodeInto(text, special, &ids, &needed)
        }
        try check(status)
        return Array(ids.prefix(needed))
    }

    /// The text of `ids`; `skipSpecial` drops special tokens.
    public func decode(_ ids: [Int32], skipSpecial: Bool = true) throws -> String {
        let skip: Int32 = skipSpecial ? 1 : 0
        var needed = 0
        var buf = [CChar](repeating: 0, count: 4 * ids.count + 16)
        var status = decodeInto(ids, skip, &buf, &needed)
        if status == DSV3_ERR_BUFFER_TOO_SMALL {
            buf = [CChar](repeating: 0, count: needed)
            status = decodeInto(ids, skip, &buf, &needed)
        }
        try check(status)
        return stringFromCBuffer(buf, count: needed)
    }

    /// The id of a token string (e.g. "<｜end▁of▁sentence｜>"); throws DSV3_ERR_INVALID_ARGUMENT
    /// if the vocabulary has no such token.
    public func tokenID(_ token: String) throws -> Int32 {
        var id: Int32 = 0
        try check(dsv3_tokenizer_token_to_id(handle, token, &id))
        return id
    }

    private func encodeInto(_ text: String, _ special: Int32, _ ids: inout [Int32],
                            _ needed: inout Int) -> dsv3_status {
        let h = handle
        return ids.withUnsafeMutableBufferPointer { b in
            dsv3_tokenizer_encode(h, text, special, b.baseAddress, b.count, &needed)
        }
    }

    private func decodeInto(_ ids: [Int32], _ skip: Int32, _ buf: inout [CChar],
                            _ needed: inout Int) -> dsv3_status {
        let h = handle
        return ids.withUnsafeBufferPointer { p in
            buf.withUnsafeMutableBufferPointer { b in
                dsv3_tokenizer_decode(h, p.baseAddress, p.count, skip, b.baseAddress, b.count, &needed)
            }
        }
    }
}
