//! The naive LTI recurrence in `f64`, the oracle of [`crate::lti`] and of the op on it.

/// `y` (B, L, D) for `x` (B, L, D) and per-channel `a`, `b`, `c`, `d` (D):
/// `h_t = a ⊙ h_{t−1} + b ⊙ x_t` from `h_{−1} = 0`, `y_t = c ⊙ h_t + d ⊙ x_t`.
pub fn lti(x: &[f64], [a, b, c, d]: [&[f64]; 4], (bsz, l, dim): (usize, usize, usize)) -> Vec<f64> {
    let mut y = vec![0.0; bsz * l * dim];
    for bi in 0..bsz {
        for k in 0..dim {
            let mut h = 0.0;
            for t in 0..l {
                let i = (bi * l + t) * dim + k;
                h = a[k] * h + b[k] * x[i];
                y[i] = c[k] * h + d[k] * x[i];
            }
        }
    }
    y
}
