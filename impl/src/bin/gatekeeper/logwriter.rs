//! The log writer: lines are formatted on the thread that logs them and appended to one
//! shared buffer; a writer thread writes out whatever has gathered there at most every
//! [`INTERVAL`], in one `write(2)`.
//!
//! Why: every session logs two to four verdict lines. Written synchronously, each was a
//! `write(2)` on the serving thread under the stderr lock both runtime threads share (issue 18:
//! two writes and about two futex calls per early reject). Now a busy server writes a batch of
//! lines per system call, and a serving thread only takes an uncontended lock to log. A queue
//! that woke the writer for every line was tried first: it traded each write for a futex wake.
//! Here the writer is woken only when a line lands in an empty buffer while it is idle; under
//! load it finds the next batch waiting when it comes back from its pause.
//!
//! What stays as it was: every line is written, whole and in the order it was logged (one
//! buffer; one writer at a time holds the output). When [`LIMIT`] octets are waiting a logging
//! thread waits for the writer, as it waited for the stderr lock before: nothing is dropped.
//! The [`Guard`] held by `main` flushes on exit, and a panic flushes before its message.
//! What a SIGKILL (or an abort) loses: the lines still in the buffer, i.e. those of the last
//! [`INTERVAL`] (at most [`LIMIT`] octets).
//!
//! Until [`start`] is called every line is written at once by the thread that logs it, as
//! before: `serve` starts the writer thread only after it has dropped privileges, which must be
//! done while the process is single-threaded; the other commands never start it.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer pauses after a write: the most a line waits under load.
const INTERVAL: Duration = Duration::from_millis(10);
/// Octets that may wait in the buffer before a logging thread has to wait for the writer.
const LIMIT: usize = 1 << 20;

struct Shared<W> {
    pending: Mutex<Pending>,
    /// The writer waits here when the buffer is empty.
    wake: Condvar,
    /// Logging threads wait here while the buffer is over [`LIMIT`].
    space: Condvar,
    /// The output; held while writing, so that batches go out in order.
    out: Mutex<W>,
    /// The writer thread runs; until then each line is written by the thread that logs it.
    started: AtomicBool,
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// The writer is waiting on `wake`.
    idle: bool,
    /// Logging threads waiting on `space`.
    full_waiters: usize,
}

impl<W: Write> Shared<W> {
    fn push(&self, line: &[u8]) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        while p.buf.len() >= LIMIT {
            p.full_waiters += 1;
            p = self.space.wait(p).unwrap_or_else(|e| e.into_inner());
            p.full_waiters -= 1;
        }
        p.buf.extend_from_slice(line);
        if p.idle {
            p.idle = false;
            self.wake.notify_one();
        }
        drop(p);
        if !self.started.load(Ordering::Acquire) {
            self.write_pending(&mut Vec::new());
        }
    }

    /// Writes out what is pending; `spare` is the empty buffer swapped in.
    fn write_pending(&self, spare: &mut Vec<u8>) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut p.buf, spare);
        if p.full_waiters > 0 {
            self.space.notify_all();
        }
        drop(p);
        if !spare.is_empty() {
            // Errors are ignored, as the fmt layer ignores them on stderr.
            let _ = out.write_all(spare);
            let _ = out.flush();
        }
        spare.clear();
    }

    /// The writer thread: waits for a line, writes the batch, pauses, again.
    fn run(&self) {
        let mut spare = Vec::new();
        loop {
            {
                let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                while p.buf.is_empty() {
                    p.idle = true;
                    p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                p.idle = false;
            }
            self.write_pending(&mut spare);
            std::thread::sleep(INTERVAL);
        }
    }
}

/// The `MakeWriter` of the fmt layer: each event's formatted line goes to the buffer.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared<io::Stderr>>,
}

/// Flushes the log when dropped (at the end of `main`).
pub struct Guard {
    shared: Arc<Shared<io::Stderr>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.write_pending(&mut Vec::new());
    }
}

fn shared<W>(out: W) -> Arc<Shared<W>> {
    Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        space: Condvar::new(),
        out: Mutex::new(out),
        started: AtomicBool::new(false),
    })
}

