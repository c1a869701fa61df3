//! Criterion bench of the kernel `recent` table model (`gatekeeper::gate`): the G1 path,
//! `Gate::check` (ban-table check, rate-table check, then set/add), over 1 M distinct IPv4
//! sources, for both kinds, with tables sized to hold them all.
//!
//! Simulated time advances 100 µs per attempt, so one pass over the 1 M sources spans 100 s,
//! longer than the 60 s window: in the steady state every attempt finds its source's entry
//! expired and is accepted (xt_recent: a stamp pushed and an LRU move; nft: the element was
//! garbage-collected, so a fresh insert). A third case shows the default 100-entry xt table
//! evicting on every attempt. Bytes per entry come from `Gate::memory_bytes`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gatekeeper::gate::{Gate, GateConfig, GateKind};

const SOURCES: u32 = 1_000_000;
const STEP: Duration = Duration::from_micros(100);

fn source(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

/// A gate that has seen every source once.
fn warmed(kind: GateKind, origin: Instant) -> (Gate, Instant) {
    let mut gate = Gate::new(GateConfig { kind, ..GateConfig::default() }, origin);
    let mut now = origin;
    for i in 0..SOURCES {
        black_box(gate.check(now, source(i)));
        now += STEP;
    }
    (gate, now)
}

fn report(name: &str, when: &str, gate: &Gate) {
    let entries = gate.rate_len();
    let bytes = gate.memory_bytes();
    println!(
        "{name} ({when}): {entries} entries, {:.1} MiB, {:.1} bytes/entry",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / entries.max(1) as f64
    );
}

fn check_and_set(c: &mut Criterion) {
    let mut group = c.benchmark_group("gate_check");
    group.throughput(Throughput::Elements(1));
    let cases = [
        ("xt_recent_1M", GateKind::XtRecent { ip_list_tot: 1 << 20, hz: 250 }),
        ("nft_1M", GateKind::Nft { size: 1 << 20, hz: 250 }),
        ("xt_recent_100_evicting", GateKind::default()),
    ];
    for (name, kind) in cases {
        let origin = Instant::now();
        let (mut gate, mut now) = warmed(kind, origin);
        report(name, "after one pass", &gate);
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                let d = gate.check(now, source(i));
                i = if i + 1 == SOURCES { 0 } else { i + 1 };
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
