//! Argument checks shared by every kernel.
//!
//! A slice whose length does not match the dims is a programming error in the caller, so it
//! panics (with `#[track_caller]`, pointing at the caller) with a message naming the kernel, the
//! argument, its layout and both lengths.

/// Panics unless `got == expected`.
///
/// Message: ``"{kernel}: `{arg}` has {got} elements, but its layout {layout} needs {expected}"``.
#[track_caller]
#[inline]
pub fn check_len(kernel: &str, arg: &str, layout: &str, got: usize, expected: usize) {
    if got != expected {
        panic!("{kernel}: `{arg}` has {got} elements, but its layout {layout} needs {expected}");
    }
}

/// [`check_len`] for an optional argument (nothing to check when absent).
#[track_caller]
#[inline]
pub fn check_opt_len<T>(kernel: &str, arg: &str, layout: &str, s: Option<&[T]>, expected: usize) {
    if let Some(s) = s {
        check_len(kernel, arg, layout, s.len(), expected);
    }
}

/// Panics with a message naming the kernel when a dims invariant does not hold.
#[track_caller]
#[inline]
pub fn check_dims(kernel: &str, ok: bool, what: &str) {
    if !ok {
        panic!("{kernel}: invalid dims: {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "k: `u` has 3 elements, but its layout (B, L, D) = (1, 2, 2) needs 4")]
    fn message_names_argument_and_lengths() {
        check_len("k", "u", "(B, L, D) = (1, 2, 2)", 3, 4);
    }
}
