//! The workspace's one pseudo-random generator: SplitMix64.
//!
//! SplitMix64 (Steele, Lea & Flood 2014) advances a 64-bit state by a Weyl sequence and mixes
//! it. It is small, fast and statistically good enough for initialisation, sampling training
//! windows and filling test tensors, and its whole state is one `u64`, so a trainer checkpoints
//! it with [`SplitMix64::state`] and resumes with [`SplitMix64::from_state`].
//!
//! ```
//! use ssm_kernel::rng::SplitMix64;
//! let mut r = SplitMix64::new(1234567);
//! let first = r.next_u64();
//! let mut again = SplitMix64::new(1234567);
//! assert_eq!(again.next_u64(), first);
//! ```

/// SplitMix64: `state += 0x9E37_79B9_7F4A_7C15`, then the output is the mixed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// The Weyl increment (the golden ratio in 64-bit fixed point).
    pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// A generator seeded with `seed` (every seed, including 0, is fine; the state starts at
    /// `seed`).
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The generator whose [`SplitMix64::state`] was `state`: it continues the same sequence.
    pub fn from_state(state: u64) -> Self {
        Self { state }
    }

    /// The whole state.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(Self::GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_and_resume() {
        // Reference values of SplitMix64 with seed 1234567 (from the original C implementation).
        let mut r = SplitMix64::new(1234567);
        for want in [6457827717110365317u64, 3203168211198807973, 9817491932198370423] {
            assert_eq!(r.next_u64(), want);
        }
        let mut resumed = SplitMix64::from_state(r.state());
        assert_eq!(resumed.next_u64(), r.next_u64());
        assert_eq!(resumed, r);
    }
}
