//! What the models allocate, counted by a global allocator that tallies every allocation made
//! (on any thread) while counting is switched on:
//!
//! - a recurrent `Decoder::step` allocates nothing at all, for Mamba-1, Mamba-2 and the LTI
//!   baseline, batches of 1, 3 and 4, with f32, bf16, f16 and q8 weight matrices;
//! - after the first training step (forward, loss, backward into preallocated `Grads`), a step
//!   allocates no parameter-sized buffer — no gradient, per-task partial gradient or repacked
//!   weight: those come from the buffer pools, and parameter gradients accumulate in place.
//!
//! `matrixmultiply` allocates a packing workspace inside every `sgemm` call; that is its own
//! business and is not counted (`ssm_kernel::gemm::in_sgemm`).
//!
//! The counter is process-wide, so the tests take a lock and run one at a time. With `BT=1` in
//! the environment the training test prints a backtrace for every parameter-sized allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use mamba_nn::config::{Arch, MambaConfig};
use mamba_nn::model::{Cache, Decoder, LoraConfig, MambaLM, WeightFormat};
use mamba_nn::params::Grads;
use mamba_nn::tape::Tape;

/// Counts allocations while `ON` is set; always forwards to `System`.
struct Counting;

static ON: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// The sizes of the first allocations counted.
static SIZES: [AtomicUsize; 16] = [const { AtomicUsize::new(0) }; 16];
/// Byte sizes to watch for (0 ends the list), the watched allocations seen and their sizes.
static WATCH: [AtomicUsize; 64] = [const { AtomicUsize::new(0) }; 64];
static HITS: AtomicUsize = AtomicUsize::new(0);
static HIT_SIZES: [AtomicUsize; 16] = [const { AtomicUsize::new(0) }; 16];
/// Print a backtrace for each watched allocation.
static BACKTRACE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Set while this thread prints a backtrace (which allocates), so that is not counted.
    static PRINTING: Cell<bool> = const { Cell::new(false) };
}

fn watched(size: usize) -> bool {
    WATCH.iter().map(|w| w.load(Relaxed)).take_while(|&w| w != 0).any(|w| w == size)
}

fn record(size: usize) {
    if !ON.load(Relaxed) || ssm_kernel::gemm::in_sgemm() || PRINTING.with(Cell::get) {
        return;
    }
    let i = COUNT.fetch_add(1, Relaxed);
    if let Some(s) = SIZES.get(i) {
        s.store(size, Relaxed);
    }
    LARGEST.fetch_max(size, Relaxed);
    if watched(size) {
        let j = HITS.fetch_add(1, Relaxed);
        if let Some(s) = HIT_SIZES.get(j) {
            s.store(size, Relaxed);
        }
        if BACKTRACE.load(Relaxed) {
            PRINTING.with(|p| p.set(true));
            eprintln!("allocation of {size} bytes:\n{}", std::backtrace::Backtrace::force_capture());
            PRINTING.with(|p| p.set(false));
        }
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the tally only reads sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

/// What `f` allocated.
struct Tally {
    count: usize,
    largest: usize,
    /// Sizes of the first allocations.
    sizes: Vec<usize>,
    /// Allocations of a watched size, and the first few sizes.
    hits: usize,
    hit_sizes: Vec<usize>,
}

/// Counts what `f` allocates, watching for allocations of exactly the sizes in `watch` (bytes).
fn count(watch: &[usize], f: impl FnOnce()) -> Tally {
    assert!(watch.len() < WATCH.len() && !watch.contains(&0), "at most 63 non-zero sizes to watch");
    for (i, w) in WATCH.iter().enumerate() {
        w.store(watch.get(i).copied().unwrap_or(0), Relaxed);
    }
    BACKTRACE.store(std::env::var_os("BT").is_some(), Relaxed);
    COUNT.store(0, Relaxed);
    LARGEST.store(0, Relaxed);
    HITS.store(0, Relaxed);
    ON.store(true, Relaxed);
    f();
    ON.store(false, Relaxed);
    let (count, hits) = (COUNT.load(Relaxed), HITS.load(Relaxed));
    let first = |a: &[AtomicUsize], n: usize| a.iter().take(n).map(|s| s.load(Relaxed)).collect();
    Tally {
        count,
        largest: LARGEST.load(Relaxed),
        sizes: first(&SIZES, count),
        hits,
        hit_sizes: first(&HIT_SIZES, hits),
    }
}

/// Small models of each kind; the Mamba-2 one has two groups and a conv of width 5.
fn configs() -> Vec<(&'static str, MambaConfig)> {
    let m1 = MambaConfig::mamba1(61, 64, 2);
    let mut m2 = MambaConfig::mamba2(61, 64, 2);
    (m2.d_state, m2.headdim, m2.ngroups, m2.d_conv, m2.chunk_size) = (8, 16, 2, 5, 8);
    let mut lti = MambaConfig::mamba1(61, 64, 2);
    lti.arch = Arch::Lti;
    vec![("mamba1", m1), ("mamba2", m2), ("lti", lti)]
}

/// LoRA adapters (rank 4, B perturbed so they compute something) on every projection of
/// `model`'s layers and on its embedding, left unmerged.
fn attach_adapters(model: &mut MambaLM) {
    let targets = model.lora_targets().into_iter().map(str::to_string).collect();
    model.add_lora(&LoraConfig { rank: 4, alpha: 8.0, targets, rslora: false }, 1).expect("valid targets");
    let zeros: Vec<_> = model
        .lora
        .as_ref()
        .unwrap()
        .modules
        .iter()
        .map(|m| if m.embedding { m.lora.a } else { m.lora.b })
        .collect();
    for id in zeros {
        mamba_nn::tensor::data_mut(model.params.value_mut(id))
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = 0.01 * (i % 7) as f32);
    }
}

#[test]
fn recurrent_step_allocates_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Inside a rayon pool, as the CLI runs. Called from outside one, every parallel region is
    // injected into the global pool, whose queue allocates a block every 63 injected jobs.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a rayon pool");
    // Every worker started (threads allocate as they start).
    pool.broadcast(|_| ());
    let formats = [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::F16, WeightFormat::Q8];
    // Plus one model wide enough that the projections split their outputs over the pool.
    let wide = ("mamba1, d_model 256", MambaConfig::mamba1(61, 256, 1));
    let all = configs().into_iter().chain([wide]);
    // Each also with unmerged LoRA adapters on every projection and the embedding.
    let cases =
        all.flat_map(|c| formats.map(|f| (c.clone(), f))).flat_map(|c| [(c.clone(), false), (c, true)]);
    for (((name, cfg), format), adapted) in cases {
        let mut model = MambaLM::new(cfg, 3).expect("valid config");
        if adapted {
            attach_adapters(&mut model);
        }
        model.pack_weights(format);
        let name = format!("{name} ({format}{})", if adapted { ", LoRA" } else { "" });
        for batch in [1, 3, 4] {
            let mut dec = Decoder::new(&model, batch);
            let mut cache = Cache::new(&model, batch);
            let mut logits = vec![0.0f32; batch * model.config.vocab_size];
            let ids: Vec<usize> = (0..batch).map(|b| 5 + 7 * b).collect();
            // One step first, as a generation loop has made its decoder, cache and logits buffer.
            pool.install(|| dec.step(&ids, &mut cache, &mut logits));
            let t = pool.install(|| {
                count(&[], || {
                    for _ in 0..20 {
                        dec.step(&ids, &mut cache, &mut logits);
                    }
                })
            });
            assert_eq!(
                t.count, 0,
                "{name}, batch {batch}: 20 steps made {} allocations (largest {} bytes; the first: {:?})",
                t.count, t.largest, t.sizes
            );
            assert!(logits.iter().all(|v| v.is_finite()), "{name}: non-finite logits");
        }
    }
}

