//! Sessions from events: a client's connection with its HELO, its transactions (sender,
//! recipients and what the MTA answered each) and the log lines that showed them.
//!
//! Streaming and bounded: a session is kept only while it may still grow (open, or closed but
//! waiting for its queued messages' delivery lines, at most [`HOLD`] of log time), then
//! released in order of its start, once no session still held started earlier. What is held
//! is the log's concurrency, never its length.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::IpAddr;

use super::event::{Commands, Event, Key, Stage};

/// Where a line is: input file number and line number (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Loc {
    /// Index into the input files.
    pub file: u16,
    /// Line number.
    pub line: u32,
}

/// One recipient as the client gave it, and the MTA's answer (250: accepted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rcpt {
    /// The address.
    pub addr: Box<str>,
    /// The MTA's reply code.
    pub code: u16,
}

/// One transaction (MAIL FROM ... ) of a session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// The sender (empty: `<>`); unknown if the log never said.
    pub from: Option<Box<str>>,
    /// Recipients in the order seen.
    pub rcpts: Vec<Rcpt>,
    /// The MTA's queue id.
    pub qid: Option<Box<str>>,
    /// The MTA took the message into its queue.
    pub queued: bool,
    /// The MTA refused the whole transaction at MAIL or at the end of DATA: (stage, code).
    pub refused: Option<(Stage, u16)>,
    /// Recipients in the queued message (qmgr `nrcpt`, sendmail `nrcpts`).
    pub nrcpt: Option<u32>,
    /// Distinct recipients the delivery lines named so far.
    pub delivered: u32,
    /// No more delivery lines are expected.
    pub complete: bool,
}

impl Txn {
    /// The recipients the MTA accepted.
    pub fn accepted(&self) -> impl Iterator<Item = &Rcpt> {
        self.rcpts.iter().filter(|r| r.code / 100 == 2)
    }
}

/// A client's connection as the log showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedSession {
    /// When it began (ms since the epoch).
    pub start_ms: i64,
    /// When it ended, as far as the log says.
    pub end_ms: i64,
    /// The client.
    pub client: IpAddr,
    /// Its HELO name, if a line gave it.
    pub helo: Option<Box<str>>,
    /// Its transactions.
    pub txns: Vec<Txn>,
    /// The MTA refused the connection (or HELO) with this code.
    pub refused: Option<u16>,
    /// Postfix's command counts.
    pub commands: Option<Commands>,
    /// The lines that showed it: the first, then refusals and queued messages (at most
    /// [`LINES_KEPT`]).
    pub lines: Vec<Loc>,
}

/// Lines kept per session.
pub const LINES_KEPT: usize = 12;
/// How long (log time) a closed session waits for its messages' delivery lines.
pub const HOLD_MS: i64 = 15 * 60 * 1000;
/// A session silent this long (log time) without a disconnect line is closed.
pub const IDLE_MS: i64 = 15 * 60 * 1000;

#[derive(Debug)]
struct Open {
    s: LoggedSession,
    key: Key,
    generation: u32,
    closed: bool,
    last_ms: i64,
}

/// Counts of what the assembler did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AsmStats {
    /// Sessions released.
    pub sessions: u64,
    /// postscreen connections handed to smtpd (their smtpd session is the one replayed).
    pub passed: u64,
    /// Sessions closed without a disconnect line (idle, or the process served another client).
    pub unterminated: u64,
    /// Queue or reject lines for a message whose session was never seen.
    pub orphans: u64,
    /// Most sessions held at once.
    pub held_max: u64,
}

/// Builds sessions from events, in log order.
#[derive(Debug, Default)]
pub struct Assembler {
    by_key: HashMap<Key, usize>,
    slots: Vec<Option<Open>>,
    free: Vec<usize>,
    gens: u32,
    qids: HashMap<Box<str>, (usize, u32, usize)>,
    ready: BinaryHeap<Reverse<(i64, u64, usize)>>,
    done: Vec<Option<LoggedSession>>,
    done_free: Vec<usize>,
    seq: u64,
    now_ms: i64,
    last_sweep_ms: i64,
    held: u64,
    /// The earliest start among held sessions at the last sweep (pop releases up to it).
    held_min: Option<i64>,
    /// What it did.
    pub stats: AsmStats,
}

