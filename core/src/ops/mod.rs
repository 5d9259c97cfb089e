//! CPU f32 kernels. Each function documents its shapes; all are the reference the GPU backend
//! is tested against.
/// Defines `fn $name($args)` that runs `$body` (element-wise loops written so that LLVM
/// vectorizes them) compiled for AVX2+FMA when the CPU has it (checked at run time under `std`),
/// and for the build's baseline otherwise. The body is the same code in both, and Rust never
/// contracts `a·b + c` into an FMA, so both give the same bits; only the vector width differs.
macro_rules! avx2_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) {
            #[inline(always)]
            fn body($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($a: $t),*) {
                    body($($a),*)
                }
                if crate::ops::gemm::has_avx2_fma() {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { wide($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}
pub(crate) use avx2_dispatch;

pub mod fastmath;
pub mod gemm;
pub mod loss;
pub mod norm;
pub mod rope;
pub mod softmax;
pub mod swiglu;

/// Maps `f` over `items`, on the rayon pool when `work` (a rough count of multiply-adds) is
/// large enough to pay for the fork; serially otherwise (and always without `std`).
pub fn par_map<T: Sync, R: Send>(items: &[T], work: usize, f: impl Fn(&T) -> R + Sync + Send) -> alloc::vec::Vec<R> {
    #[cfg(feature = "std")]
    {
        if work >= PAR_MIN_WORK && items.len() > 1 && rayon::current_num_threads() > 1 {
            use rayon::prelude::*;
            return items.par_iter().map(f).collect();
        }
    }
    let _ = work;
    items.iter().map(f).collect()
}

/// Multiply-adds below which [`par_map`] stays on the calling thread.
pub const PAR_MIN_WORK: usize = 1 << 18;

/// Sets the number of worker threads (once, before any parallel work).
#[cfg(feature = "std")]
pub fn set_threads(n: usize) -> core::result::Result<(), alloc::string::String> {
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global().map_err(|e| alloc::format!("setting threads: {e}"))
}

/// Worker threads in use (1 without `std`).
pub fn threads() -> usize {
    #[cfg(feature = "std")]
    {
        rayon::current_num_threads()
    }
    #[cfg(not(feature = "std"))]
    {
        1
    }
}