#[test]
fn training_step_allocates_no_parameter_sized_buffer_after_the_first() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // On a one-thread pool. Each thread keeps its own buffer pool, and with work stealing which
    // thread runs which task changes from step to step, so on more threads a thread may meet a
    // kind of task for the first time a few steps in, and fill its pool then. One thread makes
    // "after the first step" exact and the test deterministic.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a rayon pool");
    pool.broadcast(|_| ());
    let cases = configs().into_iter().flat_map(|c| [(c.clone(), false), (c, true)]);
    for ((name, cfg), adapted) in cases {
        let mut model = MambaLM::new(cfg, 4).expect("valid config");
        if adapted {
            // The frozen base's sizes stay watched: no gradient buffer may be made for them.
            attach_adapters(&mut model);
        }
        let name = format!("{name}{}", if adapted { " with LoRA" } else { "" });
        let (batch, seqlen) = (2, 19);
        let ids: Vec<usize> = (0..batch * seqlen).map(|i| (i * 13 + 5) % 61).collect();
        let mut grads = Grads::new(&model.params);
        let step = |grads: &mut Grads| {
            grads.zero();
            let mut tape = Tape::new(&model.params);
            let (_, loss) = model.forward_loss(&mut tape, &ids, batch, seqlen);
            tape.backward(loss, grads);
        };
        // The byte size of every parameter of 512 or more values: a buffer of exactly that size
        // is a gradient, a per-task partial gradient or a repacked weight. (Smaller parameters,
        // such as a norm weight, share their size with a row of activations.)
        let mut watch: Vec<usize> = model
            .params
            .iter()
            .map(|(id, _)| model.params.value(id).len())
            .filter(|&n| n >= 512)
            .map(|n| n * size_of::<f32>())
            .collect();
        watch.sort_unstable();
        watch.dedup();
        let t = pool.install(|| {
            step(&mut grads);
            count(&watch, || {
                for _ in 0..3 {
                    step(&mut grads);
                }
            })
        });
        assert_eq!(
            t.hits, 0,
            "{name}: 3 training steps after the first made {} allocations the size of a parameter \
             (bytes: {:?}; parameter sizes {watch:?}); {} allocations in all, the largest {} \
             bytes. Run with BT=1 to see where they come from.",
            t.hits, t.hit_sizes, t.count, t.largest
        );
    }
}
