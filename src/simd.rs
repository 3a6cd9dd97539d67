//! Kernels compiled twice: for AVX2 with FMA, chosen at run time when the CPU has them,
//! and for the crate's baseline otherwise.

/// Defines `fn $name` that runs its body compiled for AVX2 and FMA when the CPU has
/// them, and for the crate's baseline (SSE2 on x86-64) otherwise: the hot loops then
/// use vectors twice as wide. The body and the `#[inline(always)]` helpers it calls are
/// inlined into each variant.
macro_rules! simd_kernel {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn kernel($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    kernel($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            kernel($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;
