//! Parameter initialisation as the reference implementation does it (`mamba_simple.py`,
//! `mamba2.py`, `mixer_seq_simple.py::_init_weights`).

use crate::config::{Arch, MambaConfig};
use crate::params::ParamStore;
use crate::tensor::{Tensor, from_vec};

/// A small deterministic generator (SplitMix64) with uniform and normal draws.
#[derive(Clone, Debug)]
pub struct InitRng(u64);

impl InitRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
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

    fn tensor(&mut self, shape: &[usize], mut f: impl FnMut(&mut Self) -> f64) -> Tensor {
        let n = shape.iter().product();
        from_vec(shape, (0..n).map(|_| f(self) as f32).collect())
    }
}

/// `dt_proj.bias` / `dt_bias`: Δ drawn log-uniform in [dt_min, dt_max], floored, stored as its
/// inverse softplus `dt + ln(−expm1(−dt))` so that `softplus(bias) = dt`.
fn dt_bias(rng: &mut InitRng, n: usize, cfg: &MambaConfig) -> Tensor {
    let (lo, hi) = ((cfg.dt_min as f64).ln(), (cfg.dt_max as f64).ln());
    rng.tensor(&[n], |r| {
        let dt = r.uniform(lo, hi).exp().max(cfg.dt_init_floor as f64);
        dt + (-(-dt).exp_m1()).ln()
    })
}

/// PyTorch's default `Linear`/`Conv1d` init (Kaiming uniform with a = √5): U(±1/√fan_in).
fn kaiming(rng: &mut InitRng, shape: &[usize], fan_in: usize) -> Tensor {
    let b = 1.0 / (fan_in as f64).sqrt();
    rng.tensor(shape, |r| r.uniform(-b, b))
}

/// Weight decay applies to matrices except `A_log`.
fn add(s: &mut ParamStore, name: String, t: Tensor) {
    let decay = t.ndim() >= 2 && !name.ends_with("A_log");
    s.add(name, t, decay);
}

/// Registers every parameter of a language model of `cfg`, initialised from `seed`, under its
/// Hugging Face checkpoint name.
pub fn init_params(cfg: &MambaConfig, seed: u64) -> ParamStore {
    let mut rng = InitRng::new(seed);
    let mut s = ParamStore::new();
    let d = cfg.d_model;
    add(&mut s, "backbone.embeddings.weight".into(), rng.tensor(&[cfg.vocab_size, d], |r| 0.02 * r.normal()));
    init_backbone(cfg, &mut rng, &mut s);
    if !cfg.tie_embeddings {
        add(&mut s, "lm_head.weight".into(), rng.tensor(&[cfg.vocab_size, d], |r| 0.02 * r.normal()));
    }
    s
}

/// Registers the blocks (`backbone.layers.{i}.*`) and `backbone.norm_f.weight`.
pub fn init_backbone(cfg: &MambaConfig, rng: &mut InitRng, s: &mut ParamStore) {
    let (d, di, n, k) = (cfg.d_model, cfg.d_inner(), cfg.d_state, cfg.d_conv);
    let out_scale = 1.0 / (cfg.n_layer as f32).sqrt();
    for i in 0..cfg.n_layer {
        let p = format!("backbone.layers.{i}");
        add(s, format!("{p}.norm.weight"), from_vec(&[d], vec![1.0; d]));
        let m = format!("{p}.mixer");
        add(s, format!("{m}.in_proj.weight"), kaiming(rng, &[cfg.in_proj_dim(), d], d));
        if cfg.bias {
            add(s, format!("{m}.in_proj.bias"), from_vec(&[cfg.in_proj_dim()], vec![0.0; cfg.in_proj_dim()]));
        }
        let cd = cfg.conv_dim();
        if cfg.arch != Arch::Lti {
            add(s, format!("{m}.conv1d.weight"), kaiming(rng, &[cd, 1, k], k));
            if cfg.conv_bias {
                add(s, format!("{m}.conv1d.bias"), kaiming(rng, &[cd], k));
            }
        }
        match cfg.arch {
            Arch::Mamba1 => {
                let r = cfg.dt_rank;
                add(s, format!("{m}.x_proj.weight"), kaiming(rng, &[r + 2 * n, di], di));
                let bound = (r as f64).powf(-0.5);
                add(s, format!("{m}.dt_proj.weight"), rng.tensor(&[di, r], |g| g.uniform(-bound, bound)));
                add(s, format!("{m}.dt_proj.bias"), dt_bias(rng, di, cfg));
                let a_log = (0..di * n).map(|j| ((j % n) as f32 + 1.0).ln()).collect();
                add(s, format!("{m}.A_log"), from_vec(&[di, n], a_log));
                add(s, format!("{m}.D"), from_vec(&[di], vec![1.0; di]));
            }
            Arch::Lti => {
                // Stable decays in (0.5, 0.99); B, C ~ U(±1); D = 1.
                add(s, format!("{m}.lti_A"), rng.tensor(&[di], |g| g.uniform(0.5, 0.99)));
                add(s, format!("{m}.lti_B"), rng.tensor(&[di], |g| g.uniform(-1.0, 1.0)));
                add(s, format!("{m}.lti_C"), rng.tensor(&[di], |g| g.uniform(-1.0, 1.0)));
                add(s, format!("{m}.D"), from_vec(&[di], vec![1.0; di]));
            }
            Arch::Mamba2 => {
                let h = cfg.nheads();
                add(s, format!("{m}.dt_bias"), dt_bias(rng, h, cfg));
                add(s, format!("{m}.A_log"), rng.tensor(&[h], |g| g.uniform(1.0, 16.0).ln()));
                add(s, format!("{m}.D"), from_vec(&[h], vec![1.0; h]));
                add(s, format!("{m}.norm.weight"), from_vec(&[di], vec![1.0; di]));
            }
        }
        // Pre-norm residual rescale: out_proj redrawn, then divided by √n_layer.
        let mut w = kaiming(rng, &[d, di], di);
        w.mapv_inplace(|v| v * out_scale);
        add(s, format!("{m}.out_proj.weight"), w);
        if cfg.bias {
            add(s, format!("{m}.out_proj.bias"), from_vec(&[d], vec![0.0; d]));
        }
    }
    add(s, "backbone.norm_f.weight".into(), from_vec(&[d], vec![1.0; d]));
}

/// A linear layer's weight and bias with PyTorch's default init.
pub fn init_linear(rng: &mut InitRng, s: &mut ParamStore, name: &str, out: usize, inp: usize) {
    add(s, format!("{name}.weight"), kaiming(rng, &[out, inp], inp));
    add(s, format!("{name}.bias"), kaiming(rng, &[out], inp));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::data;

    #[test]
    fn dt_bias_inverts_softplus_into_the_range() {
        let cfg = MambaConfig::mamba1(16, 32, 2);
        let s = init_params(&cfg, 1);
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
        let cfg = MambaConfig::mamba1(512, 64, 4);
        let s = init_params(&cfg, 7);
        let e = data(s.value(s.id("backbone.embeddings.weight").unwrap()));
        let std = (e.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / e.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.001, "embedding std {std}");
        let w = data(s.value(s.id("backbone.layers.0.mixer.out_proj.weight").unwrap()));
        let bound = 1.0 / (128f32).sqrt() / 2.0; // 1/√fan_in / √n_layer
        let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max <= bound && max > 0.9 * bound, "out_proj max {max}, bound {bound}");
    }
}
