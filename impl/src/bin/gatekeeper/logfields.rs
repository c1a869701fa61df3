//! The fields of a plain-text log line, written as tracing-subscriber's default does when colour
//! is off, byte for byte (the log replay reads these lines back), at a fraction of its cost.
//!
//! Why: the verdict lines are the largest user-space cost of an early reject (issue 18: 31 % of
//! its instructions, about 15,000 per line). The default visitor paints every field name and
//! every `=` through `nu_ansi_term` even with colour off (12 % of the total), and writes the
//! message through its escaping writer one character at a time. Here a name is one
//! `write_str`, and a message is escaped only where it holds a character to escape.
//!
//! Used for the text format without colour (log files, the journal); on a terminal the default
//! paints as before, and the JSON format has its own visitor. [`PlainLine`] writes the head of
//! the line (timestamp, level, spans, target) as the default `Full` format does, without its
//! styles either, and the timestamp's date and time of day once a second.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The [`MakeVisitor`] to pass to `fmt_fields`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainFields;

impl<'a> MakeVisitor<Writer<'a>> for PlainFields {
    type Visitor = PlainVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> PlainVisitor<'a> {
        PlainVisitor { writer, is_empty: true, result: Ok(()) }
    }
}

/// Writes `name=value` pairs separated by spaces, the message bare and first-come.
#[derive(Debug)]
pub struct PlainVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    fn pad(&mut self) -> fmt::Result {
        if std::mem::take(&mut self.is_empty) { Ok(()) } else { self.writer.write_char(' ') }
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"))
        } else {
            self.record_debug(field, &value)
        }
    }

    /// Rare (a `&dyn Error` as a field): the default visitor's rendering, sources and all.
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        let mut default = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        default.record_error(field, value);
        self.result = default.finish();
        self.is_empty = false;
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // The `log` crate's metadata, shown in the line's head already.
        if name.starts_with("log.") {
            return;
        }
        self.result = self.pad().and_then(|()| match name {
            "message" if self.writer.sanitizes_ansi_escapes() => {
                write!(Escaping { inner: &mut self.writer }, "{value:?}")
            }
            "message" => write!(self.writer, "{value:?}"),
            name => {
                self.writer.write_str(name.strip_prefix("r#").unwrap_or(name))?;
                self.writer.write_char('=')?;
                write!(self.writer, "{value:?}")
            }
        });
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// tracing-subscriber's message escaping (terminal control characters, C0 and C1, written as
/// escapes), with whole runs that hold none written at once.
struct Escaping<'a, W: fmt::Write> {
    inner: &'a mut W,
}

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // C1 controls (U+0080..U+009F) are 0xC2 0x80..0x9F in UTF-8.
        if !s.bytes().any(|b| matches!(b, 0x1b | 0x07 | 0x08 | 0x0c | 0x7f | 0xc2)) {
            return self.inner.write_str(s);
        }
        for ch in s.chars() {
            match ch {
                '\x1b' => self.inner.write_str("\\x1b")?,
                '\x07' => self.inner.write_str("\\x07")?,
                '\x08' => self.inner.write_str("\\x08")?,
                '\x0c' => self.inner.write_str("\\x0c")?,
                '\x7f' => self.inner.write_str("\\x7f")?,
                '\u{80}'..='\u{9f}' => write!(self.inner, "\\u{{{:x}}}", ch as u32)?,
                _ => self.inner.write_char(ch)?,
            }
        }
        Ok(())
    }
}

/// tracing-subscriber's `Full` line without colour: `TIMESTAMP LEVEL span{fields}:…: target:
/// fields`, the timestamp RFC 3339 in UTC to the microsecond (`2026-12-07T06:58:01.123456Z`),
/// its date and time of day formatted once per second (per thread) instead of for every line.
#[derive(Debug, Clone, Copy)]
pub struct PlainLine {
    /// Start with the timestamp (off only to compare lines in tests).
    pub timestamps: bool,
}

