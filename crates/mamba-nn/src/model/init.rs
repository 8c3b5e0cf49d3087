//! The random generator behind the reference initialisation (`mamba_simple.py`, `mamba2.py`,
//! `mixer_seq_simple.py::_init_weights`); each layer states its own init through
//! [`Init`](super::builder::Init).

use ssm_kernel::rng::SplitMix64;

/// The workspace's [`SplitMix64`] with uniform and normal draws, seeded apart from the data and
/// sampling streams.
#[derive(Clone, Debug)]
pub struct InitRng(SplitMix64);

impl InitRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed ^ 0x5DEE_CE66_D1CE_4E5B))
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::MambaConfig;
    use crate::model::MambaLM;
    use crate::tensor::data;

    #[test]
    fn dt_bias_inverts_softplus_into_the_range() {
        let s = MambaLM::new(MambaConfig::mamba1(16, 32, 2), 1).unwrap().params;
        let b = data(s.value(s.id("backbone.layers.1.mixer.dt_proj.bias").unwrap()));
        for &v in b {
            let dt = (v as f64).exp().ln_1p();
            assert!((1e-3 * 0.999..=1e-1 * 1.001).contains(&dt), "softplus(bias) = {dt}");
        }
        let a = data(s.value(s.id("backbone.layers.0.mixer.A_log").unwrap()));
        assert_eq!(&a[..3], &[0.0, 2f32.ln(), 3f32.ln()]);
        let p = s.get(s.id("backbone.layers.0.mixer.A_log").unwrap());
        assert!(!p.decay, "no weight decay on A_log");
        assert!(s.get(s.id("backbone.layers.0.mixer.in_proj.weight").unwrap()).decay);
        assert!(!s.get(s.id("backbone.layers.0.mixer.dt_proj.bias").unwrap()).decay);
    }

    #[test]
    fn embedding_std_and_out_proj_rescale() {
        let s = MambaLM::new(MambaConfig::mamba1(512, 64, 4), 7).unwrap().params;
        let e = data(s.value(s.id("backbone.embeddings.weight").unwrap()));
        let std = (e.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / e.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.001, "embedding std {std}");
        let w = data(s.value(s.id("backbone.layers.0.mixer.out_proj.weight").unwrap()));
        let bound = 1.0 / (128f32).sqrt() / 2.0; // 1/√fan_in / √n_layer
        let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max <= bound && max > 0.9 * bound, "out_proj max {max}, bound {bound}");
    }
}
