//! Buffers reused from one training step to the next, so ops do not allocate their
//! parameter-sized temporaries (the scans' `A`/`dA` and checkpoints, RMSNorm's `dw` partials)
//! every step. One pool per thread; a buffer taken on one thread and given back on another
//! simply moves pools.

use std::cell::RefCell;

thread_local! {
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A zeroed buffer of `n` floats: a pooled one when one is large enough, else a new one.
pub fn take(n: usize) -> Vec<f32> {
    let reused = FREE.with(|f| {
        let mut f = f.borrow_mut();
        let i = f.iter().position(|v| v.capacity() >= n)?;
        Some(f.swap_remove(i))
    });
    let mut v = reused.unwrap_or_default();
    v.clear();
    v.resize(n, 0.0);
    v
}

/// Returns a buffer to the pool (kept for reuse; at most 64 are kept per thread).
pub fn give(v: Vec<f32>) {
    if v.capacity() > 0 {
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < 64 {
                f.push(v);
            }
        });
    }
}
#[cfg(test)]
mod tests {
    #[test]
    fn a_given_buffer_is_reused_zeroed() {
        let mut v = super::take(100);
        v[3] = 7.0;
        let ptr = v.as_ptr();
        super::give(v);
        let w = super::take(60);
        assert_eq!(w.as_ptr(), ptr, "the pooled allocation is reused");
        assert_eq!(w.len(), 60);
        assert!(w.iter().all(|&x| x == 0.0), "a reused buffer comes back zeroed");
    }
}
