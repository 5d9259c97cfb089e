// The Swift binding of dsv3 (a DeepSeek-V3 engine) over its C ABI, include/dsv3.h.
//
// Every type here owns one C handle and frees it in deinit. Failed calls throw a Dsv3Error with
// the C status and dsv3_last_error()'s message. Thread safety follows the C API: a Model may be
// shared by any number of threads; a Session, Tokenizer, Trainer or Grpo is used by one thread at
// a time.
//
// The C module is re-exported, so `import Dsv3` also gives the status constants
// (DSV3_ERR_IO, ...) to compare with Dsv3Error.status.
@_exported import CDsv3

/// A failed dsv3 call: the C status and the message of dsv3_last_error().
public struct Dsv3Error: Error, CustomStringConvertible {
    /// The C status, e.g. DSV3_ERR_IO.
    public let status: dsv3_status
    /// What went wrong (the function name, then the cause).
    public let message: String

    public init(status: dsv3_status, message: String) {
        self.status = status
        self.message = message
    }

    public var description: String {
        return "dsv3 error \(status.rawValue): \(message)"
    }
}

/// Throws a Dsv3Error unless `status` is DSV3_OK. Call it right after the C call, on the same
/// thread: the message is thread-local and only valid until the next dsv3 call.
func check(_ status: dsv3_status) throws {
    if status != DSV3_OK {
        throw Dsv3Error(status: status, message: String(cString: dsv3_last_error()))
    }
}

/// An invalid-argument error raised by the Swift side before calling C (e.g. a shape mismatch
/// that would make C read past the end of an array).
func invalidArgument(_ message: String) -> Dsv3Error {
    return Dsv3Error(status: DSV3_ERR_INVALID_ARGUMENT, message: message)
}

/// The handle a successful C constructor wrote to its out-parameter.
func unwrap(_ handle: OpaquePointer?, _ function: String) throws -> OpaquePointer {
    guard let handle = handle else {
        throw Dsv3Error(status: DSV3_ERR_INTERNAL, message: "\(function) succeeded but returned no handle")
    }
    return handle
}

/// The library's version and ABI.
public enum Dsv3Library {
    /// The library version, e.g. "0.1.0" (dsv3_version()).
    public static var version: String {
        return String(cString: dsv3_version())
    }

    /// The ABI version of the loaded library (dsv3_abi_version()).
    public static var abiVersion: UInt32 {
        return dsv3_abi_version()
    }

    /// The ABI version of the header this binding was compiled against (DSV3_ABI_VERSION).
    public static var headerABIVersion: UInt32 {
        return UInt32(DSV3_ABI_VERSION)
    }
}

/// A Swift closure passed to C as `user_data` (an Unmanaged box) for dsv3_progress_fn.
final class ProgressCallback {
    let body: (Float) -> Bool
    init(_ body: @escaping (Float) -> Bool) {
        self.body = body
    }
}

/// A Swift closure passed to C as `user_data` (an Unmanaged box) for dsv3_token_fn.
final class TokenCallback {
    let body: (Int32) -> Bool
    init(_ body: @escaping (Int32) -> Bool) {
        self.body = body
    }
}

/// The C progress callback: unboxes the closure (0 = continue, 1 = cancel).
let progressTrampoline: dsv3_progress_fn = { userData, fraction in
    guard let userData = userData else { return 0 }
    let callback = Unmanaged<ProgressCallback>.fromOpaque(userData).takeUnretainedValue()
    return callback.body(fraction) ? 0 : 1
}

/// The C token callback: unboxes the closure (0 = continue, 1 = stop).
let tokenTrampoline: dsv3_token_fn = { userData, token in
    guard let userData = userData else { return 0 }
    let callback = Unmanaged<TokenCallback>.fromOpaque(userData).takeUnretainedValue()
    return callback.body(token) ? 0 : 1
}
