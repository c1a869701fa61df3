//! The command line and path parsers on arbitrary bytes.
//!
//! Invariants besides "no panic":
//! - `Command::parse(render(c)) == c` for every command that parses (`Display` is documented
//!   as the canonical wire form), and the canonical form is a fixed point;
//! - the same for `ReversePath`, `ForwardPath`, `Mailbox`, `Host`, `Domain` and `LocalPart`
//!   on the input taken as text;
//! - parsed values respect RFC 5321's size limits.

#![no_main]

use gatekeeper::proto::{
    COMMAND_LINE_MAX, Command, DOMAIN_MAX, Domain, ForwardPath, Host, LOCAL_PART_MAX, LocalPart, Mailbox, ReversePath,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cmd) = Command::parse(data) {
        let wire = cmd.to_string();
        assert!(wire.len() <= data.len().max(COMMAND_LINE_MAX), "{cmd:?} renders longer than its line: {wire:?}");
        assert_eq!(Command::parse(wire.as_bytes()).as_ref(), Ok(&cmd), "parse(render(c)) != c for {wire:?}");
        match &cmd {
            Command::Mail(ReversePath::Mailbox(m), _) | Command::Rcpt(ForwardPath::Mailbox(m), _) => mailbox_limits(m),
            _ => {}
        }
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    round_trip(text, ReversePath::parse);
    round_trip(text, ForwardPath::parse);
    round_trip(text, Mailbox::parse);
    round_trip(text, Host::parse);
    round_trip(text, Domain::parse);
    round_trip(text, LocalPart::parse);
    if let Ok(m) = Mailbox::parse(text) {
        mailbox_limits(&m);
    }
});

fn round_trip<T, E>(text: &str, parse: fn(&str) -> Result<T, E>)
where
    T: std::fmt::Display + std::fmt::Debug + PartialEq,
    E: std::fmt::Debug + PartialEq,
{
    if let Ok(value) = parse(text) {
        let wire = value.to_string();
        let again = parse(&wire);
        assert_eq!(again.as_ref(), Ok(&value), "{text:?} renders as {wire:?}, which parses differently");
        assert_eq!(again.unwrap().to_string(), wire, "canonical form is not a fixed point");
    }
}

fn mailbox_limits(m: &Mailbox) {
    assert!(m.local.as_str().len() <= LOCAL_PART_MAX, "local part {:?}", m.local);
    if let Some(d) = m.domain() {
        assert!(d.as_str().len() <= DOMAIN_MAX, "domain {d}");
    }
}
