//! Which instruction set the kernels run on, chosen once at run time.
//!
//! Every hot kernel is compiled three times — for AVX-512 (F, BW, DQ, VL, with F16C, FMA and
//! AVX2), for AVX2 with FMA and F16C, and for the baseline of the target (SSE2 on x86-64, NEON on
//! aarch64, through `wide`) — and each call runs the variant chosen here. The choice is made on
//! first use from the CPU's features (`is_x86_feature_detected!`), so one binary runs at full
//! speed on the machine that built it and correctly on any other x86-64: nothing depends on
//! `-C target-cpu`.
//!
//! `MAMBA_SIMD=avx512|avx2|portable` overrides the choice (for tests and diagnosis); [`set`] does
//! the same from code. Asking for an instruction set the CPU lacks is an error, never a crash.
//!
//! Inside the crate, [`simd_fn!`](crate::simd_fn) defines a kernel function whose body is
//! compiled once per level, inside a `#[target_feature]` function, and runs the active level's.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::simd::{V8, V16};

/// An instruction-set level the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The target's baseline: `wide`'s vectors as the compiler's target features allow (SSE2 on
    /// x86-64, NEON on aarch64), `a·b + c` not fused.
    Portable,
    /// AVX2 with FMA and F16C: 8-lane registers, fused multiply-add.
    Avx2,
    /// AVX-512 (F, BW, DQ, VL) on top of AVX2: 16-lane registers where a kernel uses 16 lanes.
    Avx512,
}

impl Isa {
    /// Every level, slowest first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// The name `MAMBA_SIMD` takes and [`fmt::Display`] prints.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the level.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest level this CPU runs.
    pub fn best() -> Isa {
        Isa::ALL.into_iter().rev().find(|l| l.supported()).unwrap_or(Isa::Portable)
    }

    /// The levels this CPU runs, slowest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|l| l.supported()).collect()
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Isa {
        Isa::ALL[usize::from(c - 1)]
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isa {
    type Err = IsaError;

    fn from_str(s: &str) -> Result<Isa, IsaError> {
        Isa::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| IsaError::Unknown(s.to_string()))
    }
}

/// Why a requested instruction set cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IsaError {
    /// The name is none of `avx512`, `avx2`, `portable`.
    Unknown(String),
    /// The CPU lacks the level's features.
    Unsupported {
        /// The level asked for.
        wanted: Isa,
        /// The fastest level this CPU runs.
        best: Isa,
    },
}

impl fmt::Display for IsaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IsaError::Unknown(s) => {
                write!(f, "MAMBA_SIMD={s:?} is not an instruction set; use avx512, avx2 or portable")
            }
            IsaError::Unsupported { wanted, best } => write!(
                f,
                "MAMBA_SIMD={wanted}: this CPU does not have {wanted} (the fastest it runs is {best}; \
                 available: {})",
                Isa::available().iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

impl std::error::Error for IsaError {}

/// The environment variable that overrides the detected level.
pub const ENV: &str = "MAMBA_SIMD";

/// 0 until the first [`active`] or [`set`]; then [`Isa::code`].
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// The level `MAMBA_SIMD` asks for (`Ok(None)` when unset or empty), checked against this CPU.
pub fn from_env() -> Result<Option<Isa>, IsaError> {
    match std::env::var(ENV) {
        Ok(s) if !s.trim().is_empty() => {
            let wanted: Isa = s.parse()?;
            if wanted.supported() {
                Ok(Some(wanted))
            } else {
                Err(IsaError::Unsupported { wanted, best: Isa::best() })
            }
        }
        _ => Ok(None),
    }
}

/// The level the kernels run on: the one given to [`set`], else `MAMBA_SIMD`, else
/// [`Isa::best`]. Read once and then cached; costs one relaxed atomic load.
///
/// # Panics
/// On first use, when `MAMBA_SIMD` names an unknown level or one this CPU lacks (running it
/// would be an illegal instruction). Programs that want an error instead call [`from_env`] or
/// [`init`] at start-up, as the `mamba` binary does.
#[inline]
pub fn active() -> Isa {
    match ACTIVE.load(Ordering::Relaxed) {
        0 => init().unwrap_or_else(|e| panic!("{e}")),
        c => Isa::from_code(c),
    }
}

/// Chooses the level from `MAMBA_SIMD` or the CPU (unless [`set`] already chose one) and returns
/// it.
pub fn init() -> Result<Isa, IsaError> {
    if let c @ 1.. = ACTIVE.load(Ordering::Relaxed) {
        return Ok(Isa::from_code(c));
    }
    let isa = from_env()?.unwrap_or_else(Isa::best);
    ACTIVE.store(isa.code(), Ordering::Relaxed);
    Ok(isa)
}

/// Makes the kernels run `isa` from now on. For tests and diagnosis: kernels choose the level
/// per task, so one already running may run its remaining tasks on the new level (its results
/// then differ from either level's only by rounding).
pub fn set(isa: Isa) -> Result<(), IsaError> {
    if !isa.supported() {
        return Err(IsaError::Unsupported { wanted: isa, best: Isa::best() });
    }
    ACTIVE.store(isa.code(), Ordering::Relaxed);
    Ok(())
}

/// Whether this CPU has the AVX-512 BF16 dot product (`vdpbf16ps`) on top of [`Isa::Avx512`].
pub fn bf16_dot_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::Avx512.supported() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether bf16 weight matrices are multiplied with the AVX-512 BF16 dot product: the active
/// level is [`Isa::Avx512`] and the CPU has it ([`bf16_dot_supported`]). That kernel rounds the
/// activations to bf16 too (see [`crate::qweight`]); `MAMBA_SIMD=avx2` keeps them f32.
pub fn bf16_dot() -> bool {
    active() == Isa::Avx512 && bf16_dot_supported()
}

/// A backend: the vector types of one [`Isa`]. Kernels are generic
/// over it and instantiated once per level by [`simd_fn!`](crate::simd_fn).
pub trait Simd: Copy + Send + Sync + 'static {
    /// 8 lanes of f32.
    type F8: V8;
    /// 16 lanes of f32.
    type F16: V16;
}

