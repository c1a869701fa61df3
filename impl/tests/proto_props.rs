//! Properties of the SMTP wire layer and the session (docs/design.md §3: round trip, no panic on any
//! bytes, bounded buffers, the same result for any split of the input).

use std::net::{Ipv4Addr, Ipv6Addr};

use gatekeeper::policy::PolicyConfig;
use gatekeeper::proto::{
    Body, COMMAND_LINE_MAX, Command, DataEvent, DataReceiver, Domain, ForwardPath, Host, LineEvent, LineReceiver,
    LocalPart, MailParams, Mailbox, RcptParams, Reply, ReversePath, TEXT_LINE_MAX,
};
use gatekeeper::session::{Action, SessionConfig};
use gatekeeper::testing::{self, Answers, Driver};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Generators of valid values

fn domain() -> impl Strategy<Value = Domain> {
    prop::collection::vec("[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", 1..4)
        .prop_map(|labels| Domain::parse(&labels.join(".")).expect("generated domain is valid"))
}

/// RFC 5321 §4.1.3 dcontent: printable ASCII but `[`, `\` and `]`; the octets that delimit
/// paths and quoted strings elsewhere come up often.
fn dcontent() -> impl Strategy<Value = String> {
    let octet = prop_oneof![3 => 33u8..=90, 3 => 94u8..=126, 2 => prop::sample::select(b">\"<@:".to_vec())];
    prop::collection::vec(octet, 1..12).prop_map(|b| String::from_utf8(b).expect("ASCII"))
}

fn host() -> impl Strategy<Value = Host> {
    prop_oneof![
        4 => domain().prop_map(Host::Domain),
        1 => any::<u32>().prop_map(|a| Host::Ipv4(Ipv4Addr::from(a))),
        1 => any::<u128>().prop_map(|a| Host::Ipv6(Ipv6Addr::from(a))),
        2 => ("[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?", dcontent())
            .prop_filter("the IPv6 tag is not a general literal", |(tag, _)| !tag.eq_ignore_ascii_case("ipv6"))
            .prop_map(|(tag, content)| Host::parse(&format!("[{tag}:{content}]")).expect("general literal")),
    ]
}

fn local_part() -> impl Strategy<Value = LocalPart> {
    let atom = "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,8}";
    prop_oneof![
        // Dot-string.
        prop::collection::vec(atom, 1..4).prop_map(|atoms| atoms.join(".")),
        // Quoted string with any printable value, escaped where needed.
        "[ -~]{0,24}".prop_map(|v| {
            let escaped: String =
                v.chars().flat_map(|c| if c == '"' || c == '\\' { vec!['\\', c] } else { vec![c] }).collect();
            format!("\"{escaped}\"")
        }),
    ]
    .prop_filter_map("fits the local part limit", |s| LocalPart::parse(&s).ok())
}

fn mailbox() -> impl Strategy<Value = Mailbox> {
    (local_part(), host())
        .prop_map(|(local, host)| Mailbox { local, host })
        // The rendered path must fit RFC 5321 §4.5.3.1.3.
        .prop_filter("fits the path limit", |m| m.to_string().len() + 2 <= 256)
}

fn reverse_path() -> impl Strategy<Value = ReversePath> {
    prop_oneof![1 => Just(ReversePath::Null), 5 => mailbox().prop_map(ReversePath::Mailbox)]
}

fn forward_path() -> impl Strategy<Value = ForwardPath> {
    prop_oneof![1 => Just(ForwardPath::Postmaster), 5 => mailbox().prop_map(ForwardPath::Mailbox)]
}

fn mail_params() -> impl Strategy<Value = MailParams> {
    (prop::option::of(any::<u64>()), prop::option::of(prop_oneof![Just(Body::SevenBit), Just(Body::EightBitMime)]))
        .prop_map(|(size, body)| MailParams { size, body })
}

fn command() -> impl Strategy<Value = Command> {
    let word = "[!-~]{1,20}";
    prop_oneof![
        word.prop_map(Command::Ehlo),
        word.prop_map(Command::Helo),
        (reverse_path(), mail_params()).prop_map(|(p, m)| Command::Mail(p, m)),
        forward_path().prop_map(|p| Command::Rcpt(p, RcptParams::default())),
        Just(Command::Data),
        Just(Command::Rset),
        Just(Command::Noop),
        Just(Command::Quit),
        "[!-~]([ -~]{0,20}[!-~])?".prop_map(Command::Vrfy),
        Just(Command::Help),
        Just(Command::StartTls),
        prop::sample::select(vec!["EXPN", "TURN", "AUTH", "BDAT", "ETRN", "SEND", "SOML", "SAML", "ATRN"])
            .prop_map(|v| Command::NotImplemented(v.into())),
    ]
}

