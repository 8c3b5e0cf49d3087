#!/usr/bin/env python3
"""Generate the reference fixtures that crate `mamba-nn` is tested against.

Usage (from the repository root; the Python environment is not part of the repo):

    python3 -m venv /tmp/fixture-venv
    /tmp/fixture-venv/bin/pip install -r scripts/requirements.txt
    /tmp/fixture-venv/bin/python scripts/make_fixtures.py [--out crates/mamba-nn/tests/fixtures]
                                                          [--only CASE ...]

`cargo test` never runs this: the (small) outputs are committed.

Every case builds a tiny Hugging Face `MambaForCausalLM` / `Mamba2ForCausalLM` from a config
with random weights (nothing is downloaded; HF_HUB_OFFLINE is forced), perturbs every parameter
so that no term of the model is trivial (D = 1, zero conv bias, unit norm weights, A_log shared
across channels would hide bugs), runs the pure-torch CPU path in float32 with 2 threads, and
writes into OUT/<case>/:

    config.json            the model config exactly as `save_pretrained` writes it (HF keys)
    model.safetensors      the weights as `save_pretrained(safe_serialization=True)` writes them;
                           for tied cases HF leaves `lm_head.weight` out (it is
                           `backbone.embeddings.weight`)
    fixtures.safetensors   reference tensors (f32 unless noted):
        input_ids          int64 [2, L]
        logits             [2, L, V]      model(input_ids, use_cache=False).logits
        loss               [1]            HF causal-LM loss with labels = input_ids, i.e. mean
                                          cross-entropy of logits[:, :-1] against ids[:, 1:]
                                          over all 2*(L-1) targets
        grad.<name>        d loss / d parameter for every entry of model.named_parameters()
                           (same names and shapes; a tied embedding's grad already contains the
                           lm_head contribution)
        hidden.<i>         [2, L, d_model] residual stream after block i (i < n_layer), and
                           hidden.<n_layer> = after norm_f (output_hidden_states)
        ssm_state.<l>      final SSM state of layer l after the whole input, as the transformers
                           cache holds it: Mamba-1 [2, d_inner, d_state];
                           Mamba-2 [2, num_heads, head_dim, d_state]
        conv_state.<l>     final conv state of layer l: the last conv_kernel conv *inputs*
                           (in_proj output before conv/bias/silu), channel-major
                           [2, channels, conv_kernel], oldest first; channels = d_inner (Mamba-1)
                           or d_inner + 2*n_groups*d_state in the order x | B | C (Mamba-2)
        gen_prompt         int64 [1, P]
        gen_tokens         int64 [1, P+T]  greedy generate(do_sample=False, max_new_tokens=T,
                                           use_cache=True), EOS disabled
        gen_logits         [T, V]          raw logits that chose each generated token
    meta.json              versions, the case config, seed and perturbation, and checks:
                           f32 vs float64 (a genuinely f64 re-run, see `float64_everywhere`),
                           cache vs no-cache, greedy margins, reload round trip
    README.md (in OUT)     human-readable summary of all of the above, regenerated each run
"""

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

BATCH = 2
N_NEW = 12  # T: generated tokens

# Common to all cases: no bias in in_proj/out_proj, conv bias, RMSNorm eps 1e-5, residual in
# f32, EOS disabled (random weights would otherwise stop generation early: Mamba's default
# eos_token_id is 0, Mamba-2's is 2).
COMMON = dict(
    num_hidden_layers=2,
    expand=2,
    layer_norm_epsilon=1e-5,
    use_bias=False,
    use_conv_bias=True,
    residual_in_fp32=True,
    bos_token_id=0,
    pad_token_id=0,
    eos_token_id=None,
)

