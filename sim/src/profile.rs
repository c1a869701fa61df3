//! Randomness drawn from the seed: per-component generators, piecewise-linear rate profiles
//! with Poisson arrivals, and skewed address choice.
//!
//! Every component gets its own `SmallRng` derived from the run seed and a stable tag, so
//! adding a component never shifts another's numbers. Nothing here reads a clock or the OS's
//! randomness.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A generator for the component named `tag` (and index `i`) of a run with `seed`.
pub fn rng(seed: u64, tag: &str, i: u64) -> SmallRng {
    // FNV-1a over the tag, then splitmix64 with the seed and index: stable across platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tag.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = seed ^ h.rotate_left(17) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    SmallRng::seed_from_u64(z ^ (z >> 31))
}

/// A piecewise-linear rate over time (events per hour), the last value held.
#[derive(Debug, Clone)]
pub struct Profile {
    points: Vec<(f64, f64)>,
    max: f64,
}

impl Profile {
    /// From `(time, per_hour)` points, each rate multiplied by a factor in `1 ± jitter`.
    pub fn new(points: &[(Duration, f64)], jitter: f64, rng: &mut SmallRng) -> Profile {
        let points: Vec<(f64, f64)> = points
            .iter()
            .map(|&(t, r)| {
                let f = if jitter > 0.0 { rng.random_range(1.0 - jitter..=1.0 + jitter) } else { 1.0 };
                (t.as_secs_f64(), r * f / 3600.0)
            })
            .collect();
        let max = points.iter().map(|p| p.1).fold(0.0, f64::max);
        Profile { points, max }
    }

    /// Events per second at `t` seconds.
    pub fn rate(&self, t: f64) -> f64 {
        let Some(first) = self.points.first() else { return 0.0 };
        if t <= first.0 {
            return first.1;
        }
        for w in self.points.windows(2) {
            let ((t0, r0), (t1, r1)) = (w[0], w[1]);
            if t < t1 {
                return r0 + (r1 - r0) * (t - t0) / (t1 - t0);
            }
        }
        self.points.last().map_or(0.0, |p| p.1)
    }

    /// The next arrival after `t` (seconds) of a Poisson process with this rate (thinning),
    /// or `None` if it would come at or after `end`.
    pub fn next_arrival(&self, mut t: f64, end: f64, rng: &mut SmallRng) -> Option<f64> {
        if self.max <= 0.0 {
            return None;
        }
        loop {
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            t += -u.ln() / self.max;
            if t >= end {
                return None;
            }
            if rng.random_range(0.0..self.max) < self.rate(t) {
                return Some(t);
            }
        }
    }

    /// Expected number of events in `[0, end)` seconds (for sizing and tests).
    pub fn expected(&self, end: f64) -> f64 {
        let steps = 10_000;
        let dt = end / steps as f64;
        (0..steps).map(|i| self.rate((i as f64 + 0.5) * dt) * dt).sum()
    }
}

/// Picks one of `n` items, uniformly or Zipf-like (`weight(i) = 1 / (i + 1)^skew`).
#[derive(Debug, Clone)]
pub struct Chooser {
    n: u32,
    cumulative: Vec<f64>,
}

impl Chooser {
    /// Over `n` items with `skew` (0: uniform).
    pub fn new(n: u32, skew: f64) -> Chooser {
        let cumulative = if skew == 0.0 {
            Vec::new()
        } else {
            let mut acc = 0.0;
            (0..n)
                .map(|i| {
                    acc += 1.0 / f64::from(i + 1).powf(skew);
                    acc
                })
                .collect()
        };
        Chooser { n, cumulative }
    }

    /// One index.
    pub fn pick(&self, rng: &mut SmallRng) -> u32 {
        match self.cumulative.last() {
            None => rng.random_range(0..self.n),
            Some(&total) => {
                let x = rng.random_range(0.0..total);
                self.cumulative.partition_point(|&c| c <= x).min(self.n as usize - 1) as u32
            }
        }
    }
}

/// A random local part that no simulated user has (`users` are `user<n>`, `u<n>`, names).
pub fn random_local(rng: &mut SmallRng, len: usize) -> String {
    const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
    let mut s = String::with_capacity(len + 1);
    s.push('x');
    for _ in 0..len {
        s.push(ALPHA[rng.random_range(0..ALPHA.len())] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_interpolate_and_hold() {
        let mut r = rng(1, "t", 0);
        let p = Profile::new(&[(Duration::ZERO, 3600.0), (Duration::from_secs(3600), 7200.0)], 0.0, &mut r);
        assert!((p.rate(0.0) - 1.0).abs() < 1e-12);
        assert!((p.rate(1800.0) - 1.5).abs() < 1e-12);
        assert!((p.rate(99_999.0) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn arrivals_follow_the_rate() {
        let mut r = rng(7, "arrivals", 0);
        let p = Profile::new(&[(Duration::ZERO, 4500.0)], 0.0, &mut r);
        let (mut t, mut n) = (0.0, 0);
        while let Some(next) = p.next_arrival(t, 12.0 * 3600.0, &mut r) {
            t = next;
            n += 1;
        }
        let expected = p.expected(12.0 * 3600.0);
        assert!((expected - 54_000.0).abs() < 1.0);
        assert!((n as f64 - expected).abs() < 4.0 * expected.sqrt(), "{n} vs {expected}");
    }

    #[test]
    fn generators_are_independent_and_stable() {
        let a: u64 = rng(1, "a", 0).random();
        assert_eq!(a, rng(1, "a", 0).random::<u64>());
        assert_ne!(a, rng(1, "b", 0).random::<u64>());
        assert_ne!(a, rng(1, "a", 1).random::<u64>());
        assert_ne!(a, rng(2, "a", 0).random::<u64>());
    }

    #[test]
    fn skew_favours_the_first() {
        let mut r = rng(3, "skew", 0);
        let c = Chooser::new(100, 1.2);
        let first = (0..10_000).filter(|_| c.pick(&mut r) == 0).count();
        assert!(first > 2_000, "{first}");
        let u = Chooser::new(100, 0.0);
        assert!((0..1000).all(|_| u.pick(&mut r) < 100));
    }
}