/// The stderr writer, for [`start`].
static STDERR: OnceLock<Arc<Shared<io::Stderr>>> = OnceLock::new();

/// Starts the writer thread: from now on lines are written in batches. Call it only where a
/// new thread is allowed (after the privilege drop).
pub fn start() {
    let Some(shared) = STDERR.get() else { return };
    if shared.started.swap(true, Ordering::AcqRel) {
        return;
    }
    let writer = shared.clone();
    if let Err(e) = std::thread::Builder::new().name("log-writer".into()).spawn(move || writer.run()) {
        // Lines keep being written by the threads that log them.
        shared.started.store(false, Ordering::Release);
        tracing::warn!(error = %e, "cannot start the log writer thread: writing each line at once");
    }
}

/// The writer on stderr (lines written at once until [`start`]); also installs a panic hook
/// that flushes the log first.
pub fn stderr() -> (LogWriter, Guard) {
    let shared = STDERR.get_or_init(|| shared(io::stderr())).clone();
    let hook = shared.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        hook.write_pending(&mut Vec::new());
        previous(info);
    }));
    (LogWriter { shared: shared.clone() }, Guard { shared })
}

/// One event's line, added to the buffer when the fmt layer drops it (the fmt layer writes an
/// event with one `write_all`, so this is one copy of the line).
pub struct Line<'a, W: Write> {
    shared: &'a Shared<W>,
    buf: Vec<u8>,
}

impl<W: Write> Write for Line<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for Line<'_, W> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.shared.push(&self.buf);
        }
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a, io::Stderr>;
    fn make_writer(&'a self) -> Self::Writer {
        Line { shared: &self.shared, buf: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records each `write` call separately.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);
    impl Write for Writes {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.push(data.to_vec());
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_and_batched() {
        let shared = shared(Writes::default());
        // As if the writer thread ran (it is not started: the test writes the batch itself).
        shared.started.store(true, Ordering::Release);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let mut line = Line { shared: &*shared, buf: Vec::new() };
                        write!(line, "thread {t} line {i} ").unwrap();
                        writeln!(line, "end").unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        shared.write_pending(&mut Vec::new());
        let writes = std::mem::take(&mut shared.out.lock().unwrap().0);
        assert_eq!(writes.len(), 1, "one batch, one write");
        let text = String::from_utf8(writes.concat()).unwrap();
        // Every line whole; each thread's lines in the order it logged them.
        let mut next = [0; 4];
        for line in text.lines() {
            let w: Vec<&str> = line.split(' ').collect();
            assert_eq!((w.len(), w[0], w[2], w[4]), (5, "thread", "line", "end"), "{line:?}");
            let (t, i): (usize, usize) = (w[1].parse().unwrap(), w[3].parse().unwrap());
            assert_eq!(i, next[t]);
            next[t] += 1;
        }
        assert_eq!(next, [500; 4]);
    }

    #[test]
    fn before_start_each_line_is_written_at_once() {
        let shared = shared(Writes::default());
        for i in 0..3 {
            let mut line = Line { shared: &*shared, buf: Vec::new() };
            writeln!(line, "line {i}").unwrap();
            drop(line);
            assert_eq!(shared.out.lock().unwrap().0.len(), i + 1);
        }
    }

    #[test]
    fn the_writer_thread_writes_what_is_logged() {
        let shared = shared(Writes::default());
        shared.started.store(true, Ordering::Release);
        let writer = shared.clone();
        std::thread::spawn(move || writer.run());
        for i in 0..3 {
            let mut line = Line { shared: &*shared, buf: Vec::new() };
            writeln!(line, "line {i}").unwrap();
        }
        // Wait until it is there (the writer is woken by the first line); a writer never woken
        // fails the test instead of hanging it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let written = shared.out.lock().unwrap().0.concat();
            if written == b"line 0\nline 1\nline 2\n" {
                break;
            }
            assert!(b"line 0\nline 1\nline 2\n".starts_with(&written), "{written:?}");
            assert!(std::time::Instant::now() < deadline, "the writer thread never wrote: {written:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
