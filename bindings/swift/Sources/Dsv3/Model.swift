// Models: loading (options, progress callback), info, config, generation.

/// How to load a model (dsv3_model_params).
public struct ModelOptions {
    /// 0 = CPU; 1 + N = CUDA GPU N (throws DSV3_ERR_UNSUPPORTED without a driver or GPU).
    public var device: Int32
    /// 0 = f32; 1 = bf16 (GPU only).
    public var dtype: Int32
    /// false = keep FP8 checkpoint weights as FP8 + block scales; true = dequantize to f32 at load.
    public var dequantizeFP8: Bool
    /// false = absorbed MLA (the default); true = naive MLA. Same results.
    public var naiveAttention: Bool
    /// Called during loading with the fraction done in [0, 1], on the loading thread. Return
    /// false to cancel: the load then throws DSV3_ERR_CANCELLED.
    public var progress: ((Float) -> Bool)?

    public init(device: Int32 = 0, dtype: Int32 = 0, dequantizeFP8: Bool = false, naiveAttention: Bool = false,
                progress: ((Float) -> Bool)? = nil) {
        self.device = device
        self.dtype = dtype
        self.dequantizeFP8 = dequantizeFP8
        self.naiveAttention = naiveAttention
        self.progress = progress
    }
}

/// A model's figures (dsv3_model_info).
public struct ModelInfo {
    public let vocabSize: Int
    public let hiddenSize: Int
    public let numLayers: Int
    public let numAttentionHeads: Int
    /// Routed experts per MoE layer (0 for a dense model).
    public let numExperts: Int
    public let expertsPerToken: Int
    /// MTP modules loaded.
    public let numMTPModules: Int
    public let paramsTotal: UInt64
    /// Parameters used per token.
    public let paramsActive: UInt64
    /// Latent KV cache per token over all layers, in f32 bytes.
    public let kvCacheBytesPerToken: UInt64
    /// The BOS token id, if the model has one.
    public let bosTokenID: Int32?
    /// The first EOS token id, if the model has one.
    public let eosTokenID: Int32?

    init(_ raw: dsv3_model_info) {
        vocabSize = Int(raw.vocab_size)
        hiddenSize = Int(raw.hidden_size)
        numLayers = Int(raw.num_layers)
        numAttentionHeads = Int(raw.num_attention_heads)
        numExperts = Int(raw.num_experts)
        expertsPerToken = Int(raw.experts_per_token)
        numMTPModules = Int(raw.num_mtp_modules)
        paramsTotal = raw.params_total
        paramsActive = raw.params_active
        kvCacheBytesPerToken = raw.kv_cache_bytes_per_token
        bosTokenID = raw.bos_token_id < 0 ? nil : Int32(truncatingIfNeeded: raw.bos_token_id)
        eosTokenID = raw.eos_token_id < 0 ? nil : Int32(truncatingIfNeeded: raw.eos_token_id)
    }
}

/// Sampling settings (dsv3_sampling_params). `SamplingParams()` has the C defaults: greedy,
/// 64 new tokens, no stop tokens.
public struct SamplingParams {
    /// 0 = greedy.
    public var temperature: Float
    /// 0 = off.
    public var topK: Int
    /// 1 = off; in (0, 1].
    public var topP: Float
    public var seed: UInt64
    public var maxNewTokens: Int
    /// Tokens that end generation (the stop token is included in the output).
    public var stopTokens: [Int32]

    public init() {
        var raw = dsv3_sampling_params()
        _ = dsv3_sampling_params_default(&raw)
        temperature = raw.temperature
        topK = Int(raw.top_k)
        topP = raw.top_p
        seed = raw.seed
        maxNewTokens = Int(raw.max_new_tokens)
        stopTokens = []
    }

    /// The C struct, stop tokens not set (they need a pointer that lives through the call).
    func makeRaw() throws -> dsv3_sampling_params {
        guard let k = UInt32(exactly: topK) else {
            throw invalidArgument("topK must be in [0, 2^32), got \(topK)")
        }
        guard let maxNew = UInt32(exactly: maxNewTokens) else {
            throw invalidArgument("maxNewTokens must be in [0, 2^32), got \(maxNewTokens)")
        }
        var raw = dsv3_sampling_params()
        try check(dsv3_sampling_params_default(&raw))
        raw.temperature = temperature
        raw.top_k = k
        raw.top_p = topP
        raw.seed = seed
        raw.max_new_tokens = maxNew
        return raw
    }
}

