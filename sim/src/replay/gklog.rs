//! The gatekeeper's own JSON log (`--log-format json`: one object a line, the `conn` span with
//! the client as `peer`): its verdicts become the same events as an MTA's log lines. The log
//! names no addresses (a verdict's detail is evidence, not an envelope), so refusals and
//! messages are replayed with placeholders: an unknown recipient `unknown@<local domain>`, a
//! forged sender `forged@<local domain>`, a delivered message from `sender@replay.invalid` to
//! `postmaster@<local domain>`. That answers "what would this other configuration have done to
//! the same connections", not who wrote to whom.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use super::event::{Event, Stage, key_of};

#[derive(Debug, Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    timestamp: Option<&'a str>,
    #[serde(default)]
    message: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    rule: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    would_reject: Option<u16>,
    #[serde(default)]
    command: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    span: Option<Span<'a>>,
}

#[derive(Debug, Deserialize)]
struct Span<'a> {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default, borrow)]
    peer: Option<std::borrow::Cow<'a, str>>,
}

/// The time (ms since the epoch) and meaning of one JSON line; `None`: not a gatekeeper line.
pub fn parse(line: &str) -> Option<(i64, Event<'static>)> {
    let l: Line<'_> = serde_json::from_str(line).ok()?;
    let (at_ms, _) = super::time::rfc3339(l.timestamp?.as_bytes(), 0)?;
    let Some(span) = l.span else { return Some((at_ms, Event::Ignored)) };
    let Some(peer) = span.peer.as_deref() else { return Some((at_ms, Event::Ignored)) };
    let client = peer.parse::<SocketAddr>().map(|s| s.ip()).or_else(|_| peer.parse::<IpAddr>()).ok()?;
    let key = key_of(&[b"gatekeeper", &span.id.unwrap_or(0).to_le_bytes(), peer.as_bytes()]);
    let message = l.message.as_deref().unwrap_or("");
    if message != "verdict" && message != "observed verdict" {
        return Some((at_ms, Event::Connect { key, client }));
    }
    // An observed verdict was not carried out: the client got the accepting reply.
    let code = if message == "observed verdict" { l.would_reject } else { l.code }.unwrap_or(250);
    let rule = l.rule.as_deref().unwrap_or("");
    let stage = match l.command.as_deref().unwrap_or("") {
        "connect" => Stage::Connect,
        "MAIL" => Stage::Mail,
        "RCPT" => Stage::Rcpt,
        "DATA" => Stage::Data,
        _ => Stage::Other,
    };
    let ev = match (stage, code) {
        (Stage::Data, 200..=299) if rule == "deliver" || rule == "Deliver" => Event::Accepted { key, client },
        (_, 200..=399) => Event::Connect { key, client },
        (Stage::Mail, _) => Event::Reject {
            key,
            qid: None,
            client: Some(client),
            stage,
            code,
            from: Some(if rule == "E1" { "forged@{local}" } else { "sender@replay.invalid" }),
            to: None,
            helo: None,
        },
        (Stage::Rcpt, _) => Event::Reject {
            key,
            qid: None,
            client: Some(client),
            stage,
            code,
            from: Some("sender@replay.invalid"),
            to: Some(if code == 554 { "someone@relay.invalid" } else { "unknown@{local}" }),
            helo: None,
        },
        _ => Event::Reject { key, qid: None, client: Some(client), stage, code, from: None, to: None, helo: None },
    };
    Some((at_ms, ev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_lines() {
        let line = r#"{"timestamp":"2026-12-06T10:00:01.250Z","level":"INFO","message":"verdict","rule":"E2","verdict":"reject","code":550,"command":"RCPT","ban":"B4","detail":"x","span":{"id":7,"peer":"192.0.2.1:40000","name":"conn"}}"#;
        let (at, ev) = parse(line).unwrap();
        assert_eq!(at % 1000, 250);
        let Event::Reject { stage, code, to, client, .. } = ev else { panic!("{ev:?}") };
        assert_eq!(
            (stage, code, to, client),
            (Stage::Rcpt, 550, Some("unknown@{local}"), Some("192.0.2.1".parse().unwrap()))
        );
        let line = r#"{"timestamp":"2026-12-06T10:00:02Z","message":"verdict","rule":"Deliver","code":250,"command":"DATA","span":{"id":7,"peer":"[2001:db8::1]:25"}}"#;
        assert!(matches!(parse(line), Some((_, Event::Accepted { .. }))));
        let line = r#"{"timestamp":"2026-12-06T10:00:02Z","message":"serving","listen":"0.0.0.0:25"}"#;
        assert!(matches!(parse(line), Some((_, Event::Ignored))));
        assert!(parse("not json").is_none());
        assert!(parse(r#"{"message":"verdict"}"#).is_none());
    }
}