impl Assembler {
    /// An empty assembler.
    pub fn new() -> Assembler {
        Assembler::default()
    }

    fn open(&mut self, key: Key, client: IpAddr, at_ms: i64, loc: Loc) -> usize {
        if let Some(&old) = self.by_key.get(&key) {
            // The process serves a new client: the old session ended without a disconnect.
            self.stats.unterminated += 1;
            self.finish_slot(old);
        }
        self.gens = self.gens.wrapping_add(1);
        let open = Open {
            s: LoggedSession {
                start_ms: at_ms,
                end_ms: at_ms,
                client,
                helo: None,
                txns: Vec::new(),
                refused: None,
                commands: None,
                lines: vec![loc],
            },
            key,
            generation: self.gens,
            closed: false,
            last_ms: at_ms,
        };
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(open);
                i
            }
            None => {
                self.slots.push(Some(open));
                self.slots.len() - 1
            }
        };
        self.by_key.insert(key, slot);
        self.held += 1;
        self.stats.held_max = self.stats.held_max.max(self.held);
        slot
    }

    /// The open session of `key`, or a new one for `client` (a log that starts mid-session,
    /// or sendmail's, which logs no connect line).
    fn session(&mut self, key: Key, client: Option<IpAddr>, at_ms: i64, loc: Loc) -> Option<usize> {
        if let Some(&slot) = self.by_key.get(&key) {
            let o = self.slots[slot].as_ref().expect("live slot");
            match client {
                Some(c) if c != o.s.client => {}
                _ => return Some(slot),
            }
        }
        Some(self.open(key, client?, at_ms, loc))
    }

    fn slot_of_qid(&self, qid: &str) -> Option<(usize, usize)> {
        let &(slot, generation, txn) = self.qids.get(qid)?;
        let o = self.slots.get(slot)?.as_ref()?;
        (o.generation == generation).then_some((slot, txn))
    }

    fn note(o: &mut Open, at_ms: i64, loc: Loc) {
        o.last_ms = o.last_ms.max(at_ms);
        if !o.closed {
            o.s.end_ms = o.s.end_ms.max(at_ms);
        }
        if o.s.lines.len() < LINES_KEPT && o.s.lines.last() != Some(&loc) {
            o.s.lines.push(loc);
        }
    }

    /// One event at `at_ms` from line `loc`.
    pub fn feed(&mut self, at_ms: i64, ev: Event<'_>, loc: Loc) {
        self.now_ms = self.now_ms.max(at_ms);
        match ev {
            Event::Connect { key, client } => {
                let same = self
                    .by_key
                    .get(&key)
                    .and_then(|&s| self.slots[s].as_ref())
                    .is_some_and(|o| o.s.client == client && !o.closed);
                if same {
                    let slot = self.by_key[&key];
                    let o = self.slots[slot].as_mut().expect("live slot");
                    o.last_ms = o.last_ms.max(at_ms);
                    o.s.end_ms = o.s.end_ms.max(at_ms);
                } else {
                    self.open(key, client, at_ms, loc);
                }
            }
            Event::Disconnect { key, commands } => {
                if let Some(slot) = self.by_key.remove(&key) {
                    let o = self.slots[slot].as_mut().expect("live slot");
                    o.s.end_ms = o.s.end_ms.max(at_ms);
                    o.last_ms = o.last_ms.max(at_ms);
                    o.closed = true;
                    o.s.commands = commands;
                }
            }
            Event::Passed { key } => {
                if let Some(slot) = self.by_key.remove(&key) {
                    self.drop_slot(slot);
                    self.stats.passed += 1;
                }
            }
            Event::Reject { key, qid, client, stage, code, from, to, helo } => {
                let found = qid.and_then(|q| self.slot_of_qid(q));
                let slot = match found {
                    Some((slot, _)) => slot,
                    None => match self.session(key, client, at_ms, loc) {
                        Some(s) => s,
                        None => {
                            self.stats.orphans += 1;
                            return;
                        }
                    },
                };
                let generation;
                let txn_index;
                {
                    let o = self.slots[slot].as_mut().expect("live slot");
                    generation = o.generation;
                    Self::note(o, at_ms, loc);
                    if let Some(h) = helo
                        && o.s.helo.is_none()
                    {
                        o.s.helo = Some(h.into());
                    }
                    let txns = &mut o.s.txns;
                    txn_index = match (stage, found) {
                        (Stage::Connect | Stage::Helo, _) => {
                            o.s.refused = Some(code);
                            None
                        }
                        (Stage::Other, _) => None,
                        (_, Some((_, t))) => Some(t),
                        (Stage::Mail, None) => {
                            txns.push(Txn { from: from.map(Into::into), qid: qid.map(Into::into), ..Txn::default() });
                            Some(txns.len() - 1)
                        }
                        (_, None) => {
                            // A NOQUEUE refusal continues the transaction of the same sender that
                            // has no queue file yet (Postfix opens one at the first accepted RCPT).
                            let cont = txns.last().is_some_and(|t| {
                                t.qid.is_none()
                                    && t.refused.is_none()
                                    && from.is_none_or(|f| t.from.as_deref() == Some(f))
                            });
                            if !cont || qid.is_some() {
                                txns.push(Txn {
                                    from: from.map(Into::into),
                                    qid: qid.map(Into::into),
                                    ..Txn::default()
                                });
                            }
                            Some(txns.len() - 1)
                        }
                    };
                    if let Some(t) = txn_index {
                        let txn = &mut txns[t];
                        if txn.from.is_none() {
                            txn.from = from.map(Into::into);
                        }
                        match stage {
                            Stage::Rcpt => txn.rcpts.push(Rcpt { addr: to.unwrap_or("").into(), code }),
                            Stage::Mail | Stage::Data => txn.refused = Some((stage, code)),
                            _ => {}
                        }
                    }
                }
                if let (Some(q), Some(t), None) = (qid, txn_index, found) {
                    self.qids.insert(q.into(), (slot, generation, t));
                }
            }
            Event::Queued { key, qid, client } => {
                let Some(slot) = self.session(key, client, at_ms, loc) else {
                    self.stats.orphans += 1;
                    return;
                };
                let o = self.slots[slot].as_mut().expect("live slot");
                Self::note(o, at_ms, loc);
                let txns = &mut o.s.txns;
                let reuse = txns.last().is_some_and(|t| t.qid.is_none() && t.refused.is_none());
                if !reuse {
                    txns.push(Txn::default());
                }
                let t = txns.len() - 1;
                txns[t].qid = Some(qid.into());
                txns[t].queued = true;
                let generation = o.generation;
                self.qids.insert(qid.into(), (slot, generation, t));
            }
            Event::Sender { qid, from, nrcpt, origin } => {
                let (slot, t) = match self.slot_of_qid(qid) {
                    Some(x) => x,
                    None => {
                        let Some((key, client)) = origin else {
                            // A message submitted locally (pickup), or its session is gone.
                            return;
                        };
                        let Some(slot) = self.session(key, Some(client), at_ms, loc) else { return };
                        let o = self.slots[slot].as_mut().expect("live slot");
                        o.s.txns.push(Txn { qid: Some(qid.into()), ..Txn::default() });
                        let t = o.s.txns.len() - 1;
                        let generation = o.generation;
                        self.qids.insert(qid.into(), (slot, generation, t));
                        (slot, t)
                    }
                };
                let o = self.slots[slot].as_mut().expect("live slot");
                Self::note(o, at_ms, loc);
                let txn = &mut o.s.txns[t];
                txn.from = Some(from.into());
                txn.nrcpt = nrcpt;
                if nrcpt.is_some_and(|n| n > 0) && txn.refused.is_none() {
                    txn.queued = true;
                }
                if nrcpt == Some(0) || txn.nrcpt.is_some_and(|n| txn.delivered >= n) {
                    txn.complete = true;
                }
            }
            Event::Delivery { qid, to, status: _ } => {
                let Some((slot, t)) = self.slot_of_qid(qid) else { return };
                let o = self.slots[slot].as_mut().expect("live slot");
                o.last_ms = o.last_ms.max(at_ms);
                let txn = &mut o.s.txns[t];
                txn.queued = true;
                if !txn.rcpts.iter().any(|r| &*r.addr == to && r.code / 100 == 2) {
                    txn.rcpts.push(Rcpt { addr: to.into(), code: 250 });
                    txn.delivered += 1;
                }
                if txn.nrcpt.is_some_and(|n| txn.delivered >= n) {
                    txn.complete = true;
                }
            }
            Event::Removed { qid } => {
                if let Some((slot, t)) = self.slot_of_qid(qid) {
                    self.slots[slot].as_mut().expect("live slot").s.txns[t].complete = true;
                }
                self.qids.remove(qid);
            }
            Event::Accepted { key, client } => {
                let Some(slot) = self.session(key, Some(client), at_ms, loc) else { return };
                let o = self.slots[slot].as_mut().expect("live slot");
                Self::note(o, at_ms, loc);
                o.s.txns.push(Txn {
                    from: Some("sender@replay.invalid".into()),
                    rcpts: vec![Rcpt { addr: "postmaster@{local}".into(), code: 250 }],
                    queued: true,
                    complete: true,
                    ..Txn::default()
                });
            }
            Event::Ignored => {}
        }
        if self.now_ms - self.last_sweep_ms >= 10_000 {
            self.sweep(false);
        }
    }

    fn drop_slot(&mut self, slot: usize) -> Option<Open> {
        let o = self.slots[slot].take()?;
        self.free.push(slot);
        self.held -= 1;
        for t in &o.s.txns {
            if let Some(q) = &t.qid
                && self.qids.get(q).is_some_and(|&(s, g, _)| s == slot && g == o.generation)
            {
                self.qids.remove(q);
            }
        }
        if self.by_key.get(&o.key) == Some(&slot) {
            self.by_key.remove(&o.key);
        }
        Some(o)
    }

    fn finish_slot(&mut self, slot: usize) {
        let Some(o) = self.drop_slot(slot) else { return };
        let i = match self.done_free.pop() {
            Some(i) => {
                self.done[i] = Some(o.s);
                i
            }
            None => {
                self.done.push(Some(o.s));
                self.done.len() - 1
            }
        };
        let start = self.done[i].as_ref().map_or(0, |s| s.start_ms);
        self.seq += 1;
        self.ready.push(Reverse((start, self.seq, i)));
        self.stats.sessions += 1;
    }

    /// Closes what can no longer grow; `all`: everything (the end of the input).
    pub fn sweep(&mut self, all: bool) {
        self.last_sweep_ms = self.now_ms;
        for slot in 0..self.slots.len() {
            let Some(o) = &self.slots[slot] else { continue };
            let waiting = o.s.txns.iter().any(|t| t.queued && !t.complete);
            let finished = all
                || (o.closed && (!waiting || self.now_ms - o.s.end_ms > HOLD_MS))
                || (!o.closed && self.now_ms - o.last_ms > IDLE_MS);
            if finished {
                if !o.closed && !all {
                    self.stats.unterminated += 1;
                }
                self.finish_slot(slot);
            }
        }
        self.held_min = self.slots.iter().flatten().map(|o| o.s.start_ms).min();
    }

    /// The next session whose start no held session precedes.
    pub fn pop(&mut self) -> Option<LoggedSession> {
        let &Reverse((start, _, i)) = self.ready.peek()?;
        if self.held_min.is_some_and(|m| m < start) {
            return None;
        }
        self.ready.pop();
        self.done_free.push(i);
        self.done[i].take()
    }

    /// Sessions held now.
    pub fn held(&self) -> u64 {
        self.held
    }
}
