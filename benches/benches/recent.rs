//! Criterion bench of the kernel `recent` table model (`gatekeeper::gate`): the G1 path,
//! `Gate::check` (ban-table check, rate-table check, then set/add), over 2^20 (≈1 M) distinct
//! IPv4 sources, for both kinds, with tables sized to hold them all.
//!
//! Simulated time advances 100 µs per attempt, so one pass over the sources spans 105 s,
//! longer than the 60 s window: in the steady state every attempt finds its source's entry
//! stale and is accepted (xt_recent: a stamp pushed and an LRU move; nft: the element was
//! garbage-collected, so a fresh insert). Sources come in address order (neighbours share
//! index cache lines) or in a scattered order (every attempt a cache miss). A last case shows
//! the default 100-entry xt table evicting on every attempt. Bytes per entry come from
//! `Gate::memory_bytes`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gatekeeper::gate::{Gate, GateConfig, GateKind};

const SOURCES: u32 = 1 << 20;
const STEP: Duration = Duration::from_micros(100);

/// The `i`th source: in address order, or scattered by a bijection of `0..SOURCES`.
fn source(i: u32, scattered: bool) -> IpAddr {
    let n = if scattered { i.wrapping_mul(0x9e37_79b1) & (SOURCES - 1) } else { i };
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

/// A gate that has seen every source once.
fn warmed(kind: GateKind, scattered: bool, origin: Instant) -> (Gate, Instant) {
    let mut gate = Gate::new(GateConfig { kind, ..GateConfig::default() }, origin);
    let mut now = origin;
    for i in 0..SOURCES {
        black_box(gate.check(now, source(i, scattered)));
        now += STEP;
    }
    (gate, now)
}

fn report(name: &str, when: &str, gate: &Gate) {
    let entries = gate.rate_len();
    let bytes = gate.memory_bytes();
    println!(
        "{name} ({when}): {entries} entries, {:.1} MiB, {:.1} bytes/entry",
        bytes as f64 / f64::from(1 << 20),
        bytes as f64 / entries.max(1) as f64
    );
}

fn check_and_set(c: &mut Criterion) {
    let mut group = c.benchmark_group("gate_check");
    group.throughput(Throughput::Elements(1));
    let xt = GateKind::XtRecent { ip_list_tot: SOURCES, hz: 250 };
    let nft = GateKind::Nft { size: SOURCES, hz: 250 };
    let cases = [
        ("xt_recent_1M", xt.clone(), false),
        ("nft_1M", nft.clone(), false),
        ("xt_recent_1M_scattered", xt, true),
        ("nft_1M_scattered", nft, true),
        ("xt_recent_100_evicting", GateKind::default(), false),
    ];
    for (name, kind, scattered) in cases {
        let origin = Instant::now();
        let (mut gate, mut now) = warmed(kind, scattered, origin);
        report(name, "after one pass", &gate);
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                let d = gate.check(now, source(i, scattered));
                i = (i + 1) & (SOURCES - 1);
                now += STEP;
                black_box(d)
            })
        });
        report(name, "after the run", &gate);
    }
    group.finish();
}

criterion_group!(benches, check_and_set);
criterion_main!(benches);