/// Lines near the grammar: real verbs, odd spacing and case, paths with quotes, routes,
/// literals and junk, parameters good and bad.
fn fuzzy_line() -> impl Strategy<Value = String> {
    let verb = prop::sample::select(vec![
        "MAIL FROM:",
        "mail from: ",
        "MAIL FROM:  ",
        "RCPT TO:",
        "rcpt To:",
        "EHLO ",
        "HELO ",
        "VRFY ",
        "NOOP ",
        "DATA",
        "RSET ",
        "QUIT",
        "HELP ",
        "EXPN ",
        "",
        "MAIL ",
        "RCPT TO ",
    ]);
    let path = prop_oneof![
        prop::sample::select(vec![
            "<>",
            "<Postmaster>",
            "<a@b.test>",
            "<\"x y\"@b.test>",
            "<@r.test,@s.test:a@b.test>",
            "<a@[192.0.2.1]>",
            "<a@[IPv6:::1]>",
            "<a@[x:y>z]>",
            "<a@[x:y\"z]>",
            "<\"a\\\"b\"@c.test>",
            "<\"a>b\"@c.test>",
            "<a@b>",
            "a@b.test",
            "<a@b.test",
            "<\"\"@b.test>",
            "<a..b@c.test>",
        ])
        .prop_map(String::from),
        "<[ -~]{0,12}@[ -~]{0,12}>",
        "[ -~]{0,30}",
    ];
    let params =
        prop::sample::select(vec!["", " SIZE=10", " BODY=8bitmime", " size=0 body=7BIT", " X=1", "  ", " SIZE=010"]);
    (verb, path, params).prop_map(|(v, p, q)| format!("{v}{p}{q}"))
}

// ---------------------------------------------------------------------------------------------
// Parsers

proptest! {
    #[test]
    fn command_render_parse_round_trip(cmd in command()) {
        let line = cmd.to_string();
        prop_assert_eq!(Command::parse(line.as_bytes()), Ok(cmd), "{:?}", line);
    }

    #[test]
    fn path_render_parse_round_trip(from in reverse_path(), to in forward_path()) {
        prop_assert_eq!(ReversePath::parse(&from.to_string()), Ok(from));
        prop_assert_eq!(ForwardPath::parse(&to.to_string()), Ok(to));
    }

    /// Whatever parses renders canonically: rendering and parsing again changes nothing.
    #[test]
    fn parsed_commands_render_to_a_fixed_point(line in fuzzy_line()) {
        if let Ok(cmd) = Command::parse(line.as_bytes()) {
            let rendered = cmd.to_string();
            prop_assert_eq!(Command::parse(rendered.as_bytes()), Ok(cmd), "{:?} -> {:?}", line, rendered);
        }
    }

    #[test]
    fn parsers_never_panic_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600), line in fuzzy_line()) {
        let _ = Command::parse(&bytes);
        let _ = Command::parse(line.as_bytes());
        let text = String::from_utf8_lossy(&bytes);
        let _ = ReversePath::parse(&text);
        let _ = ForwardPath::parse(&text);
        let _ = Mailbox::parse(&text);
        let _ = Host::parse(&text);
        let _ = ReversePath::parse(&line);
    }
}

// ---------------------------------------------------------------------------------------------
// Receivers

fn lines_of(chunks: &[&[u8]]) -> Vec<LineEvent> {
    let mut r = LineReceiver::new();
    let mut out = Vec::new();
    for chunk in chunks {
        let mut input = *chunk;
        while let Some(ev) = r.next(&mut input) {
            out.push(ev);
        }
        assert!(input.is_empty(), "the line receiver consumes all input");
        assert!(r.buffered() <= COMMAND_LINE_MAX, "buffered {}", r.buffered());
    }
    out
}

