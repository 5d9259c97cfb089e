//! Status codes, the thread-local last-error message, and the wrapper every entry point uses.
use dsv3_core::Error;
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Result of every fallible call. The numeric values are stable.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum dsv3_status {
    /// Success.
    DSV3_OK = 0,
    /// A required pointer argument was NULL.
    DSV3_ERR_NULL_ARGUMENT = 1,
    /// An argument is out of range or malformed (bad enum value, token id, shape, UTF-8).
    DSV3_ERR_INVALID_ARGUMENT = 2,
    /// A file could not be read or written.
    DSV3_ERR_IO = 3,
    /// config.json is malformed or inconsistent.
    DSV3_ERR_CONFIG = 4,
    /// A weight file or tensor is malformed, missing or of the wrong dtype or shape.
    DSV3_ERR_WEIGHTS = 5,
    /// A NaN or infinity appeared where a finite value is needed.
    DSV3_ERR_NON_FINITE = 6,
    /// The operation or device is not supported by this build.
    DSV3_ERR_UNSUPPORTED = 7,
    /// A callback asked to stop.
    DSV3_ERR_CANCELLED = 8,
    /// An output buffer is too small; the needed size was written.
    DSV3_ERR_BUFFER_TOO_SMALL = 9,
    /// An internal error (a bug): a panic was caught at the ABI boundary.
    DSV3_ERR_INTERNAL = 10,
}

pub use dsv3_status::*;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The message of the last failed call on this thread ("" if none). Valid until the next dsv3
/// call on the same thread; do not free.
#[no_mangle]
pub extern "C" fn dsv3_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The failure of a call: its status and message.
pub(crate) struct Fail(pub dsv3_status, pub String);

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let code = match &e {
            Error::Config { .. } => DSV3_ERR_CONFIG,
            Error::Weights { .. } => DSV3_ERR_WEIGHTS,
            Error::Input(_) => DSV3_ERR_INVALID_ARGUMENT,
            Error::Io(_) => DSV3_ERR_IO,
            Error::NonFinite(_) => DSV3_ERR_NON_FINITE,
            Error::Unsupported(_) => DSV3_ERR_UNSUPPORTED,
            Error::Cancelled(_) => DSV3_ERR_CANCELLED,
        };
        Fail(code, e.to_string())
    }
}

/// An invalid-argument failure.
pub(crate) fn invalid(msg: impl Into<String>) -> Fail {
    Fail(DSV3_ERR_INVALID_ARGUMENT, msg.into())
}

/// Runs `f`, turning failures and panics into a status and the thread's last error.
pub(crate) fn guard(name: &str, f: impl FnOnce() -> Result<(), Fail>) -> dsv3_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            DSV3_OK
        }
        Ok(Err(Fail(code, msg))) => {
            set_error(&format!("{name}: {msg}"));
            code
        }
        Err(p) => {
            let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            set_error(&format!("{name}: internal error (please report): {}", what.unwrap_or_default()));
            DSV3_ERR_INTERNAL
        }
    }
}

/// A non-NULL pointer, or a NULL-argument failure naming it.
pub(crate) fn nonnull<'a, T>(p: *const T, what: &str) -> Result<&'a T, Fail> {
    // SAFETY: the caller promises p is NULL or valid for reads (header contract).
    unsafe { p.as_ref() }.ok_or_else(|| Fail(DSV3_ERR_NULL_ARGUMENT, format!("{what} is NULL")))
}

/// A non-NULL mutable pointer.
pub(crate) fn nonnull_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Fail> {
    // SAFETY: as above, for writes.
    unsafe { p.as_mut() }.ok_or_else(|| Fail(DSV3_ERR_NULL_ARGUMENT, format!("{what} is NULL")))
}

/// A slice from a pointer and length (NULL allowed when `len` is 0).
pub(crate) fn slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T], Fail> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Fail(DSV3_ERR_NULL_ARGUMENT, format!("{what} is NULL but its length is {len}")));
    }
    // SAFETY: the caller promises p points to len readable elements.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// A mutable slice from a pointer and length (NULL allowed when `len` is 0).
pub(crate) fn slice_mut<'a, T>(p: *mut T, len: usize, what: &str) -> Result<&'a mut [T], Fail> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(Fail(DSV3_ERR_NULL_ARGUMENT, format!("{what} is NULL but its length is {len}")));
    }
    // SAFETY: the caller promises p points to len writable elements.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// A UTF-8 string from a NUL-terminated C string.
pub(crate) fn cstr<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(Fail(DSV3_ERR_NULL_ARGUMENT, format!("{what} is NULL")));
    }
    // SAFETY: the caller promises a NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(p) }.to_str().map_err(|_| invalid(format!("{what} is not valid UTF-8")))
}

/// Copies `src` into the caller's buffer `(dst, cap)`, always writing the needed length to
/// `needed` (if non-NULL); fails with DSV3_ERR_BUFFER_TOO_SMALL when it does not fit.
pub(crate) fn fill<T: Copy>(src: &[T], dst: *mut T, cap: usize, needed: *mut usize, what: &str) -> Result<(), Fail> {
    if let Some(n) = unsafe { needed.as_mut() } {
        *n = src.len();
    }
    if src.len() > cap {
        return Err(Fail(
            DSV3_ERR_BUFFER_TOO_SMALL,
            format!("{what} needs {} elements, the buffer holds {cap}", src.len()),
        ));
    }
    slice_mut(dst, src.len(), what)?.copy_from_slice(src);
    Ok(())
}

/// Writes a string (NUL-terminated) into `(dst, cap)` bytes; `needed` gets the byte length
/// including the NUL.
pub(crate) fn fill_str(s: &str, dst: *mut c_char, cap: usize, needed: *mut usize, what: &str) -> Result<(), Fail> {
    let mut bytes: Vec<c_char> = s.bytes().map(|b| b as c_char).collect();
    bytes.push(0);
    fill(&bytes, dst, cap, needed, what)
}

/// Validates `struct_size` of a parameter struct: at least the size of the first ABI version.
pub(crate) fn check_size(size: usize, min: usize, what: &str) -> Result<(), Fail> {
    if size < min {
        return Err(invalid(format!(
            "{what}.struct_size is {size}, expected at least {min} (call {what}_default first)"
        )));
    }
    Ok(())
}

/// Frees a handle made by `Box::into_raw` (NULL is a no-op), never unwinding.
pub(crate) fn free_handle<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: p came from Box::into_raw of this type (header contract: freed once).
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(p) })));
    }
}
