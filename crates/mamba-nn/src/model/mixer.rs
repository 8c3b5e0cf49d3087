//! The Mamba-1 and Mamba-2 mixers as tape ops.

use crate::config::{Arch, MambaConfig};
use crate::ops;
use crate::tape::{Tape, Var};
use crate::tensor::{Tensor, data};

/// A block's recurrent state at the end of a forward pass, in the layouts of
/// [`State`](super::State): conv (B, channels, K) and SSM.
#[derive(Clone, Debug)]
pub struct LayerState {
    /// The last K conv inputs per channel, oldest first (zeros before the sequence start).
    pub conv: Vec<f32>,
    /// The final SSM state.
    pub ssm: Vec<f32>,
}

/// The mixer of block `prefix` (e.g. `backbone.layers.0.mixer`) on `x` (B, L, d_model). With
/// `state`, also records the block's final recurrent state (Mamba-1 and Mamba-2; the LTI
/// baseline has no state-returning kernel and leaves it `None`).
pub fn forward(
    tape: &mut Tape,
    cfg: &MambaConfig,
    prefix: &str,
    x: Var,
    state: Option<&mut Option<LayerState>>,
) -> Var {
    match cfg.arch {
        Arch::Mamba1 => mamba1(tape, cfg, prefix, x, state),
        Arch::Mamba2 => mamba2(tape, cfg, prefix, x, state),
        Arch::Lti => lti(tape, cfg, prefix, x),
    }
}

/// HF's conv state from a conv input `x` (B, L, C): the last `k` time steps per channel, oldest
/// first, as (B, C, K), zero where the sequence is shorter than `k`.
fn conv_state(x: &Tensor, k: usize) -> Vec<f32> {
    let (bsz, l, c) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let mut st = vec![0.0f32; bsz * c * k];
    ssm_kernel::conv::conv_state(&ssm_kernel::conv::ConvDims::new(bsz, l, c, k), data(x), (c, 0), &mut st);
    st
}

fn param(tape: &mut Tape, prefix: &str, name: &str) -> Var {
    tape.param_named(&format!("{prefix}.{name}"))
}

fn opt_param(tape: &mut Tape, prefix: &str, name: &str) -> Option<Var> {
    let full = format!("{prefix}.{name}");
    tape.params().id(&full).map(|id| tape.param(id))
}

/// Mamba-1: `x, z = in_proj(u)`; `x = silu(conv(x))`; `dt, B, C = x_proj(x)`;
/// `Δ = softplus(dt_proj(dt))`; `y = scan(x, Δ, A, B, C, D) · silu(z)`; `out_proj(y)`.
fn mamba1(
    tape: &mut Tape,
    cfg: &MambaConfig,
    p: &str,
    u: Var,
    state: Option<&mut Option<LayerState>>,
) -> Var {
    let (di, n, r) = (cfg.d_inner(), cfg.d_state, cfg.dt_rank);
    let w_in = param(tape, p, "in_proj.weight");
    let b_in = opt_param(tape, p, "in_proj.bias");
    let xz = ops::linear(tape, u, w_in, b_in);
    let x = ops::narrow_last(tape, xz, 0, di);
    let z = ops::narrow_last(tape, xz, di, di);
    let conv = state.is_some().then(|| conv_state(tape.value(x), cfg.d_conv));
    let cw = param(tape, p, "conv1d.weight");
    let cb = opt_param(tape, p, "conv1d.bias");
    let x = ops::conv1d(tape, x, cw, cb, true);
    let w_x = param(tape, p, "x_proj.weight");
    let dbc = ops::linear(tape, x, w_x, None);
    let dt = ops::narrow_last(tape, dbc, 0, r);
    let b = ops::narrow_last(tape, dbc, r, n);
    let c = ops::narrow_last(tape, dbc, r + n, n);
    let w_dt = param(tape, p, "dt_proj.weight");
    let delta = ops::linear(tape, dt, w_dt, None);
    let dt_bias = param(tape, p, "dt_proj.bias");
    let a_log = param(tape, p, "A_log");
    let d = param(tape, p, "D");
    let scan = ops::Scan1Vars::new(x, delta, a_log, b, c)
        .with_d(d)
        .with_z(z)
        .with_delta_bias(dt_bias)
        .with_delta_softplus(true);
    let y = match (state, conv) {
        (Some(slot), Some(conv)) => {
            let (y, h) = ops::selective_scan1_with_state(tape, scan);
            *slot = Some(LayerState { conv, ssm: data(&h).to_vec() });
            y
        }
        _ => ops::selective_scan1(tape, scan),
    };
    let w_out = param(tape, p, "out_proj.weight");
    let b_out = opt_param(tape, p, "out_proj.bias");
    ops::linear(tape, y, w_out, b_out)
}

/// Mamba-2: `z, xBC, dt = in_proj(u)`; `xBC = silu(conv(xBC))`; `x, B, C = xBC`;
/// `y = scan(x, softplus(dt + dt_bias), A, B, C, D)`; `out_proj(norm(y · silu(z)))` with the
/// norm taken over groups of `d_inner / G` channels.
fn mamba2(
    tape: &mut Tape,
    cfg: &MambaConfig,
    p: &str,
    u: Var,
    state: Option<&mut Option<LayerState>>,
) -> Var {
    let w_in = param(tape, p, "in_proj.weight");
    let b_in = opt_param(tape, p, "in_proj.bias");
    let proj = ops::linear(tape, u, w_in, b_in);
    let prm = ops::Mamba2Params {
        conv_w: param(tape, p, "conv1d.weight"),
        conv_b: opt_param(tape, p, "conv1d.bias"),
        dt_bias: param(tape, p, "dt_bias"),
        a_log: param(tape, p, "A_log"),
        d: param(tape, p, "D"),
        norm_w: param(tape, p, "norm.weight"),
    };
    let spec = ops::Mamba2Spec {
        nheads: cfg.nheads(),
        headdim: cfg.headdim,
        ngroups: cfg.ngroups,
        dstate: cfg.d_state,
        eps: cfg.norm_eps,
        chunk_size: cfg.chunk_size,
    };
    let y = match state {
        Some(slot) => {
            let (y, st) = ops::mamba2_core_with_state(tape, proj, prm, spec);
            *slot = Some(LayerState { conv: st.conv, ssm: data(&st.ssm).to_vec() });
            y
        }
        None => ops::mamba2_core(tape, proj, prm, spec),
    };
    let w_out = param(tape, p, "out_proj.weight");
    let b_out = opt_param(tape, p, "out_proj.bias");
    ops::linear(tape, y, w_out, b_out)
}

/// The non-selective baseline, the seed's block: `x = in_proj(u)`, the time-invariant recurrence
/// `h = A·h + B·x`, `y = C·h + D·x` (per-channel vectors), `out_proj(y)`. No convolution and no
/// gate: nothing in the layer depends on the input's content, which is what the Mamba paper's
/// selective-copying contrast is about.
fn lti(tape: &mut Tape, _cfg: &MambaConfig, p: &str, u: Var) -> Var {
    let w_in = param(tape, p, "in_proj.weight");
    let b_in = opt_param(tape, p, "in_proj.bias");
    let x = ops::linear(tape, u, w_in, b_in);
    let (a, b) = (param(tape, p, "lti_A"), param(tape, p, "lti_B"));
    let (c, d) = (param(tape, p, "lti_C"), param(tape, p, "D"));
    let y = ops::lti_scan(tape, x, a, b, c, d);
    let w_out = param(tape, p, "out_proj.weight");
    let b_out = opt_param(tape, p, "out_proj.bias");
    ops::linear(tape, y, w_out, b_out)
}
