//! Numbers and durations for humans, as the reports and the terminal print them.
//!
//! A leaf: it knows no other module of the crate. It only formats; what a number means is up to
//! the caller.

/// A number for humans: integers without decimals, with thousands separators; others with
/// up to three significant decimals.
pub fn num(v: f64) -> String {
    if v.is_nan() {
        return "n/a".into();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        let s = format!("{}", v.abs() as u64);
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        return if v < 0.0 { format!("-{out}") } else { out };
    }
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Seconds for humans.
pub fn secs(s: f64) -> String {
    match s {
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} d", s / 86_400.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(54_000.0), "54,000");
        assert_eq!(num(0.0), "0");
        assert_eq!(num(1234567.0), "1,234,567");
        assert_eq!(num(0.5), "0.5");
        assert_eq!(num(2.0 / 3.0), "0.667");
        assert_eq!(secs(30.0), "30.0 s");
        assert_eq!(secs(900.0), "15.0 min");
    }
}