/// Bytes rich in line endings and dots, with runs long enough to cross the limits.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..40),
        2 => prop::sample::select(vec![&b"\r\n"[..], b"\n", b"\r", b".", b"\r\n.\r\n", b"\n.\n", b"..", b"NOOP\r\n"])
            .prop_map(<[u8]>::to_vec),
        1 => (1usize..1200, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        // Right at the text line limit (RFC 5321 §4.5.3.1.6), ended by CRLF or a bare LF.
        1 => (TEXT_LINE_MAX - 4..TEXT_LINE_MAX + 2, prop::sample::select(vec![&b"\r\n"[..], b"\n"]))
            .prop_map(|(n, end)| [vec![b'y'; n], end.to_vec()].concat()),
    ];
    // Often ended properly, so that messages are complete.
    (prop::collection::vec(piece, 0..24), any::<bool>())
        .prop_map(|(p, end)| [p.concat(), if end { b"\r\n.\r\n".to_vec() } else { Vec::new() }].concat())
}

fn split_at(input: &[u8], mut cuts: Vec<usize>) -> Vec<&[u8]> {
    cuts.iter_mut().for_each(|c| *c %= input.len() + 1);
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for c in cuts {
        chunks.push(&input[start..c]);
        start = c;
    }
    chunks.push(&input[start..]);
    chunks
}

proptest! {
    #[test]
    fn line_receiver_is_bounded_and_split_invariant(
        input in wire_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = lines_of(&[&input]);
        let split = lines_of(&split_at(&input, cuts));
        prop_assert_eq!(&whole, &split);
        for ev in &whole {
            if let LineEvent::Line(l) = ev {
                prop_assert!(l.len() <= COMMAND_LINE_MAX - 2, "line of {}", l.len());
            }
        }
    }

    #[test]
    fn data_receiver_is_bounded_and_split_invariant(
        input in wire_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        size_max in prop_oneof![Just(64u64), Just(4096), Just(1 << 20)],
    ) {
        // The outcome, the input consumed, and the content handed out (taken after every read,
        // as the session does).
        let feed = |chunks: Vec<&[u8]>| {
            let mut r = DataReceiver::new(size_max);
            let mut consumed = 0;
            let mut content = Vec::new();
            for chunk in chunks {
                let mut rest = chunk;
                let ev = r.next(&mut rest);
                content.extend(r.take_content());
                if let Some(ev) = ev {
                    return (Some(ev), consumed + chunk.len() - rest.len(), content);
                }
                consumed += chunk.len();
            }
            (None, consumed, content)
        };
        let whole = feed(vec![&input]);
        let split = feed(split_at(&input, cuts));
        // The outcome and the input consumed always agree; the content must where it counts,
        // for a complete message (once too big, what was handed out is discarded, and a read
        // may have handed out lines before the limit was found).
        prop_assert_eq!((&whole.0, whole.1), (&split.0, split.1));
        if matches!(whole.0, Some(DataEvent::Complete { .. })) {
            prop_assert_eq!(&whole.2, &split.2);
        }
        if let (Some(DataEvent::Complete { size }), m) = (&whole.0, &whole.2) {
            prop_assert_eq!(*size, m.len() as u64);
            prop_assert!(m.len() as u64 <= size_max);
            prop_assert!(m.is_empty() || m.ends_with(b"\r\n"));
            for line in m.split_inclusive(|&b| b == b'\n') {
                // Every line ends with CRLF, holds no other CR, and is at most 1000 octets.
                prop_assert!(line.ends_with(b"\r\n"), "bare LF or missing CRLF");
                prop_assert!(!line[..line.len() - 2].contains(&b'\r'), "bare CR stored");
                prop_assert!(line.len() <= TEXT_LINE_MAX, "line of {}", line.len());
            }
            // Only CRLF . CRLF ends the data (no smuggling).
            let end = whole.1;
            prop_assert!(input[..end].ends_with(b".\r\n"));
            prop_assert!(end == 3 || input[..end].ends_with(b"\r\n.\r\n"));
        }
    }
}

