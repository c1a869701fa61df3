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
//! paints as before, and the JSON format has its own visitor.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

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

    fn render(plain: bool) -> String {
        let buf = Buf::default();
        let builder = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .without_time()
            .with_ansi(false)
            .with_writer(buf.clone());
        let dispatch = if plain {
            tracing::Dispatch::new(builder.fmt_fields(PlainFields).finish())
        } else {
            tracing::Dispatch::new(builder.finish())
        };
        tracing::dispatcher::with_default(&dispatch, log_all);
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_are_the_default_formats_byte_for_byte() {
        let (ours, default) = (render(true), render(false));
        assert_eq!(ours.lines().count(), 6, "{ours}");
        assert!(ours.contains("\\x1b[31mescapes\\x07") && ours.contains("\\u{9b}C1 and café"), "{ours}");
        assert_eq!(ours, default);
    }
}
