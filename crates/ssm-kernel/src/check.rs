//! Argument checks shared by every kernel.
//!
//! A slice whose length does not match the dims is a programming error in the caller, so it
//! panics (with `#[track_caller]`, pointing at the caller) with a message naming the kernel, the
//! argument, its layout and both lengths. The layout text is built only when a check fails, so
//! checking allocates nothing (a recurrent step runs these checks every token).

use std::fmt::{self, Display};

/// A tensor layout for error messages, formatted only when displayed: names and sizes,
/// e.g. `(B, L, D) = (2, 7, 16)`. At most four dimensions.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    names: &'static str,
    dims: [usize; 4],
    rank: usize,
}

impl Layout {
    /// `names` such as `"(B, L, D)"` and the sizes in the same order.
    ///
    /// # Panics
    /// If there are more than four sizes.
    #[track_caller]
    pub fn new(names: &'static str, sizes: &[usize]) -> Self {
        assert!(sizes.len() <= 4, "Layout: at most four dimensions, got {}", sizes.len());
        let mut dims = [0; 4];
        dims[..sizes.len()].copy_from_slice(sizes);
        Self { names, dims, rank: sizes.len() }
    }
}

impl Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = (", self.names)?;
        for (i, d) in self.dims[..self.rank].iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str(")")
    }
}

/// Panics unless `got == expected`.
///
/// Message: ``"{kernel}: `{arg}` has {got} elements, but its layout {layout} needs {expected}"``.
#[track_caller]
#[inline]
pub fn check_len(kernel: &str, arg: &str, layout: impl Display, got: usize, expected: usize) {
    if got != expected {
        panic!("{kernel}: `{arg}` has {got} elements, but its layout {layout} needs {expected}");
    }
}

/// [`check_len`] for an optional argument (nothing to check when absent).
#[track_caller]
#[inline]
pub fn check_opt_len<T>(kernel: &str, arg: &str, layout: impl Display, s: Option<&[T]>, expected: usize) {
    if let Some(s) = s {
        check_len(kernel, arg, layout, s.len(), expected);
    }
}

/// Panics with a message naming the kernel when a dims invariant does not hold.
#[track_caller]
#[inline]
pub fn check_dims(kernel: &str, ok: bool, what: impl Display) {
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

    #[test]
    #[should_panic(expected = "k: `y` has 5 elements, but its layout (B, C) = (2, 3) needs 6")]
    fn layout_formats_names_and_sizes() {
        check_len("k", "y", Layout::new("(B, C)", &[2, 3]), 5, 6);
    }
}
