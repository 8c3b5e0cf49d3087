//! Naive (gated, grouped) RMSNorm in `f64`, the oracle of [`crate::norm`] and of the ops on it.

/// Rows of `x` (rows, d): `v = x · silu(z)` when a gate `z` (rows, d) is given, else `x`; then
/// `y = v · rsqrt(mean_group(v²) + eps) · w` over groups of `group` channels, `w` (d).
pub fn rms_norm(x: &[f64], z: Option<&[f64]>, w: &[f64], d: usize, group: usize, eps: f64) -> Vec<f64> {
    let v: Vec<f64> = match z {
        Some(z) => x.iter().zip(z).map(|(a, g)| a * g / (1.0 + (-g).exp())).collect(),
        None => x.to_vec(),
    };
    let mut y = vec![0.0; x.len()];
    for (row, vr) in v.chunks(d).enumerate() {
        for (g, vg) in vr.chunks(group).enumerate() {
            let r = 1.0 / (vg.iter().map(|a| a * a).sum::<f64>() / group as f64 + eps).sqrt();
            for (j, a) in vg.iter().enumerate() {
                y[row * d + g * group + j] = a * r * w[g * group + j];
            }
        }
    }
    y
}