CASES = {
    "mamba1": dict(
        kind="mamba", seq_len=17, prompt_len=7,
        config=dict(vocab_size=203, hidden_size=32, state_size=8, conv_kernel=3,
                    time_step_rank=3, tie_word_embeddings=True),
    ),
    "mamba1-untied": dict(
        kind="mamba", seq_len=24, prompt_len=8,
        config=dict(vocab_size=256, hidden_size=40, state_size=16, conv_kernel=4,
                    time_step_rank=4, tie_word_embeddings=False),
    ),
    # Mamba-2: num_heads * head_dim must equal expand * hidden_size (transformers validates it),
    # n_groups must divide num_heads. transformers has no switch for the gated norm: it is always
    # an RMSNorm over groups of d_inner/n_groups applied to y * silu(z) (norm_before_gate=False,
    # rms_norm=True in state-spaces terms); those two keys are recorded in config.json for
    # readers, transformers ignores them. time_step_limit keeps its default (0.0, inf).
    "mamba2-g1": dict(
        kind="mamba2", seq_len=21, prompt_len=7,
        config=dict(vocab_size=203, hidden_size=32, state_size=16, conv_kernel=4,
                    head_dim=16, num_heads=4, n_groups=1, chunk_size=8,
                    tie_word_embeddings=True, rms_norm=True, norm_before_gate=False),
    ),
    "mamba2-g2": dict(
        kind="mamba2", seq_len=19, prompt_len=6,
        config=dict(vocab_size=256, hidden_size=48, state_size=8, conv_kernel=3,
                    head_dim=16, num_heads=6, n_groups=2, chunk_size=8,
                    tie_word_embeddings=False, rms_norm=True, norm_before_gate=False),
    ),
}

# Acceptance rule for a seed: generation must be informative and robust to f32 rounding.
MIN_DISTINCT_NEW = 6
MIN_MARGIN = 0.05
MAX_SEED_TRIES = 40

# "Boost" applied after the perturbation (see `perturb`).
BOOST = {"out_proj": {"mamba": 10.0, "mamba2": 3.0}, "x_proj": 2.0, "dt_bias": 2.5, "norm_f": 4.0}


# ----------------------------------------------------------------------------------------------
# model construction


def build_model(case, seed):
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    spec = CASES[case]
    kw = {**COMMON, **spec["config"]}
    if spec["kind"] == "mamba":
        cfg, cls = MambaConfig(**kw), MambaForCausalLM
    else:
        cfg, cls = Mamba2Config(**kw), Mamba2ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    perturbation = perturb(model, spec["kind"], seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    tied = model.lm_head.weight is model.backbone.embeddings.weight
    assert tied == cfg.tie_word_embeddings, (case, tied)
    return cfg, model, perturbation


def perturb(model, kind, seed):
    """Move every parameter away from its structured init, then strengthen the mixer path.

    After transformers' init: A_log = log(1..N) for every channel, D = 1, conv bias = 0, norm
    weights = 1, dt in [1e-3, 0.1] (tiny steps: the SSM barely remembers) and the residual
    stream is dominated by the embedding, so a random model's greedy decode repeats one token.
    """
    gen = torch.Generator().manual_seed(10_000 + seed)

    def noise(p, scale):
        return scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)

    rule = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                p.add_(noise(p, 0.25)); rule[name] = "+0.25*N(0,1)"
            elif leaf == "D":
                p.add_(noise(p, 0.4)); rule[name] = "+0.4*N(0,1)"
            elif name.endswith("dt_proj.bias") or leaf == "dt_bias":
                # dt bias ~ inverse-softplus(1e-3..0.1) ~ -7..-2; +2.5 -> dt ~ 0.01..0.4
                p.add_(BOOST["dt_bias"] + noise(p, 0.4))
                rule[name] = f"+{BOOST['dt_bias']}+0.4*N(0,1)"
            elif name.endswith("conv1d.bias"):
                p.copy_(noise(p, 0.2)); rule[name] = "=0.2*N(0,1)"
            elif "norm" in name and leaf == "weight":
                p.copy_(1.0 + noise(p, 0.2)); rule[name] = "=1+0.2*N(0,1)"
                if name == "backbone.norm_f.weight":
                    # scales the logits only: larger top1-top2 margins
                    p.mul_(BOOST["norm_f"]); rule[name] += f", then *{BOOST['norm_f']}"
            else:
                std = float(p.std())
                p.add_(noise(p, 0.15 * std)); rule[name] = "+0.15*std*N(0,1)"
                if name.endswith("out_proj.weight"):
                    k = BOOST["out_proj"][kind]
                    p.mul_(k); rule[name] += f", then *{k}"
                elif name.endswith("x_proj.weight"):
                    p.mul_(BOOST["x_proj"]); rule[name] += f", then *{BOOST['x_proj']}"
    return rule


