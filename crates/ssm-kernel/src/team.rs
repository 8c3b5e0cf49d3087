//! A team of threads that stay awake between the many small parallel calls of a decode step.
//!
//! A decode step of a small model is a chain of mat-vecs and recurrent steps of a few
//! microseconds each. Splitting one over rayon's pool wakes a sleeping worker every time, which
//! costs about as much as the work (so those kernels stay on one thread below
//! [`crate::matvec::PAR_MIN_MACS`]). A [`Team`] keeps its workers spinning for a short while
//! ([`SPIN`]) after each job, so the next job reaches them in well under a microsecond; after
//! that they sleep, so an idle team costs nothing.
//!
//! Kernels ask for the team with [`try_run`]: inside [`Team::install`] they split their work
//! into `parts` contiguous pieces over the team (or run it whole on the calling thread when it
//! is too small to split, [`MIN_WORK`]); outside it they use their rayon path.
//!
//! ```
//! use ssm_kernel::team::{self, Team};
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! let team = Team::new(2);
//! let sum = AtomicUsize::new(0);
//! team.install(|| {
//!     assert!(team::try_run(1 << 20, &|part, parts| {
//!         let r = team::part_range(100, part, parts, 1);
//!         sum.fetch_add(r.sum::<usize>(), Ordering::Relaxed);
//!     }));
//! });
//! assert_eq!(sum.into_inner(), 4950);
//! ```

use std::cell::Cell;
use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a worker spins for the next job before it sleeps.
pub const SPIN: Duration = Duration::from_micros(200);

/// Work (in multiply-adds; a kernel counts its other operations as so many multiply-adds)
/// below which [`try_run`] runs a job whole on the calling thread: handing a part to a
/// spinning worker costs a few hundred nanoseconds, about 8k multiply-adds from the caches.
pub const MIN_WORK: usize = 1 << 13;

/// Work from which [`try_run`] cuts a job into [`BIG_PARTS`] parts per thread: a mat-vec of
/// megabytes streams from memory, and a thread slowed by anything else then hands its
/// remaining parts to the others.
const BIG_WORK: usize = 1 << 20;

/// Parts per thread of a job of at least [`BIG_WORK`].
const BIG_PARTS: usize = 8;

/// A job: `f(part, parts)` does part `part` of `parts`.
type Job<'a> = dyn Fn(usize, usize) + Sync + 'a;

/// What the caller and the workers share.
struct Shared {
    /// Bumped once per job (and once to stop).
    epoch: AtomicU64,
    /// The current job; written before `epoch` is bumped, read after it is seen.
    job: UnsafeCell<*const Job<'static>>,
    /// The current job's epoch (bits 32–63), its number of parts (16–31) and its next
    /// unclaimed part (0–15).
    claims: AtomicU64,
    /// Parts of the current job done.
    done: AtomicUsize,
    /// Whether a worker's part panicked.
    panicked: AtomicBool,
    stop: AtomicBool,
    /// Workers asleep (or about to be), and what wakes them.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by `Team::run` (one at a time) before it opens the job's
// parts for claiming, and read by a worker only while it holds a claimed, unfinished part of
// that job, during which `run` does not return.
unsafe impl Sync for Shared {}
// SAFETY: as above; the pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// The calling thread plus `threads − 1` workers; see the [module docs](self).
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises [`Team::run`] calls from several threads.
    running: Mutex<()>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team").field("threads", &self.threads()).finish()
    }
}