/// A loaded model (dsv3_model). Immutable: share it across threads, sessions and trainers.
public final class Model {
    /// The C handle, owned by this object (freed in deinit).
    public let handle: OpaquePointer

    /// Takes ownership of a handle from dsv3_model_load or dsv3_trainer_model.
    init(owning handle: OpaquePointer) {
        self.handle = handle
    }

    /// Loads the model in directory `path` (config.json + safetensors, HF layout).
    public convenience init(path: String, options: ModelOptions = ModelOptions()) throws {
        var params = dsv3_model_params()
        try check(dsv3_model_params_default(&params))
        params.device = options.device
        params.dtype = options.dtype
        params.dequantize_fp8 = options.dequantizeFP8 ? 1 : 0
        params.attention = options.naiveAttention ? 1 : 0
        var out: OpaquePointer? = nil
        if let progress = options.progress {
            let box = Unmanaged.passRetained(ProgressCallback(progress))
            defer { box.release() }
            params.progress = progressTrampoline
            params.user_data = box.toOpaque()
            try check(dsv3_model_load(path, &params, &out))
        } else {
            try check(dsv3_model_load(path, &params, &out))
        }
        let handle = try unwrap(out, "dsv3_model_load")
        self.init(owning: handle)
    }

    deinit {
        dsv3_model_free(handle)
    }

    /// The model's figures.
    public var info: ModelInfo {
        var raw = dsv3_model_info()
        // stride, not size: C's sizeof includes the tail padding.
        raw.struct_size = MemoryLayout<dsv3_model_info>.stride
        let status = dsv3_model_get_info(handle, &raw)
        precondition(status == DSV3_OK, "dsv3_model_get_info: \(String(cString: dsv3_last_error()))")
        return ModelInfo(raw)
    }

    /// The model's config as JSON.
    public func configJSON() throws -> String {
        var needed = 0
        let first = dsv3_model_config_json(handle, nil, 0, &needed)
        if first != DSV3_ERR_BUFFER_TOO_SMALL {
            try check(first)
        }
        var buf = [CChar](repeating: 0, count: needed)
        let h = handle
        let status = buf.withUnsafeMutableBufferPointer { b in
            dsv3_model_config_json(h, b.baseAddress, b.count, &needed)
        }
        try check(status)
        return stringFromCBuffer(buf, count: needed)
    }

    /// Generates a continuation of `prompt` (at least one id) and returns the generated ids.
    /// `onToken` (optional) sees each token as it is generated, on the calling thread; returning
    /// false stops generation after that token (the call still succeeds, with the tokens so far).
    public func generate(prompt: [Int32], params: SamplingParams = SamplingParams(),
                         onToken: ((Int32) -> Bool)? = nil) throws -> [Int32] {
        var raw = try params.makeRaw()
        var out = [Int32](repeating: 0, count: Int(raw.max_new_tokens))
        var count = 0
        let box: Unmanaged<TokenCallback>? = onToken.map { Unmanaged.passRetained(TokenCallback($0)) }
        defer { box?.release() }
        let callback: dsv3_token_fn? = box == nil ? nil : tokenTrampoline
        let userData: UnsafeMutableRawPointer? = box?.toOpaque()
        let h = handle
        let status = params.stopTokens.withUnsafeBufferPointer { (stops: UnsafeBufferPointer<Int32>) -> dsv3_status in
            raw.stop_tokens = stops.baseAddress
            raw.n_stop_tokens = stops.count
            return prompt.withUnsafeBufferPointer { p in
                out.withUnsafeMutableBufferPointer { o in
                    dsv3_generate(h, p.baseAddress, p.count, &raw, callback, userData, o.baseAddress, o.count, &count)
                }
            }
        }
        try check(status)
        return Array(out.prefix(count))
    }
}

/// The string in a NUL-terminated C buffer of which `count` bytes (the NUL included) are used.
func stringFromCBuffer(_ buf: [CChar], count: Int) -> String {
    let n = max(0, min(count, buf.count) - 1)
    // CChar is Int8 or UInt8 depending on the platform: convert bit for bit.
    let bytes = buf[0..<n].map { UInt8(truncatingIfNeeded: $0) }
    return String(decoding: bytes, as: UTF8.self)
}