/// The line breaks a receiving MTA normalizes: CRLF, a bare LF and a lone CR are each one.
fn normalized(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'\r' if input.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

proptest! {
    /// Long text lines (RFC 5321 §4.5.3.1.6) are accepted and broken, never refused: the body
    /// with the inserted CRLF SP taken out again is the body as sent.
    #[test]
    fn long_lines_are_broken_and_nothing_is_lost(
        lines in prop::collection::vec((prop_oneof![0usize..20, TEXT_LINE_MAX - 10..TEXT_LINE_MAX + 3, 1990usize..4000], any::<bool>()), 1..6),
    ) {
        let mut body = Vec::new();
        for &(n, crlf) in &lines {
            body.extend(std::iter::repeat_n(b'y', n));
            body.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        }
        body.extend_from_slice(b"\r\n"); // the data ends after a CRLF, whatever came before
        let input = [&b"Subject: long\r\n\r\n"[..], &body, b".\r\n"].concat();
        let mut r = DataReceiver::new(1 << 20);
        let event = r.next(&mut &input[..]);
        let m = r.take_content();
        let Some(DataEvent::Complete { .. }) = event else {
            return Err(TestCaseError::fail(format!("{event:?}")));
        };
        let stored = m.strip_prefix(&b"Subject: long\r\n\r\n"[..]).expect("headers kept");
        for line in stored.split_inclusive(|&b| b == b'\n') {
            prop_assert!(line.len() <= TEXT_LINE_MAX, "line of {}", line.len());
        }
        let unbroken: Vec<u8> = String::from_utf8(stored.to_vec()).unwrap().replace("\r\n ", "").into_bytes();
        prop_assert_eq!(unbroken, normalized(&body));
    }

    /// A lone CR and a bare LF are stored as CRLF; nothing else changes (RFC 5321 §2.3.8).
    #[test]
    fn line_endings_are_normalized(
        text in prop::collection::vec(prop::sample::select(vec![b'a', b' ', b'\r', b'\n', b'\r', b':']), 0..300),
    ) {
        let input = [&text[..], b"\r\n.\r\n"].concat();
        let mut r = DataReceiver::new(1 << 20);
        let event = r.next(&mut &input[..]);
        let expected = normalized(&[&text[..], b"\r\n"].concat());
        prop_assert_eq!(event, Some(DataEvent::Complete { size: expected.len() as u64 }));
        prop_assert_eq!(r.take_content(), expected);
    }
}

// ---------------------------------------------------------------------------------------------
// The session

#[derive(Debug, Clone)]
struct Knobs {
    verify: bool,
    scan: bool,
    errors_max: u32,
    b4_threshold: u32,
}

fn knobs() -> impl Strategy<Value = Knobs> {
    (any::<bool>(), any::<bool>(), 2u32..40, 1u32..4).prop_map(|(verify, scan, errors_max, b4_threshold)| Knobs {
        verify,
        scan,
        errors_max,
        b4_threshold,
    })
}

/// A session of the standard site with the knobs, driven by the test kit: callbacks and scans
/// cycle through all their outcomes, handoffs succeed.
fn session(k: &Knobs) -> Driver {
    let cfg = SessionConfig {
        size_max: 2000,
        rcpt_max: 5,
        errors_max: k.errors_max,
        verify_senders: k.verify,
        scan: k.scan,
        policy: PolicyConfig { b4_threshold: k.b4_threshold, ..PolicyConfig::default() },
        ..testing::session_config()
    };
    Driver::standard(cfg, 0, Answers { deliver: vec![testing::delivery(0)], ..Answers::cycling() })
}

/// What a driven session wrote and did. The content handed out ([`Action::Append`]) is not
/// an action of its own (how it is chunked follows the reads): it is compared as the message
/// each scan and handoff names.
#[derive(Debug, Default)]
struct Outcome {
    wire: Vec<u8>,
    actions: Vec<String>,
}

impl Outcome {
    /// Takes what `d` collected since the last call.
    fn collect(&mut self, d: &mut Driver) {
        let actions = d.actions();
        let mut contents = d.contents().into_iter();
        for a in actions {
            match a {
                Action::Append { .. } => {}
                Action::Scan | Action::Deliver { .. } => {
                    let content = contents.next().expect("a content per scan and handoff");
                    self.actions.push(format!("{a:?} {:?}", String::from_utf8_lossy(&content)));
                }
                a => self.actions.push(format!("{a:?}")),
            }
        }
        self.wire.extend(testing::wire(&d.replies()));
        d.events();
    }
}

fn fragment() -> impl Strategy<Value = Vec<u8>> {
    let line = prop::sample::select(vec![
        "EHLO c.example.org\r\n",
        "HELO c\r\n",
        "MAIL FROM:<>\r\n",
        "MAIL FROM:<x@elsewhere.test>\r\n",
        "MAIL FROM:<y@elsewhere.test> SIZE=100\r\n",
        "MAIL FROM:<nobody@example.test>\r\n",
        "MAIL FROM:<alice@example.test>\r\n",
        "RCPT TO:<alice@example.test>\r\n",
        "RCPT TO:<bob@example.test>\r\n",
        "RCPT TO:<nobody@example.test>\r\n",
        "RCPT TO:<bob@elsewhere.test>\r\n",
        "RCPT TO:<Postmaster>\r\n",
        "DATA\r\n",
        "Subject: x\r\n\r\n..body\r\n",
        ".\r\n",
        "\r\n.\r\n",
        "\n.\n",
        "RSET\r\n",
        "NOOP\r\n",
        "VRFY alice\r\n",
        "FOO\r\n",
        "\r\n",
        "\r",
        "\n",
        ".",
        "QUIT\r\n",
    ]);
    prop_oneof![
        8 => line.prop_map(|l| l.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        // Arguments that a reply might echo: long, or with control and non-ASCII octets.
        2 => (
            prop::sample::select(vec!["EHLO ", "HELO ", "MAIL FROM:<> X=", "MAIL FROM:<a@b.test> X=", "VRFY "]),
            prop_oneof![0usize..64, 440usize..520],
            prop::collection::vec(prop_oneof![8 => Just(b'a'), 1 => 0u8..32, 1 => 128u8..=255], 0..4),
        )
            .prop_map(|(verb, n, odd)| {
                let arg: Vec<u8> = [vec![b'a'; n], odd].concat().into_iter().filter(|&b| b != b'\n').collect();
                [verb.as_bytes(), &arg, b"\r\n"].concat()
            }),
        1 => (1usize..1500, prop::sample::select(vec![b'x', b'\r', b'\n', b'.'])).prop_map(|(n, b)| vec![b; n]),
    ]
}

fn dialogue() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(fragment(), 1..30).prop_map(|f| f.concat())
}

fn run(k: &Knobs, chunks: &[&[u8]]) -> Outcome {
    let mut d = session(k);
    let mut out = Outcome::default();
    out.collect(&mut d);
    for chunk in chunks {
        d.send(chunk);
        out.collect(&mut d);
        // Driver contract: with every action answered, the session has consumed its input.
        assert!(d.session.wants_input() || d.session.is_closed());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any bytes, any timing: no panic, every reply well formed, input never piles up.
    #[test]
    fn session_survives_any_input(
        k in knobs(),
        chunks in prop::collection::vec((dialogue(), 0u64..400), 0..8),
        eof in any::<bool>(),
    ) {
        let mut d = session(&k);
        let mut out = Outcome::default();
        out.collect(&mut d);
        for (bytes, delay) in &chunks {
            d.advance(*delay);
            let now = d.now;
            if d.session.poll_timeout().is_some_and(|t| t <= now) {
                d.session.handle_timeout(now);
            }
            d.send(bytes);
            out.collect(&mut d);
            prop_assert!(d.session.wants_input() || d.session.is_closed());
            prop_assert!(d.session.poll_timeout().is_none_or(|t| t > now) || d.session.is_closed());
        }
        if eof {
            d.session.handle_eof(d.now);
            out.collect(&mut d);
            prop_assert!(d.session.is_closed());
        }
        // RFC 5321 §4.2 and §4.5.3.1.5, as the one reply parser reads them.
        let mut rest = &out.wire[..];
        while !rest.is_empty() {
            match Reply::parse_prefix(rest) {
                Ok(Some((_, used))) => rest = &rest[used..],
                other => prop_assert!(false, "{:?} at {:?}", other, String::from_utf8_lossy(rest)),
            }
        }
        // After Close, nothing.
        if let Some(i) = out.actions.iter().position(|a| a == "Close") {
            prop_assert_eq!(i + 1, out.actions.len());
        }
    }

    /// RFC 2920: however the input is cut into reads, the replies and actions are the same.
    #[test]
    fn any_split_gives_the_same_replies_and_actions(
        k in knobs(),
        input in dialogue(),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let whole = run(&k, &[&input]);
        let split = run(&k, &split_at(&input, cuts));
        prop_assert_eq!(String::from_utf8_lossy(&whole.wire), String::from_utf8_lossy(&split.wire));
        prop_assert_eq!(whole.actions, split.actions);
    }

    /// Byte by byte is the most extreme split.
    #[test]
    fn byte_by_byte_gives_the_same_replies(k in knobs(), input in dialogue()) {
        let whole = run(&k, &[&input]);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        let split = run(&k, &bytes);
        prop_assert_eq!(String::from_utf8_lossy(&whole.wire), String::from_utf8_lossy(&split.wire));
        prop_assert_eq!(whole.actions, split.actions);
    }
}
