//! The trace and envelope headers the production downstreams put above a delivered message,
//! and the RFC 5322 date they (and the ban listing) write wall-clock times in.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::proto::{DOMAIN_MAX, ForwardPath, Host, printable};
use crate::session::Envelope;

/// The trace and envelope headers put above a delivered message; printable ASCII only.
///
/// The client's HELO/EHLO argument should be a domain or an address literal (RFC 5321
/// §4.1.4). Like Postfix (without `reject_invalid_helo_hostname`) we accept any other, but
/// never copy it raw: it is shown as `from unknown`, with a sanitised copy (every octet but
/// printable ASCII, and the comment's own `(`, `)` and `\`, as `?`) in the comment, e.g.
/// `Received: from unknown ([192.0.2.1] helo=bad?host)`.
///
/// For a local store (the Maildir spool), which has no envelope: the envelope goes into the
/// message as `Return-Path:` and `X-Gatekeeper-Rcpt:` above the `Received:` line. A relay
/// carries the envelope in SMTP and uses [`received_header`] alone: it must never copy the
/// recipients into the message, where every recipient would see the Bcc ones.
pub fn trace_headers(envelope: &Envelope, hostname: &str, id: &str, wall: SystemTime) -> String {
    let rcpts: Vec<String> = envelope.rcpts.iter().map(ForwardPath::to_string).collect();
    format!(
        "Return-Path: {}\r\nX-Gatekeeper-Rcpt: {}\r\n{}",
        envelope.from,
        rcpts.join(", "),
        received_header(envelope, hostname, id, wall)
    )
}

/// The `Received:` trace header alone (RFC 5321 §4.4), for a message relayed to the MTA.
pub fn received_header(envelope: &Envelope, hostname: &str, id: &str, wall: SystemTime) -> String {
    let (helo, client) = (envelope.helo.as_str(), envelope.client);
    let from = if Host::parse(helo).is_ok() {
        format!("{helo} ([{client}])")
    } else if helo.is_empty() {
        format!("unknown ([{client}])")
    } else {
        let shown = printable(helo, DOMAIN_MAX).replace(['(', ')', '\\'], "?");
        format!("unknown ([{client}] helo={shown})")
    };
    // RFC 3848: ESMTPS when the message came over TLS.
    let with = if envelope.tls { "ESMTPS" } else { "ESMTP" };
    format!(
        "Received: from {from}\r\n\tby {hostname} (Gatekeeper) with {with} id {id};\r\n\t{}\r\n",
        rfc5322_date(wall)
    )
}

/// An RFC 5322 date (`Fri, 27 Nov 2026 06:41:27 +0000`) from a wall-clock time, in UTC.
pub fn rfc5322_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm), days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proto::ReversePath;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_761_687);
        assert_eq!(rfc5322_date(t), "Fri, 27 Nov 2026 06:41:27 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn received_header_holds_only_printable_ascii() {
        let envelope = |helo: &str| Envelope {
            session: 1,
            client: "192.0.2.1".parse().unwrap(),
            helo: helo.into(),
            from: ReversePath::Null,
            rcpts: vec![ForwardPath::parse("<alice@example.test>").unwrap()],
            tls: false,
        };
        let received = |helo: &str| {
            let h = trace_headers(&envelope(helo), "mx.test", "Q1", UNIX_EPOCH);
            assert!(h.split("\r\n").all(|l| l.bytes().all(|b| (32..=126).contains(&b) || b == b'\t')), "{h:?}");
            h.split("\r\n").find(|l| l.starts_with("Received:")).unwrap().to_string()
        };
        // A domain or an address literal is shown as given.
        assert_eq!(received("client.test"), "Received: from client.test ([192.0.2.1])");
        assert_eq!(received("[192.0.2.1]"), "Received: from [192.0.2.1] ([192.0.2.1])");
        assert_eq!(received("[IPv6:2001:db8::1]"), "Received: from [IPv6:2001:db8::1] ([192.0.2.1])");
        // Anything else is accepted but only a sanitised copy appears, in the comment.
        for (helo, shown) in [
            ("bad\rhost.test", "bad?host.test"),
            ("bad\thost.test", "bad?host.test"),
            ("bad\0host.test", "bad?host.test"),
            ("bad\x1b[31mhost.test", "bad?[31mhost.test"),
            ("b\u{e4}d.test", "b?d.test"),
            ("bad\x7fhost.test", "bad?host.test"),
            ("my_host", "my_host"),
            // The comment cannot be closed early to forge the header's structure.
            ("x) by evil.test (y\\", "x? by evil.test ?y?"),
        ] {
            assert_eq!(received(helo), format!("Received: from unknown ([192.0.2.1] helo={shown})"), "{helo:?}");
        }
        assert_eq!(received(""), "Received: from unknown ([192.0.2.1])");
    }
}