/// The [`Isa::Portable`] backend: `wide`'s vectors.
#[derive(Clone, Copy, Debug)]
pub struct Portable;

impl Simd for Portable {
    type F8 = wide::f32x8;
    type F16 = wide::f32x16;
}

/// The [`Isa::Avx2`] backend. Its values exist only inside code that
/// [`simd_fn!`](crate::simd_fn) runs after checking the CPU.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx2 {
    type F8 = crate::simd::avx::A8;
    type F16 = crate::simd::avx::A16;
}

/// The [`Isa::Avx512`] backend: AVX2's 8-lane type and one 512-bit register for 16 lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx512 {
    type F8 = crate::simd::avx::A8;
    type F16 = crate::simd::avx512::Z16;
}

/// Runs `f` inside a function compiled for AVX2 + FMA + F16C. Only what LLVM inlines into it is
/// compiled for those features (a small closure calling `#[inline(always)]` code); kernels use
/// [`simd_fn!`](crate::simd_fn), which puts their whole body in such a function.
///
/// # Safety
/// The CPU must support [`Isa::Avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt")]
#[inline]
pub unsafe fn in_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// [`in_avx2`] for AVX-512.
///
/// # Safety
/// The CPU must support [`Isa::Avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512dq,avx512vl")]
#[inline]
pub unsafe fn in_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Defines a function whose body is compiled once per instruction-set level — each copy inside
/// a `#[target_feature]` function, with the type name in brackets bound to that level's vector
/// type (`f8`, `f16`) or backend (`isa`) — and which runs the copy of the active level:
///
/// ```ignore
/// simd_fn! {
///     /// Docs.
///     pub(crate) fn row_task[V: f8](x: &[f32], out: &mut [f32]) -> f32 { … V::load(x) … }
/// }
/// ```
///
/// The body's `#[inline(always)]` callees (the generic kernel code and the intrinsics under the
/// vector types) are compiled into each copy; anything else it calls is compiled for the
/// baseline. A closure handed to another thread (a rayon task) is compiled for the baseline
/// whatever encloses it, so parallel kernels call such a function inside each task. Parameters
/// are plain `name: Type` (no patterns, no generics).
#[macro_export]
#[doc(hidden)]
macro_rules! simd_fn {
    (@ty $v:ident f8 $b:ty) => {
        #[allow(dead_code)]
        type $v = <$b as $crate::isa::Simd>::F8;
    };
    (@ty $v:ident f16 $b:ty) => {
        #[allow(dead_code)]
        type $v = <$b as $crate::isa::Simd>::F16;
    };
    (@ty $v:ident isa $b:ty) => {
        #[allow(dead_code)]
        type $v = $b;
    };
    (
        $(#[$m:meta])*
        $vis:vis fn $name:ident [$v:ident : $kind:ident] ($($p:ident : $t:ty),* $(,)?) $(-> $r:ty)? $body:block
    ) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($p: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(
                enable = "avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512dq,avx512vl"
            )]
            #[allow(clippy::too_many_arguments)]
            fn avx512($($p: $t),*) $(-> $r)? {
                $crate::simd_fn!(@ty $v $kind $crate::isa::Avx512);
                $body
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt")]
            #[allow(clippy::too_many_arguments)]
            fn avx2($($p: $t),*) $(-> $r)? {
                $crate::simd_fn!(@ty $v $kind $crate::isa::Avx2);
                $body
            }
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn portable($($p: $t),*) $(-> $r)? {
                $crate::simd_fn!(@ty $v $kind $crate::isa::Portable);
                $body
            }
            match $crate::isa::active() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `active` returns only levels the CPU supports.
                $crate::isa::Isa::Avx512 => unsafe { avx512($($p),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                $crate::isa::Isa::Avx2 => unsafe { avx2($($p),*) },
                _ => portable($($p),*),
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for l in Isa::ALL {
            assert_eq!(l.name().parse::<Isa>().unwrap(), l);
        }
        assert_eq!("AVX2".parse::<Isa>().unwrap(), Isa::Avx2);
        let e = "sse9".parse::<Isa>().unwrap_err();
        assert!(e.to_string().contains("avx512, avx2 or portable"), "{e}");
    }

    /// `.ci/run` runs the unit tests once per level through `MAMBA_SIMD`: this checks the
    /// kernels really run the level asked for.
    #[test]
    fn the_environment_chooses_the_level() {
        match from_env().unwrap() {
            Some(l) => assert_eq!(active(), l),
            None => assert_eq!(active(), Isa::best()),
        }
    }

    #[test]
    fn best_is_supported_and_portable_always_is() {
        assert!(Isa::Portable.supported());
        assert!(Isa::best().supported());
        assert!(Isa::available().contains(&Isa::best()));
    }
}