# ----------------------------------------------------------------------------------------------
# float64 re-run


@contextlib.contextmanager
def float64_everywhere():
    """transformers' Mamba code casts to float32 explicitly (`.float()`, `.to(torch.float32)`
    in RMSNorm, the scans and the logits). With `model.double()` alone those casts silently
    drop to f32. Inside this context such casts keep float64 tensors float64."""
    orig_float, orig_to = torch.Tensor.float, torch.Tensor.to

    def _float(self, *a, **k):
        if self.dtype == torch.float64:
            return self
        return orig_float(self, *a, **k)

    def _to(self, *args, **kwargs):
        if self.dtype == torch.float64:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return orig_to(self, *args, **kwargs)

    torch.Tensor.float, torch.Tensor.to = _float, _to
    try:
        yield
    finally:
        torch.Tensor.float, torch.Tensor.to = orig_float, orig_to


def run_float64(model, input_ids):
    m64 = copy.deepcopy(model).double()
    bad = []

    def hook(mod, _inp, out):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if torch.is_tensor(o) and o.is_floating_point() and o.dtype != torch.float64:
                bad.append(type(mod).__name__)

    handles = [m.register_forward_hook(hook) for m in m64.modules()]
    with float64_everywhere():
        out = m64(input_ids, labels=input_ids, use_cache=False)
        out.loss.backward()
    for h in handles:
        h.remove()
    assert not bad and out.logits.dtype == torch.float64, ("f32 leaked into the f64 run", bad)
    grads = {n: p.grad.detach().clone() for n, p in m64.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


# ----------------------------------------------------------------------------------------------
# one case


def greedy_nocache(model, prompt, n_new):
    seq, rows = prompt.clone(), []
    for _ in range(n_new):
        last = model(seq, use_cache=False).logits[:, -1]
        rows.append(last)
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq, torch.cat(rows, 0)


def top2_margins(logits):
    v = logits.topk(2, dim=-1).values
    return v[..., 0] - v[..., 1]


def try_seed(case, seed):
    """Build the model for `seed` and run only the generation checks (cheap)."""
    spec = CASES[case]
    cfg, model, rule = build_model(case, seed)
    g = torch.Generator().manual_seed(20_000 + seed)
    input_ids = torch.randint(0, cfg.vocab_size, (BATCH, spec["seq_len"]), generator=g)
    prompt = torch.randint(0, cfg.vocab_size, (1, spec["prompt_len"]), generator=g)
    with torch.no_grad():
        # explicit all-ones mask: otherwise generate() infers the mask as prompt != pad_token_id
        # and zeroes the mixer inputs at any prompt position that happens to hold token 0
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                             do_sample=False, max_new_tokens=N_NEW, use_cache=True,
                             output_logits=True, return_dict_in_generate=True,
                             eos_token_id=None, pad_token_id=0)
        gen_logits = torch.cat([x.float() for x in gen.logits], 0)
        seq_nc, logits_nc = greedy_nocache(model, prompt, N_NEW)
    new = gen.sequences[0, spec["prompt_len"]:].tolist()
    checks = {
        "gen_distinct_new_tokens": len(set(new)),
        "gen_min_top1_top2_margin": float(top2_margins(gen_logits).min()),
        "gen_min_top1_top2_margin_nocache": float(top2_margins(logits_nc).min()),
        "gen_cache_equals_nocache": bool(torch.equal(gen.sequences, seq_nc)),
        "gen_max_abs_diff_logits_cache_vs_nocache": float((gen_logits - logits_nc).abs().max()),
    }
    ok = (checks["gen_cache_equals_nocache"]
          and checks["gen_distinct_new_tokens"] >= MIN_DISTINCT_NEW
          and min(checks["gen_min_top1_top2_margin"],
                  checks["gen_min_top1_top2_margin_nocache"]) >= MIN_MARGIN)
    return ok, (cfg, model, rule, input_ids, prompt, gen, gen_logits, checks)


