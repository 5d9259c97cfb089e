//! The PTX of `kernels/cuda/*.cu`, compiled by `kernels/build_ptx.sh` and embedded: one module per
//! op family, for sm_90a (H100, exact match only) and sm_80 (A100 and newer through the driver's JIT).

/// Which PTX flavour a device loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Hopper (compute capability 9.0 exactly): `.target sm_90a`.
    Sm90a,
    /// Compute capability 8.0 or newer (not 9.0): `.target sm_80`, JIT-compiled by the driver.
    Sm80,
}

impl Arch {
    /// The PTX flavour for compute capability `major.minor`; `None` below 8.0 (no bf16 tensor cores).
    pub fn for_capability(major: i32, minor: i32) -> Option<Arch> {
        match (major, minor) {
            (9, 0) => Some(Arch::Sm90a),
            (m, _) if m >= 8 => Some(Arch::Sm80),
            _ => None,
        }
    }
}

macro_rules! ptx_modules {
    ($($name:literal),* $(,)?) => {
        /// Names of the PTX modules (the `.cu` files).
        pub const MODULES: &[&str] = &[$($name),*];

        /// The PTX text of module `name` for `arch`.
        pub fn source(arch: Arch, name: &str) -> Option<&'static str> {
            match (arch, name) {
                $(
                    (Arch::Sm90a, $name) => Some(include_str!(concat!("../ptx/sm_90a/", $name, ".ptx"))),
                    (Arch::Sm80, $name) => Some(include_str!(concat!("../ptx/sm_80/", $name, ".ptx"))),
                )*
                _ => None,
            }
        }
    };
}

ptx_modules!(
    "attn",
    "attn_train",
    "elementwise",
    "embed",
    "fp8gemm",
    "fp8quant",
    "gemm",
    "gemm_tma",
    "mla",
    "moe",
    "moe_train",
    "optim",
    "rmsnorm",
    "rope",
    "sampling",
    "train"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_is_embedded_for_both_archs_with_its_target() {
        for &m in MODULES {
            let a = source(Arch::Sm90a, m).unwrap();
            let b = source(Arch::Sm80, m).unwrap();
            assert!(a.contains(".target sm_90a"), "{m}");
            assert!(b.contains(".target sm_80"), "{m}");
            // PTX ISA 9.0 is what the CUDA 13.0 driver accepts (newer nvcc emits 9.5)
            assert!(a.contains(".version 9.0") && b.contains(".version 9.0"), "{m}");
        }
        assert!(source(Arch::Sm90a, "nope").is_none());
        assert_eq!(Arch::for_capability(9, 0), Some(Arch::Sm90a));
        assert_eq!(Arch::for_capability(8, 6), Some(Arch::Sm80));
        assert_eq!(Arch::for_capability(10, 0), Some(Arch::Sm80));
        assert_eq!(Arch::for_capability(7, 5), None);
    }

    /// Every kernel a launcher names exists in the PTX of its module (a typo would otherwise
    /// only show on a GPU).
    #[test]
    fn launcher_kernel_names_exist_in_the_ptx() {
        for (m, k) in crate::ops::KERNELS {
            for arch in [Arch::Sm90a, Arch::Sm80] {
                let src = source(arch, m).unwrap_or_else(|| panic!("no module {m}"));
                assert!(src.contains(&format!(".entry {k}(")), "kernel {k} missing from {m} ({arch:?})");
            }
        }
    }
}
