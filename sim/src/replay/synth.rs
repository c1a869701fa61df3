//! A synthetic Postfix log for measuring the replay at scale (`gatekeeper-sim synth-log`):
//! a week of a busy MX, seeded, in the exact line formats of Postfix 3.7's smtpd, cleanup,
//! qmgr and virtual. The mix: honest mail (60 %, one or two recipients, one in 200 with a typo),
//! bounces and backscatter from `<>` (25 %), dictionary spam (10 %), connections that say
//! nothing (5 %); clients drawn Zipf-like from 50,000 addresses (IPv4 and IPv6), the busiest
//! 2,000 of them MTAs that send mail (and bounces).

use std::io::{self, Write};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::time::civil;

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

fn stamp(ms: i64) -> String {
    let (_, mo, d, h, mi, s) = civil(ms);
    format!("{} {d:2} {h:02}:{mi:02}:{s:02}", MONTHS[(mo - 1) as usize])
}

/// Writes about `lines` lines starting at `start_ms` (spread over `span_ms`) to `out`; returns
/// the lines written.
pub fn write(out: &mut impl Write, lines: u64, start_ms: i64, span_ms: i64, seed: u64) -> io::Result<u64> {
    let mut r = SmallRng::seed_from_u64(seed);
    // About 6.7 lines a session (measured over the mix).
    let sessions = (lines * 10 / 67).max(1);
    let step = span_ms as f64 / sessions as f64;
    let mut written = 0u64;
    let mut qid: u64 = 0x1_0000_0000;
    let clients = 50_000u32;
    for i in 0..sessions {
        let t = start_ms + (i as f64 * step) as i64;
        let pid = 10_000 + (i % 400);
        // Zipf-like: a few big senders, a long tail.
        let u: f64 = r.random();
        let n = ((clients as f64).powf(u) as u32).min(clients - 1);
        let ip = if n % 10 == 9 {
            format!("2001:db8:{:x}::{:x}", n / 256, n % 256 + 1)
        } else {
            format!("198.{}.{}.{}", 18 + n / 65_024, (n / 254) % 256, n % 254 + 1)
        };
        let host = format!("h{n}.example.net[{ip}]");
        let (a, b, c) = (stamp(t), stamp(t + 1000), stamp(t + 2000));
        writeln!(out, "{a} mx postfix/smtpd[{pid}]: connect from {host}")?;
        // Each address keeps to one kind of traffic, as real clients do: the MTAs of the head
        // of the distribution send mail, the long tail is bounces, spam and scanners.
        let kind = if n < 2000 { r.random::<f64>() * 0.62 } else { (f64::from(n % 1000) + r.random::<f64>()) / 1000.0 };
        let mut n_lines = 2;
        if kind < 0.60 {
            let q = format!("{qid:X}");
            qid += 1;
            let typo = r.random_bool(0.005);
            let rcpts = if r.random_bool(0.2) { 2 } else { 1 };
            let from = format!("u{}@d{}.example.org", r.random_range(0..50), n % 997);
            if typo {
                writeln!(
                    out,
                    "{a} mx postfix/smtpd[{pid}]: NOQUEUE: reject: RCPT from {host}: 550 5.1.1 <aliec@example.test>: Recipient address rejected: User unknown in virtual mailbox table; from=<{from}> to=<aliec@example.test> proto=ESMTP helo=<h{n}.example.net>"
                )?;
                n_lines += 1;
            }
            writeln!(out, "{a} mx postfix/smtpd[{pid}]: {q}: client={host}")?;
            writeln!(out, "{a} mx postfix/cleanup[{}]: {q}: message-id=<{i}@d{}.example.org>", pid + 1000, n % 997)?;
            writeln!(
                out,
                "{b} mx postfix/qmgr[900]: {q}: from=<{from}>, size={}, nrcpt={rcpts} (queue active)",
                2000 + i % 5000
            )?;
            for k in 0..rcpts {
                let user = ["alice", "bob", "carol", "dave"][((i + k) % 4) as usize];
                writeln!(
                    out,
                    "{b} mx postfix/virtual[{}]: {q}: to=<{user}@example.test>, relay=virtual, delay=0.1, delays=0.05/0.01/0/0.04, dsn=2.0.0, status=sent (delivered to maildir)",
                    pid + 2000
                )?;
            }
            writeln!(out, "{b} mx postfix/qmgr[900]: {q}: removed")?;
            n_lines += 4 + rcpts;
            writeln!(
                out,
                "{c} mx postfix/smtpd[{pid}]: disconnect from {host} ehlo=1 mail=1 rcpt={rcpts} data=1 quit=1 commands={}",
                4 + rcpts
            )?;
        } else if kind < 0.85 {
            let rcpt = format!("x{}@example.test", r.random_range(0..1_000_000));
            writeln!(
                out,
                "{a} mx postfix/smtpd[{pid}]: NOQUEUE: reject: RCPT from {host}: 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table; from=<> to=<{rcpt}> proto=ESMTP helo=<h{n}.example.net>"
            )?;
            writeln!(
                out,
                "{c} mx postfix/smtpd[{pid}]: disconnect from {host} ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4"
            )?;
            n_lines += 1;
        } else if kind < 0.95 {
            let k = r.random_range(2..5);
            for _ in 0..k {
                let rcpt = format!("{}@example.test", r.random_range(0..1_000_000));
                writeln!(
                    out,
                    "{a} mx postfix/smtpd[{pid}]: NOQUEUE: reject: RCPT from {host}: 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table; from=<spam{}@spam.example> to=<{rcpt}> proto=ESMTP helo=<h{n}.example.net>",
                    n % 100
                )?;
            }
            writeln!(
                out,
                "{c} mx postfix/smtpd[{pid}]: disconnect from {host} ehlo=1 mail=1 rcpt=0/{k} quit=1 commands=3/{}",
                3 + k
            )?;
            n_lines += k;
        } else {
            writeln!(out, "{c} mx postfix/smtpd[{pid}]: disconnect from {host} ehlo=1 quit=1 commands=2")?;
        }
        written += n_lines;
    }
    Ok(written)
}