impl<S, N> FormatEvent<S, N> for PlainLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        // A `log` record's own target and level, not the bridge's.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        if self.timestamps {
            write_timestamp(&mut writer, SystemTime::now())?;
            writer.write_char(' ')?;
        }
        writer.write_str(match *meta.level() {
            Level::TRACE => "TRACE ",
            Level::DEBUG => "DEBUG ",
            Level::INFO => " INFO ",
            Level::WARN => " WARN ",
            Level::ERROR => "ERROR ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                seen = true;
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{{{fields}}}")?;
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

fn write_timestamp(w: &mut impl fmt::Write, t: SystemTime) -> fmt::Result {
    thread_local! {
        /// The second last formatted, and its text up to the decimal point.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let Ok(since) = t.duration_since(UNIX_EPOCH) else {
        return write!(w, "{}", humantime_serde::re::humantime::format_rfc3339_micros(t));
    };
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != since.as_secs() {
            text.clear();
            // `…:SSZ`: keep all but the `Z`.
            write!(text, "{}", humantime_serde::re::humantime::format_rfc3339_seconds(t))?;
            text.pop();
            text.push('.');
            *second = since.as_secs();
        }
        w.write_str(text)
    })?;
    let mut micros = since.subsec_micros();
    let mut digits = *b"000000Z";
    for d in digits[..6].iter_mut().rev() {
        *d = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    w.write_str(std::str::from_utf8(&digits).expect("ASCII digits"))
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer failed")
        }
    }
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("inner \x1b[31mred")
        }
    }
    impl std::error::Error for Inner {}
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Lines of every shape the gatekeeper logs, and some it does not.
    fn log_all() {
        tracing::info!(outside = "any span", "first");
        // A dependency logging through the `log` crate (rustls does): its own target and level.
        let record = log::Record::builder()
            .target("rustls::conn")
            .level(log::Level::Warn)
            .module_path_static(Some("rustls::conn"))
            .file_static(Some("src/conn.rs"))
            .line(Some(7))
            .args(format_args!("peer sent \x1b junk"))
            .build();
        tracing_log::format_trace(&record).unwrap();
        let bare = tracing::info_span!("bare");
        bare.in_scope(|| tracing::info!("in a span without fields"));
        let span = tracing::info_span!("conn", client = %"192.0.2.1", id = 7u64, r#type = "smtp");
        let _g = span.enter();
        tracing::info!(helo = "mx.example.test", rule = %"E2", code = 550, bounce = true, "verdict");
        tracing::warn!(text = ?"evil\x1b[2J\u{85}", "message with \x1b[31mescapes\x07 and \u{9b}C1 and café");
        tracing::info!(r#type = "x", ratio = 0.5, "{} formatted {:?}", 3, "args\x7f");
        tracing::error!(error = &Outer(Inner) as &(dyn std::error::Error + 'static), after = 1, "failed");
        tracing::info!(only = "fields");
        let nested = tracing::info_span!("probe", domain = "example.org");
        let _n = nested.enter();
        tracing::debug!("nested\x08\x0c");
    }

    #[test]
    fn timestamps_are_rfc3339_to_the_microsecond() {
        use std::time::Duration;
        let mut seconds = vec![0, 59, 951_782_400, 1_709_164_799, 1_709_164_800, 1_796_601_481, 4_102_444_799];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            seconds.push(x % 4_102_444_800);
        }
        for s in seconds {
            // Twice within one second (the cached text), then the next.
            for (s, micros) in [(s, 0), (s, 999_999), (s, 123_456), (s + 1, 7)] {
                let t = UNIX_EPOCH + Duration::new(s, micros * 1000 + 999);
                let mut ours = String::new();
                write_timestamp(&mut ours, t).unwrap();
                let reference = humantime_serde::re::humantime::format_rfc3339_micros(t).to_string();
                assert_eq!(ours, reference, "{s}.{micros}");
            }
        }
    }

    #[test]
    fn the_timestamp_reads_as_the_default_one() {
        let line = |timer: bool| {
            let buf = Buf::default();
            let builder = tracing_subscriber::fmt().with_ansi(false).with_writer(buf.clone());
            let dispatch = if timer {
                tracing::Dispatch::new(
                    builder.fmt_fields(PlainFields).event_format(PlainLine { timestamps: true }).finish(),
                )
            } else {
                tracing::Dispatch::new(builder.finish())
            };
            tracing::dispatcher::with_default(&dispatch, || tracing::info!("x"));
            String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
        };
        let (ours, default) = (line(true), line(false));
        let stamp = |l: &str| {
            let s = l.split_whitespace().next().unwrap().to_string();
            (humantime_serde::re::humantime::parse_rfc3339(&s).unwrap(), s.len())
        };
        let ((a, a_len), (b, b_len)) = (stamp(&ours), stamp(&default));
        assert_eq!(a_len, b_len, "{ours}{default}");
        assert!(a.duration_since(b).or_else(|e| Ok::<_, ()>(e.duration())).unwrap().as_secs() < 2, "{ours}{default}");
        assert_eq!(ours[a_len..], default[b_len..]);
    }

    fn render(plain: bool) -> String {
        let buf = Buf::default();
        let builder = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .without_time()
            .with_ansi(false)
            .with_writer(buf.clone());
        let dispatch = if plain {
            tracing::Dispatch::new(
                builder.fmt_fields(PlainFields).event_format(PlainLine { timestamps: false }).finish(),
            )
        } else {
            tracing::Dispatch::new(builder.finish())
        };
        tracing::dispatcher::with_default(&dispatch, log_all);
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_are_the_default_formats_byte_for_byte() {
        let (ours, default) = (render(true), render(false));
        assert_eq!(ours.lines().count(), 9, "{ours}");
        assert!(ours.contains(" WARN rustls::conn: peer sent \\x1b junk\n"), "{ours}");
        assert!(ours.contains("\\x1b[31mescapes\\x07") && ours.contains("\\u{9b}C1 and café"), "{ours}");
        assert_eq!(ours, default);
    }
}
