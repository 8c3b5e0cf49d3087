//! Value parsers for flags that clap's built-in ones do not cover: each rejects, with a message
//! clap prints next to the flag's name, values that would make the command misbehave later.

use clap::builder::RangedU64ValueParser;

/// A whole number ≥ 1.
pub fn at_least_one() -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::<usize>::new().range(1..)
}

fn finite<T: std::str::FromStr + Into<f64> + Copy>(s: &str) -> Result<T, String> {
    let v: T = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !v.into().is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(v)
}

/// A finite number > 0 (`f32`).
pub fn positive_f32(s: &str) -> Result<f32, String> {
    let v: f32 = finite(s)?;
    if v > 0.0 { Ok(v) } else { Err(format!("must be greater than 0, got {s}")) }
}

/// A finite number > 0 (`f64`).
pub fn positive_f64(s: &str) -> Result<f64, String> {
    let v: f64 = finite(s)?;
    if v > 0.0 { Ok(v) } else { Err(format!("must be greater than 0, got {s}")) }
}

/// A finite number ≥ 0 (`f32`).
pub fn non_negative_f32(s: &str) -> Result<f32, String> {
    let v: f32 = finite(s)?;
    if v >= 0.0 { Ok(v) } else { Err(format!("must be 0 or more, got {s}")) }
}

/// A probability in (0, 1].
pub fn probability(s: &str) -> Result<f32, String> {
    let v: f32 = finite(s)?;
    if v > 0.0 && v <= 1.0 { Ok(v) } else { Err(format!("must be in (0, 1], got {s}")) }
}

/// `--dtype`: a weight format (`f32`, `bf16`, `f16`, `q8`).
pub fn weight_format(s: &str) -> Result<mamba_nn::model::WeightFormat, String> {
    s.parse::<mamba_nn::model::WeightFormat>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_reject_what_would_misbehave() {
        assert_eq!(positive_f32("3e-3"), Ok(3e-3));
        for bad in ["0", "-1", "nan", "inf", "x", ""] {
            assert!(positive_f32(bad).is_err() && positive_f64(bad).is_err(), "{bad}");
        }
        assert_eq!(non_negative_f32("0"), Ok(0.0));
        assert!(non_negative_f32("-0.1").is_err() && non_negative_f32("NaN").is_err());
        assert_eq!(probability("1"), Ok(1.0));
        for bad in ["0", "1.5", "-0.2", "nan"] {
            assert!(probability(bad).is_err(), "{bad}");
        }
    }
}
