//! The built-in offline training text: generated, not copied from anywhere.
//!
//! Lines of small-number arithmetic (`37+8=45`, `12*7=84`, `90-13=77`) in a deterministic,
//! seeded order. A character model first learns the format, then the digits of the answers —
//! learning you can see in the loss and in the sample within a couple of minutes on two cores.

use mamba_train::data::Rng;

/// About `bytes` bytes of arithmetic lines generated from `seed`.
pub fn arithmetic(bytes: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut out = String::with_capacity(bytes + 16);
    while out.len() < bytes {
        let a = rng.below(100) as i64;
        let b = rng.below(100) as i64;
        let line = match rng.below(3) {
            0 => format!("{a}+{b}={}\n", a + b),
            1 => format!("{}-{b}={a}\n", a + b),
            _ => {
                let (a, b) = (a % 13, b % 13);
                format!("{a}*{b}={}\n", a * b)
            }
        };
        out.push_str(&line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_correct_and_deterministic() {
        let t = arithmetic(2000, 7);
        assert_eq!(t, arithmetic(2000, 7));
        assert_ne!(t, arithmetic(2000, 8));
        for line in t.lines() {
            let (lhs, rhs) = line.split_once('=').unwrap();
            let rhs: i64 = rhs.parse().unwrap();
            let val = if let Some((a, b)) = lhs.split_once('+') {
                a.parse::<i64>().unwrap() + b.parse::<i64>().unwrap()
            } else if let Some((a, b)) = lhs.split_once('-') {
                a.parse::<i64>().unwrap() - b.parse::<i64>().unwrap()
            } else {
                let (a, b) = lhs.split_once('*').unwrap();
                a.parse::<i64>().unwrap() * b.parse::<i64>().unwrap()
            };
            assert_eq!(val, rhs, "{line}");
        }
    }
}