def make_case(case, out_root, first_seed):
    from safetensors.torch import load_file, save_file
    import safetensors
    import transformers

    spec = CASES[case]
    tried = []
    for seed in range(first_seed, first_seed + MAX_SEED_TRIES):
        ok, built = try_seed(case, seed)
        tried.append({"seed": seed, **{k: built[-1][k] for k in
                                      ("gen_distinct_new_tokens", "gen_min_top1_top2_margin",
                                       "gen_cache_equals_nocache")}})
        print(f"  {case} seed {seed}: {tried[-1]}", flush=True)
        if ok:
            break
    else:
        raise SystemExit(f"{case}: no seed in {MAX_SEED_TRIES} tries met the generation criteria")
    cfg, model, rule, input_ids, prompt, gen, gen_logits, checks = built
    n_layer = cfg.num_hidden_layers
    L, P = spec["seq_len"], spec["prompt_len"]

    odir = os.path.join(out_root, case)
    if os.path.isdir(odir):
        shutil.rmtree(odir)
    os.makedirs(odir)

    # ---- weights + config, exactly as save_pretrained writes them
    tmp = tempfile.mkdtemp()
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for fname in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(tmp, fname), os.path.join(odir, fname))
    finally:
        shutil.rmtree(tmp)
    saved = load_file(os.path.join(odir, "model.safetensors"))
    assert ("lm_head.weight" in saved) == (not cfg.tie_word_embeddings), sorted(saved)

    # ---- forward + loss + backward (f32, no cache)
    model.zero_grad(set_to_none=True)
    out = model(input_ids, labels=input_ids, use_cache=False, output_hidden_states=True)
    out.loss.backward()
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, cfg.vocab_size), input_ids[:, 1:].reshape(-1))
    assert torch.allclose(manual, out.loss, rtol=0, atol=1e-6), (manual, out.loss)

    t = {
        "input_ids": input_ids.contiguous(),
        "logits": out.logits.detach().contiguous(),
        "loss": out.loss.detach().reshape(1).contiguous(),
    }
    for i, h in enumerate(out.hidden_states):
        t[f"hidden.{i}"] = h.detach().contiguous()
    param_shapes = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        t[f"grad.{name}"] = p.grad.detach().clone().contiguous()
        param_shapes[name] = list(p.shape)
    assert set(param_shapes) == set(saved), (sorted(param_shapes), sorted(saved))
    model.zero_grad(set_to_none=True)

    # how much each mixer moves the residual stream (shows the SSM path is not negligible)
    with torch.no_grad():
        emb = model.backbone.embeddings(input_ids)
        prev, mix_ratio = emb, []
        for i in range(n_layer):
            cur = out.hidden_states[i]
            mix_ratio.append(float((cur - prev).norm() / prev.norm()))
            prev = cur

    # ---- prefill with a cache: final states (and the logits must agree with no-cache)
    with torch.no_grad():
        oc = model(input_ids, use_cache=True)
        prefill_diff = float((oc.logits - out.logits.detach()).abs().max())
        for li in range(n_layer):
            t[f"ssm_state.{li}"] = oc.cache.get_recurrent_state(li).detach().clone().contiguous()
            t[f"conv_state.{li}"] = oc.cache.get_conv_state(li).detach().clone().contiguous()

        # teacher-forced stepping: prefill the first half, then one token at a time
        split = L // 2
        o1 = model(input_ids[:, :split], use_cache=True)
        cache, step_logits = o1.cache, [o1.logits]
        for j in range(split, L):
            oj = model(input_ids[:, j:j + 1], cache=cache, use_cache=True)
            cache = oj.cache
            step_logits.append(oj.logits)
        step_logits = torch.cat(step_logits, 1)
        step_diff = float((step_logits - out.logits.detach()).abs().max())
        step_state_diff = max(
            max(float((cache.get_recurrent_state(li) - t[f"ssm_state.{li}"]).abs().max()),
                float((cache.get_conv_state(li) - t[f"conv_state.{li}"]).abs().max()))
            for li in range(n_layer))

    t["gen_prompt"] = prompt.contiguous()
    t["gen_tokens"] = gen.sequences.contiguous()
    t["gen_logits"] = gen_logits.contiguous()
    assert t["gen_tokens"].shape == (1, P + N_NEW), t["gen_tokens"].shape
    assert torch.equal(t["gen_logits"].argmax(-1), t["gen_tokens"][0, P:])

    # ---- genuine float64 re-run
    logits64, loss64, grads64 = run_float64(model, input_ids)
    grad_rel = {
        n: float((t[f"grad.{n}"].double() - g).abs().max() / g.abs().max().clamp_min(1e-30))
        for n, g in grads64.items()
    }

    # ---- reload round trip: the written files reproduce the logits
    cls = type(model)
    reloaded = cls.from_pretrained(odir, local_files_only=True).float().eval()
    with torch.no_grad():
        reload_diff = float((reloaded(input_ids, use_cache=False).logits
                             - out.logits.detach()).abs().max())
    assert reload_diff == 0.0, reload_diff

    save_file(t, os.path.join(odir, "fixtures.safetensors"))

    meta = {
        "case": case,
        "kind": spec["kind"],
        "model_class": cls.__name__,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": __import__("numpy").__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "config_overrides": {**COMMON, **spec["config"]},
        "config": json.load(open(os.path.join(odir, "config.json"))),
        "batch": BATCH,
        "seq_len": L,
        "prompt_len": P,
        "new_tokens": N_NEW,
        "seed": seed,
        "seeds_tried": tried,
        "perturbation": rule,
        "n_params": sum(p.numel() for p in model.parameters()),
        "param_shapes": param_shapes,
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in t.items()},
        "loss": out.loss.item(),
        "loss_f64": loss64.item(),
        "max_abs_logits": float(out.logits.detach().abs().max()),
        "max_abs_diff_logits_f32_vs_f64": float((out.logits.detach().double() - logits64)
                                                .abs().max()),
        "abs_diff_loss_f32_vs_f64": abs(out.loss.item() - loss64.item()),
        "max_rel_diff_grad_f32_vs_f64": max(grad_rel.values()),
        "rel_diff_grad_f32_vs_f64": grad_rel,
        "mixer_update_norm_ratio": mix_ratio,
        "max_abs_diff_logits_prefill_cache_vs_nocache": prefill_diff,
        "max_abs_diff_logits_stepwise_vs_full": step_diff,
        "max_abs_diff_states_stepwise_vs_prefill": step_state_diff,
        "max_abs_diff_logits_reloaded": reload_diff,
        "gen_prompt": prompt[0].tolist(),
        "gen_tokens": gen.sequences[0].tolist(),
        **checks,
    }
    with open(os.path.join(odir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    short = {k: meta[k] for k in (
        "seed", "loss", "loss_f64", "max_abs_diff_logits_f32_vs_f64",
        "max_rel_diff_grad_f32_vs_f64", "gen_distinct_new_tokens", "gen_min_top1_top2_margin",
        "gen_cache_equals_nocache", "max_abs_diff_logits_stepwise_vs_full",
        "mixer_update_norm_ratio")}
    print(f"{case}: {json.dumps(short)}", flush=True)
    return meta


# ----------------------------------------------------------------------------------------------
# README


def fmt(x):
    return f"{x:.2e}" if isinstance(x, float) else str(x)


BEHAVIOUR = [
    "Block: `h = h + mixer(RMSNorm(h))` on one stream (no separate residual tensor; with "
    "`residual_in_fp32` the stream is f32). `hidden.<i>` is that stream. Then `norm_f`, "
    "`lm_head`, logits cast to f32.",
    "RMSNorm: `weight * (x * rsqrt(mean(x^2) + eps))`, computed in f32, eps = "
    "`layer_norm_epsilon` (1e-5) for block norms, `norm_f` and the Mamba-2 gated norm.",
    "Mamba-1 mixer: `in_proj` → `[x | z]` (halves); depthwise causal conv over x "
    "(`conv1d.weight` [d_inner,1,K], out[t] = bias + Σ_k w[k]·x[t−K+1+k], zero left pad), silu; "
    "`x_proj` → `[dt_rank | B (N) | C (N)]`; `dt = softplus(dt_proj.weight·dt + dt_proj.bias)` "
    "(torch softplus, threshold 20); `A = −exp(A_log)`; sequential scan from 0; "
    "`y = C·h + D·x`; `y *= silu(z)`; `out_proj`. No dt clamp in Mamba-1.",
    "Mamba-2 mixer: `in_proj` → `[z (d_inner) | xBC (d_inner + 2GN) | dt (H)]`; conv + silu over "
    "xBC; split `[x | B (G·N) | C (G·N)]`; `dt = softplus(dt + dt_bias)` then clamped to "
    "`time_step_limit` (default (0, inf): a no-op) — only the chunked (multi-token) path clamps, "
    "the single-token cache step does not; head h uses group `h // (H/G)`; `A = −exp(A_log)` per "
    "head; `y = scan + D[h]·x`; then gated RMSNorm: `norm(y * silu(z))` (gate before norm, "
    "`norm_before_gate=False`) with statistics over groups of `d_inner/G` consecutive channels, "
    "i.e. per n_group (so `mamba2-g2` normalises two halves separately), weight [d_inner] applied "
    "after; `out_proj`. The chunked scan zero-pads L to a multiple of `chunk_size`; padded steps "
    "have dt·x = 0 and decay 1, so they do not change the final state.",
    "Cache (`DynamicCache`, one `LinearAttentionLayer` per block): `ssm_state` is the f32 state "
    "(Mamba-1 [B, d_inner, N]; Mamba-2 [B, H, P, N]). `conv_state` keeps the last `conv_kernel` "
    "conv inputs (K columns, not K−1; pre-bias, pre-silu; left zero-padded when the prefill is "
    "shorter than K), layout [B, channels, K] oldest first. A decode step concatenates state and "
    "the new column (K+1), convolves without padding, keeps the last output and stores the last K "
    "columns.",
    "Loss: `ForCausalLMLoss`: labels padded with −100 at the end and shifted, CE mean over the "
    "2·(L−1) non-ignored targets (equal to CE of `logits[:, :-1]` vs `ids[:, 1:]`).",
    "Tied models: `named_parameters()` lists only `backbone.embeddings.weight` (the lm_head is the "
    "same Parameter) and `save_pretrained` omits `lm_head.weight`. `MambaConfig` defaults to tied, "
    "`Mamba2Config` to untied (`mamba2-g1` sets tied, `mamba2-g2` keeps untied).",
    "Config defaults that bite: `MambaConfig.eos_token_id` is 0 and `Mamba2Config.eos_token_id` 2 "
    "(EOS disabled here); `Mamba2Config.n_groups` defaults to 8; Mamba-2's `time_step_rank` is "
    "written but unused; `generate()` without an `attention_mask` infers one as "
    "`prompt != pad_token_id` and then zeroes mixer inputs at such positions — the fixtures pass "
    "an all-ones mask.",
]


def write_readme(out_root):
    metas = {}
    for case in CASES:
        p = os.path.join(out_root, case, "meta.json")
        if os.path.exists(p):
            metas[case] = json.load(open(p))
    if not metas:
        return
    any_meta = next(iter(metas.values()))
    v = any_meta["versions"]
    lines = []
    w = lines.append
    w("# Reference fixtures for `mamba-nn`")
    w("")
    w("Generated by `scripts/make_fixtures.py` (do not edit by hand; this README is written by")
    w("the script too). They compare the Rust model with Hugging Face transformers'")
    w("`MambaForCausalLM` / `Mamba2ForCausalLM` (pure-torch CPU path, float32, 2 threads) in")
    w("outputs, loss, gradients, final recurrent states and greedy generation. Random weights,")
    w("nothing downloaded. Regenerate with:")
    w("")
    w("```sh")
    w("python3 -m venv /tmp/fixture-venv")
    w("/tmp/fixture-venv/bin/pip install -r scripts/requirements.txt")
    w("/tmp/fixture-venv/bin/python scripts/make_fixtures.py --out crates/mamba-nn/tests/fixtures")
    w("```")
    w("")
    w(f"Versions: torch {v['torch']}, transformers {v['transformers']}, safetensors "
      f"{v['safetensors']}, numpy {v['numpy']}, Python {v['python']}.")
    w("")
    w("## Cases")
    w("")
    w("All: 2 layers, expand 2, no in_proj/out_proj bias, conv bias, RMSNorm eps 1e-5,")
    w("`residual_in_fp32` true, EOS disabled (`eos_token_id: null`), batch 2, "
      f"{N_NEW} generated tokens.")
    w("")
    w("| case | class | vocab | d_model | d_state | conv_kernel | other | tied | L | prompt P |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case, m in metas.items():
        c = m["config"]
        if m["kind"] == "mamba":
            other = f"d_inner {c['intermediate_size'] if 'intermediate_size' in c else 2 * c['hidden_size']}, dt_rank {c['time_step_rank']}"
        else:
            other = (f"heads {c['num_heads']} x head_dim {c['head_dim']}, n_groups {c['n_groups']}, "
                     f"chunk {c['chunk_size']}")
        w(f"| `{case}` | {m['model_class']} | {c['vocab_size']} | {c['hidden_size']} | "
          f"{c['state_size']} | {c['conv_kernel']} | {other} | {c['tie_word_embeddings']} | "
          f"{m['seq_len']} | {m['prompt_len']} |")
    w("")
    w("## Files in each `<case>/`")
    w("")
    w("* `config.json` — written by `save_pretrained` (HF keys). Mamba-2's `time_step_limit`")
    w("  default `(0.0, inf)` is serialised by transformers as `[0.0, {\"__float__\": \"Infinity\"}]`;")
    w("  a loader must accept that form. `rms_norm`/`norm_before_gate` in the Mamba-2 configs are")
    w("  informative only (transformers ignores them; its behaviour is fixed as recorded).")
    w("* `model.safetensors` — written by `save_pretrained(safe_serialization=True)`. Tied cases")
    w("  have no `lm_head.weight` (it is `backbone.embeddings.weight`).")
    w("* `fixtures.safetensors` — the reference tensors below.")
    w("* `meta.json` — versions, config, seed, perturbation rule per parameter, tensor list, checks.")
    w("")
    w("### `fixtures.safetensors`")
    w("")
    w("| tensor | dtype | shape | meaning |")
    w("| --- | --- | --- | --- |")
    w("| `input_ids` | i64 | [2, L] | random tokens |")
    w("| `logits` | f32 | [2, L, V] | `model(input_ids, use_cache=False).logits` |")
    w("| `loss` | f32 | [1] | HF causal-LM loss, labels = input_ids: mean CE of `logits[:, :-1]` vs "
      "`input_ids[:, 1:]` over 2·(L−1) targets |")
    w("| `grad.<param>` | f32 | param shape | d loss / d param for every `model.named_parameters()` "
      "name; tied embedding grad includes the lm_head part |")
    w("| `hidden.<i>` | f32 | [2, L, d_model] | residual stream after block i; `hidden.<n_layer>` "
      "is after `norm_f` |")
    w("| `ssm_state.<l>` | f32 | Mamba-1 [2, d_inner, d_state]; Mamba-2 [2, heads, head_dim, d_state] "
      "| final SSM state after `input_ids` |")
    w("| `conv_state.<l>` | f32 | [2, channels, conv_kernel] | last conv_kernel conv inputs (pre-conv, "
      "pre-bias, pre-silu), oldest first; channels = d_inner (Mamba-1) or d_inner + 2·G·N ordered "
      "x, B, C (Mamba-2) |")
    w("| `gen_prompt` | i64 | [1, P] | random prompt |")
    w(f"| `gen_tokens` | i64 | [1, P+{N_NEW}] | greedy `generate(do_sample=False, use_cache=True)` |")
    w(f"| `gen_logits` | f32 | [{N_NEW}, V] | raw logits of each generation step (argmax = the token) |")
    w("")
    w("Exact shapes per case:")
    w("")
    for case, m in metas.items():
        shown = {k: s for k, s in m["tensors"].items() if not k.startswith("grad.")}
        w(f"* `{case}`: " + ", ".join(f"`{k}` {s['dtype']} {s['shape']}" for k, s in shown.items())
          + f"; {sum(k.startswith('grad.') for k in m['tensors'])} `grad.*` tensors.")
    w("")
    w("## Measured numbers (from `meta.json`)")
    w("")
    w("| | " + " | ".join(f"`{c}`" for c in metas) + " |")
    w("| --- |" + " --- |" * len(metas))
    rows = [
        ("seed", "seed"),
        ("parameters", "n_params"),
        ("loss (f32)", "loss"),
        ("loss (f64 re-run)", "loss_f64"),
        ("max abs logits", "max_abs_logits"),
        ("max abs(logits f32 − f64)", "max_abs_diff_logits_f32_vs_f64"),
        ("worst grad max abs diff / max abs grad (f32 vs f64)", "max_rel_diff_grad_f32_vs_f64"),
        ("prefill-with-cache vs no-cache logits", "max_abs_diff_logits_prefill_cache_vs_nocache"),
        ("prefill L/2 + single steps vs full logits", "max_abs_diff_logits_stepwise_vs_full"),
        ("stepped vs prefill final states", "max_abs_diff_states_stepwise_vs_prefill"),
        ("generate (cache) == greedy without cache", "gen_cache_equals_nocache"),
        ("gen step logits cache vs no-cache", "gen_max_abs_diff_logits_cache_vs_nocache"),
        (f"distinct tokens among {N_NEW} generated", "gen_distinct_new_tokens"),
        ("min top1−top2 logit margin in generation", "gen_min_top1_top2_margin"),
    ]
    for label, key in rows:
        w(f"| {label} | " + " | ".join(fmt(m[key]) if key != "loss" and key != "loss_f64"
                                       else f"{m[key]:.7f}" for m in metas.values()) + " |")
    w("| mixer update / residual norm per layer | " + " | ".join(
        ", ".join(f"{r:.2f}" for r in m["mixer_update_norm_ratio"]) for m in metas.values()) + " |")
    w("")
    w("The f64 column is a genuine float64 run: transformers casts to float32 inside RMSNorm,")
    w("the scans and the logits, so the script keeps those casts in f64 while re-running.")
    w("These differences are the f32 rounding noise of one implementation, a guide for tolerances.")
    w("")
    w("## Weights")
    w("")
    w("transformers' init under `torch.manual_seed(seed)` (embedding std = `initializer_range` 0.1),")
    w("then every parameter perturbed (`meta.json` → `perturbation` has the rule per name):")
    w(f"A_log +0.25·N(0,1); D +0.4·N; dt bias +{BOOST['dt_bias']}+0.4·N; conv bias = 0.2·N; "
      "norm weights = 1+0.2·N;")
    w("all other weights +0.15·std·N. Then out_proj ×"
      f"{BOOST['out_proj']['mamba']} (Mamba-1) / ×{BOOST['out_proj']['mamba2']} (Mamba-2), "
      f"x_proj ×{BOOST['x_proj']}, norm_f ×{BOOST['norm_f']}")
    w("(logit scale), so that the SSM path matters and greedy decoding does not repeat one token.")
    w(f"A seed is accepted when ≥{MIN_DISTINCT_NEW} of the {N_NEW} generated tokens are distinct, "
      f"the minimum top1−top2 margin (cache and no-cache) is ≥ {MIN_MARGIN}, and cached and")
    w("uncached greedy decoding agree; seeds are tried upwards from `--seed` (default 0).")
    w("")
    w("## transformers behaviour these fixtures encode")
    w("")
    for item in BEHAVIOUR:
        w(f"* {item}")
    w("")
    with open(os.path.join(out_root, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(os.path.dirname(here), "crates", "mamba-nn", "tests", "fixtures")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--only", nargs="+", choices=sorted(CASES))
    ap.add_argument("--seed", type=int, default=0, help="first seed tried for every case")
    args = ap.parse_args()

    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    os.makedirs(args.out, exist_ok=True)
    for case in args.only or list(CASES):
        make_case(case, args.out, args.seed)
    write_readme(args.out)


if __name__ == "__main__":
    main()