thread_local! {
    /// The team installed on this thread ([`Team::install`]), if any, and the least work it
    /// splits.
    static CURRENT: Cell<(*const Team, usize)> = const { Cell::new((std::ptr::null(), MIN_WORK)) };
    /// Whether this thread is running a part of a team job (nested jobs run inline).
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

impl Team {
    /// A team of `threads` (at least 1): the caller of [`Team::run`] and `threads − 1` workers.
    ///
    /// # Panics
    /// If a worker thread cannot be spawned.
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(std::ptr::null::<fn(usize, usize)>() as *const Job<'static>),
            claims: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        // Every worker is running before `new` returns: a thread allocates as it starts, which
        // would otherwise land in the first jobs.
        let started = Arc::new(Barrier::new(threads.max(1)));
        let workers = (1..threads.max(1))
            .map(|part| {
                let (s, started) = (Arc::clone(&shared), Arc::clone(&started));
                std::thread::Builder::new()
                    .name(format!("mamba-team-{part}"))
                    .spawn(move || {
                        IN_JOB.with(|c| c.set(true));
                        started.wait();
                        worker(&s)
                    })
                    .expect("spawning a decode team thread")
            })
            .collect();
        started.wait();
        Self { shared, workers, running: Mutex::new(()) }
    }

    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f` with this team installed on the calling thread, so [`try_run`] uses it for
    /// work of at least [`MIN_WORK`].
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        self.install_splitting_from(MIN_WORK, f)
    }

    /// [`Team::install`] splitting work from `min_work` on (tests split the smallest jobs).
    pub fn install_splitting_from<R>(&self, min_work: usize, f: impl FnOnce() -> R) -> R {
        struct Restore((*const Team, usize));
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace((self, min_work))));
        f()
    }

    /// Runs `f(part, parts)` for every `part < parts` (`parts` = [`Team::threads`]) and returns
    /// when all are done. Parts go to whichever thread claims them first, the caller included,
    /// so a worker the OS has not scheduled delays nothing: the caller does its part too. A
    /// call from inside a part runs `f(0, 1)` inline.
    ///
    /// # Panics
    /// If a part panicked (after all parts are done).
    pub fn run(&self, f: &Job<'_>) {
        self.run_parts(f, self.threads());
    }

    /// [`Team::run`] in `parts` parts (at least 1), claimed by the threads as they come free —
    /// more parts than threads even out threads that run at different speeds.
    ///
    /// # Panics
    /// If a part panicked (after all parts are done).
    pub fn run_parts(&self, f: &Job<'_>, parts: usize) {
        let parts = parts.clamp(1, 0xffff);
        if self.threads() == 1 || parts == 1 || IN_JOB.with(Cell::get) {
            return f(0, 1);
        }
        let _one_at_a_time = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: no worker runs a part of the previous job any more (all its parts were done
        // before the last `run` returned) and a late one cannot claim a part of this one
        // before seeing the epoch below; `run` does not return before every part of this job
        // is done, so `f` outlives its uses (the lifetime is erased only for the store).
        unsafe { *s.job.get() = std::mem::transmute::<*const Job<'_>, *const Job<'static>>(f) };
        s.done.store(0, Ordering::Relaxed);
        let epoch = s.epoch.load(Ordering::Relaxed) + 1;
        s.claims.store((epoch << 32) | ((parts as u64) << 16), Ordering::SeqCst);
        s.epoch.store(epoch, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mut first_panic = None;
        IN_JOB.with(|c| c.set(true));
        while let Some((part, _)) = s.claim(epoch) {
            if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(part, parts))) {
                first_panic.get_or_insert(e);
            }
            s.done.fetch_add(1, Ordering::Release);
        }
        IN_JOB.with(|c| c.set(false));
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < parts {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if let Some(e) = first_panic {
            std::panic::resume_unwind(e);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a decode team thread panicked in its part of a kernel");
        }
    }
}

impl Shared {
    /// Claims the next unclaimed part of job `epoch`, if any is left (and the job is still
    /// that one): `(part, parts)`.
    fn claim(&self, epoch: u64) -> Option<(usize, usize)> {
        let mut cur = self.claims.load(Ordering::Acquire);
        loop {
            let (next, parts) = ((cur & 0xffff) as usize, ((cur >> 16) & 0xffff) as usize);
            if cur >> 32 != epoch & 0xffff_ffff || next >= parts {
                return None;
            }
            match self.claims.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some((next, parts)),
                Err(c) => cur = c,
            }
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A worker's loop: wait for a new epoch (spinning, then asleep), run its part, report.
fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            // Sleep until the epoch moves (checked under the lock the waker takes).
            let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.epoch.load(Ordering::SeqCst) == seen {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        while let Some((part, parts)) = s.claim(seen) {
            // SAFETY: read only with a part of job `seen` claimed: the job was written before
            // the claims were opened (the claim synchronises with that store), and `run`
            // neither returns nor writes the next job before this part is done.
            let f = unsafe { &**s.job.get() };
            if catch_unwind(AssertUnwindSafe(|| f(part, parts))).is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
            s.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// With a team installed on this thread ([`Team::install`]): runs `f(part, parts)` over it when
/// `work ≥` [`MIN_WORK`] (or the installed threshold; else `f(0, 1)` here) and returns `true`; inside a part of a team job,
/// runs `f(0, 1)` and returns `true`. Otherwise returns `false` and runs nothing, for the
/// caller to take its own path.
pub fn try_run(work: usize, f: &Job<'_>) -> bool {
    if IN_JOB.with(Cell::get) {
        // Inside a part of a team job: the team is busy; this part runs whole.
        f(0, 1);
        return true;
    }
    let (team, min_work) = CURRENT.with(Cell::get);
    if team.is_null() {
        return false;
    }
    if work >= min_work {
        // SAFETY: `install` keeps the team borrowed while it is current.
        let team = unsafe { &*team };
        let per_thread = if work >= BIG_WORK { BIG_PARTS } else { 1 };
        team.run_parts(f, team.threads() * per_thread);
    } else {
        f(0, 1);
    }
    true
}

/// Part `part` of `0..n` cut into `parts` contiguous ranges whose starts are multiples of
/// `align` (the last range takes the remainder; some may be empty).
pub fn part_range(n: usize, part: usize, parts: usize, align: usize) -> std::ops::Range<usize> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let at = |p: usize| (units * p / parts.max(1) * align).min(n);
    at(part)..at(part + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_and_ranges_tile_the_whole() {
        for threads in [1, 2, 3] {
            let team = Team::new(threads);
            for round in 0..200 {
                let n = 1 + round * 7 % 101;
                // As many parts as threads, and more (claimed as threads come free).
                for parts in [threads, 7] {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    let seen = AtomicUsize::new(0);
                    team.run_parts(
                        &|part, ps| {
                            seen.fetch_max(ps, Ordering::Relaxed);
                            for i in part_range(n, part, ps, 8) {
                                hits[i].fetch_add(1, Ordering::Relaxed);
                            }
                        },
                        parts,
                    );
                    let all_once = hits.iter().all(|h| h.load(Ordering::Relaxed) == 1);
                    assert!(all_once, "threads {threads}, parts {parts}, n {n}");
                    let want = if threads == 1 { 1 } else { parts };
                    assert_eq!(seen.load(Ordering::Relaxed), want, "threads {threads}: parts seen");
                }
            }
        }
        assert_eq!(part_range(10, 0, 3, 4), 0..4);
        assert_eq!(part_range(10, 2, 3, 4), 8..10);
    }

    #[test]
    fn sleeping_workers_wake_for_the_next_job() {
        let team = Team::new(2);
        let count = AtomicUsize::new(0);
        for _ in 0..3 {
            std::thread::sleep(SPIN * 3);
            team.run(&|_, _| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(count.into_inner(), 6);
    }

    #[test]
    fn try_run_uses_the_installed_team_only() {
        let team = Team::new(2);
        let parts = AtomicUsize::new(0);
        let f = |_: usize, n: usize| {
            parts.fetch_max(n, Ordering::Relaxed);
        };
        assert!(!try_run(MIN_WORK, &f), "no team installed");
        assert!(team.install(|| try_run(MIN_WORK - 1, &f)));
        assert_eq!(parts.load(Ordering::Relaxed), 1, "small work runs whole");
        assert!(team.install(|| try_run(MIN_WORK, &f)));
        assert_eq!(parts.load(Ordering::Relaxed), 2);
        // Nested: a part's own try_run runs inline.
        let inner = AtomicUsize::new(0);
        team.install(|| {
            try_run(MIN_WORK, &|_, _| {
                try_run(MIN_WORK, &|_, n| {
                    inner.fetch_max(n, Ordering::Relaxed);
                });
            })
        });
        assert_eq!(inner.into_inner(), 1);
    }

    #[test]
    fn a_panicking_part_panics_the_caller_and_the_team_goes_on() {
        let team = Team::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.run(&|part, _| assert_ne!(part, 1, "part 1 fails"));
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        team.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.into_inner(), 2);
    }
}
