//! Postfix log lines: `smtpd` sessions (connect, disconnect with its command counts, `NOQUEUE:
//! reject:` with sender, recipient and HELO, `QID: client=`), `postscreen` connections,
//! `cleanup` refusals, `qmgr` senders and the delivery agents' `to=... status=` lines.

use super::event::{Commands, Event, Key, Stage, Status, key_of};
use super::line::{Header, angle_field, bracketed, plain_field, reply_code};

/// The meaning of one Postfix line; `None`: not a line this parser knows.
pub fn parse<'a>(h: &Header<'a>) -> Option<Event<'a>> {
    if !h.program.starts_with("postfix") {
        return None;
    }
    let msg = h.msg;
    let key = || key_of(&[h.host.as_bytes(), h.program.as_bytes(), &h.pid.to_le_bytes()]);
    match h.daemon() {
        "smtpd" => smtpd(msg, key()),
        "postscreen" => postscreen(h.host, msg),
        "qmgr" => qmgr(msg),
        "cleanup" => cleanup(msg, key()),
        "local" | "virtual" | "lmtp" | "smtp" | "pipe" | "error" | "discard" | "relay" | "retry" => delivery(msg),
        _ => Some(Event::Ignored),
    }
}

/// A Postfix queue id: hex (`1A2B3C4D5E`) or the long form (`4Q2b3c1Xyz...`), before `": "`.
fn queue_id(msg: &str) -> Option<(&str, &str)> {
    let (id, rest) = msg.split_once(": ")?;
    let ok = (5..=20).contains(&id.len()) && id.bytes().all(|c| c.is_ascii_alphanumeric());
    ok.then_some((id, rest))
}

fn smtpd(msg: &str, key: Key) -> Option<Event<'_>> {
    if let Some(rest) = msg.strip_prefix("connect from ") {
        let (client, _) = bracketed(rest)?;
        return Some(Event::Connect { key, client });
    }
    if let Some(rest) = msg.strip_prefix("disconnect from ") {
        let (_, counts) = bracketed(rest)?;
        return Some(Event::Disconnect { key, commands: commands(counts) });
    }
    if let Some(rest) = msg.strip_prefix("NOQUEUE: ") {
        return reject(rest, None, key);
    }
    if let Some((qid, rest)) = queue_id(msg) {
        if let Some(c) = rest.strip_prefix("client=") {
            return Some(Event::Queued { key, qid, client: bracketed(c).map(|x| x.0) });
        }
        return reject(rest, Some(qid), key).or(Some(Event::Ignored));
    }
    // lost connection, timeout, warning:, too many errors, TLS, SASL...: the disconnect line
    // that follows says what the session did.
    Some(Event::Ignored)
}

/// `reject: RCPT from h[a]: 550 5.1.1 <x>: ...; from=<s> to=<x> proto=ESMTP helo=<h>` (and
/// `milter-reject:`); `reject_warning:`, `hold:`, `filter:`, `discard:` refuse nothing.
fn reject<'a>(rest: &'a str, qid: Option<&'a str>, key: Key) -> Option<Event<'a>> {
    let body = rest.strip_prefix("reject: ").or_else(|| rest.strip_prefix("milter-reject: "));
    let Some(body) = body else {
        return Some(Event::Ignored);
    };
    let (what, after) = body.split_once(" from ")?;
    let stage = match what {
        "CONNECT" => Stage::Connect,
        "EHLO" | "HELO" => Stage::Helo,
        "MAIL" => Stage::Mail,
        "RCPT" => Stage::Rcpt,
        "DATA" | "END-OF-MESSAGE" | "BDAT" => Stage::Data,
        // cleanup's header/body checks: `reject: header Subject: ... from h[a]; from=<...>`
        _ if what.starts_with("header ") || what.starts_with("body ") => Stage::Data,
        _ => Stage::Other,
    };
    let (client, tail) = match bracketed(after) {
        Some((c, t)) => (Some(c), t),
        None => (None, after),
    };
    let reply = tail.trim_start_matches(|c: char| c.is_ascii_digit() || c == ':' || c == ';').trim_start();
    let code = reply_code(reply).unwrap_or(550);
    // The envelope fields follow the last "; " (the reply text may itself contain ';').
    let fields = tail.rfind("; from=<").map_or(tail, |i| &tail[i..]);
    Some(Event::Reject {
        key,
        qid,
        client,
        stage,
        code,
        from: angle_field(fields, "from"),
        to: angle_field(fields, "to"),
        helo: angle_field(fields, "helo"),
    })
}

/// ` ehlo=1 mail=1 rcpt=0/1 data=0/1 quit=1 commands=3/5`
fn commands(s: &str) -> Option<Commands> {
    let mut c = Commands::default();
    let mut any = false;
    for word in s.split_ascii_whitespace() {
        let Some((name, v)) = word.split_once('=') else { continue };
        let (ok, given) = match v.split_once('/') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let n: u16 = v.parse().ok()?;
                (n, n)
            }
        };
        any = true;
        match name {
            "ehlo" | "helo" => c.helo += given,
            "mail" => c.mail = (ok, given),
            "rcpt" => c.rcpt = (ok, given),
            "data" | "bdat" => c.data = (ok, given),
            "commands" => c.all = (ok, given),
            _ => {}
        }
    }
    any.then_some(c)
}

fn postscreen<'a>(host: &str, msg: &'a str) -> Option<Event<'a>> {
    // Postscreen's own sessions are keyed by the client's address and port.
    let key_at = |s: &str| -> Option<(Key, std::net::IpAddr)> {
        let (addr, rest) = bracketed(s)?;
        let port = rest.strip_prefix(':').map(|p| p.split([' ', ':', ',']).next().unwrap_or(""))?;
        Some((key_of(&[host.as_bytes(), b"postscreen", addr.to_string().as_bytes(), port.as_bytes()]), addr))
    };
    if let Some(rest) = msg.strip_prefix("CONNECT from ") {
        let (key, client) = key_at(rest)?;
        return Some(Event::Connect { key, client });
    }
    if let Some(rest) = msg.strip_prefix("DISCONNECT ") {
        let (key, _) = key_at(rest)?;
        return Some(Event::Disconnect { key, commands: None });
    }
    for pass in ["PASS NEW ", "PASS OLD ", "WHITELISTED ", "ALLOWLISTED "] {
        if let Some(rest) = msg.strip_prefix(pass) {
            let (key, _) = key_at(rest)?;
            return Some(Event::Passed { key });
        }
    }
    if let Some(rest) = msg.strip_prefix("NOQUEUE: reject: ") {
        let (what, after) = rest.split_once(" from ")?;
        let (key, client) = key_at(after)?;
        let tail = &after[after.find("]:")? + 2..];
        let reply = tail.split_once(": ").map_or(tail, |x| x.1);
        let stage = if what == "RCPT" { Stage::Rcpt } else { Stage::Connect };
        let fields = reply.rfind("; from=<").map_or(reply, |i| &reply[i..]);
        return Some(Event::Reject {
            key,
            qid: None,
            client: Some(client),
            stage,
            code: reply_code(reply).unwrap_or(550),
            from: angle_field(fields, "from"),
            to: angle_field(fields, "to"),
            helo: angle_field(fields, "helo"),
        });
    }
    // PREGREET, DNSBL rank, HANGUP, COMMAND ..., BARE NEWLINE, NON-SMTP COMMAND, DENYLISTED,
    // cache cleanup: facts about the connection the replay does not need.
    Some(Event::Ignored)
}

fn qmgr(msg: &str) -> Option<Event<'_>> {
    let (qid, rest) = queue_id(msg)?;
    if rest == "removed" {
        return Some(Event::Removed { qid });
    }
    if rest.starts_with("from=<") {
        if rest.contains("status=expired") {
            return Some(Event::Ignored);
        }
        let from = angle_field(rest, "from")?;
        let nrcpt = plain_field(rest, "nrcpt").and_then(|n| n.parse().ok());
        return Some(Event::Sender { qid, from, nrcpt, origin: None });
    }
    Some(Event::Ignored)
}

fn cleanup(msg: &str, key: Key) -> Option<Event<'_>> {
    match queue_id(msg) {
        Some((qid, rest)) => reject(rest, Some(qid), key).or(Some(Event::Ignored)),
        None => Some(Event::Ignored),
    }
}

fn delivery(msg: &str) -> Option<Event<'_>> {
    let (qid, rest) = queue_id(msg)?;
    if !rest.starts_with("to=<") && !rest.starts_with("orig_to=<") {
        return Some(Event::Ignored);
    }
    let to = angle_field(rest, "orig_to").or_else(|| angle_field(rest, "to"))?;
    let status = match plain_field(rest, "status")? {
        "sent" | "delivered" => Status::Sent,
        "deferred" => Status::Deferred,
        _ => Status::Bounced,
    };
    Some(Event::Delivery { qid, to, status })
}

#[cfg(test)]
mod tests {
    use super::super::line::split;
    use super::super::time::YearClock;
    use super::*;

    fn ev(line: &str) -> Option<Event<'_>> {
        let mut c = YearClock::new(2026, 0);
        let h = split(line, &mut c).expect("header");
        parse(&h)
    }

    #[test]
    fn smtpd_session_lines() {
        let Some(Event::Connect { client, .. }) =
            ev("Dec  6 10:00:01 mx postfix/smtpd[12]: connect from a.example[192.0.2.1]")
        else {
            panic!()
        };
        assert_eq!(client.to_string(), "192.0.2.1");
        let Some(Event::Disconnect { commands: Some(c), .. }) = ev(
            "Dec  6 10:00:03 mx postfix/smtpd[12]: disconnect from a.example[192.0.2.1] ehlo=1 mail=1 rcpt=0/2 data=0/1 rset=1 quit=1 commands=4/7",
        ) else {
            panic!()
        };
        assert_eq!((c.helo, c.mail, c.rcpt, c.data, c.all), (1, (1, 1), (0, 2), (0, 1), (4, 7)));
        let line = "Dec  6 10:00:02 mx postfix/smtpd[12]: NOQUEUE: reject: RCPT from a.example[192.0.2.1]: 550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown in local recipient table; from=<s@remote.test> to=<nobody@example.test> proto=ESMTP helo=<a.example>";
        assert_eq!(
            ev(line),
            Some(Event::Reject {
                key: key_of(&[b"mx", b"postfix/smtpd", &12u32.to_le_bytes()]),
                qid: None,
                client: Some("192.0.2.1".parse().unwrap()),
                stage: Stage::Rcpt,
                code: 550,
                from: Some("s@remote.test"),
                to: Some("nobody@example.test"),
                helo: Some("a.example"),
            })
        );
        let Some(Event::Reject { qid, code, from, .. }) = ev(
            "Dec  6 10:00:02 mx postfix/smtpd[12]: 4F2B31C0A1: reject: RCPT from a[192.0.2.1]: 450 4.7.1 <x@y>: Recipient address rejected: try later; from=<> to=<x@y> proto=ESMTP helo=<a>",
        ) else {
            panic!()
        };
        assert_eq!((qid, code, from), (Some("4F2B31C0A1"), 450, Some("")));
        let Some(Event::Queued { qid, client, .. }) =
            ev("Dec  6 10:00:02 mx postfix/smtpd[12]: 4F2B31C0A1: client=a.example[2001:db8::5], sasl_method=PLAIN")
        else {
            panic!()
        };
        assert_eq!((qid, client), ("4F2B31C0A1", Some("2001:db8::5".parse().unwrap())));
        let Some(Event::Reject { stage, code, .. }) = ev(
            "Dec  6 10:00:02 mx postfix/smtpd[12]: NOQUEUE: milter-reject: END-OF-MESSAGE from a[192.0.2.1]: 5.7.1 virus; from=<a@b> to=<c@d> proto=ESMTP helo=<a>",
        ) else {
            panic!()
        };
        assert_eq!((stage, code), (Stage::Data, 550));
        assert_eq!(
            ev(
                "Dec  6 10:00:02 mx postfix/smtpd[12]: NOQUEUE: reject_warning: RCPT from a[192.0.2.1]: 550 x; from=<a@b> to=<c@d>"
            ),
            Some(Event::Ignored)
        );
        assert_eq!(
            ev("Dec  6 10:00:02 mx postfix/smtpd[12]: lost connection after RCPT from a[192.0.2.1]"),
            Some(Event::Ignored)
        );
        assert_eq!(ev("Dec  6 10:00:02 mx dovecot[12]: imap-login: x"), None);
    }

    #[test]
    fn queue_lines() {
        assert_eq!(
            ev("Dec  6 10:00:02 mx postfix/qmgr[9]: 4F2B31C0A1: from=<>, size=1234, nrcpt=2 (queue active)"),
            Some(Event::Sender { qid: "4F2B31C0A1", from: "", nrcpt: Some(2), origin: None })
        );
        assert_eq!(
            ev(
                "Dec  6 10:00:02 mx postfix/local[9]: 4F2B31C0A1: to=<alice@mx.example.test>, orig_to=<postmaster@example.test>, relay=local, delay=0.1, dsn=2.0.0, status=sent (delivered to mailbox)"
            ),
            Some(Event::Delivery { qid: "4F2B31C0A1", to: "postmaster@example.test", status: Status::Sent })
        );
        assert_eq!(
            ev(
                "Dec  6 10:00:02 mx postfix/lmtp[9]: 4F2B31C0A1: to=<bob@example.test>, relay=store[10.0.0.2]:24, delay=300, dsn=4.4.1, status=deferred (connect failed)"
            ),
            Some(Event::Delivery { qid: "4F2B31C0A1", to: "bob@example.test", status: Status::Deferred })
        );
        assert_eq!(
            ev("Dec  6 10:00:02 mx postfix/qmgr[9]: 4F2B31C0A1: removed"),
            Some(Event::Removed { qid: "4F2B31C0A1" })
        );
        let Some(Event::Reject { stage, qid, from, .. }) = ev(
            "Dec  6 10:00:02 mx postfix/cleanup[9]: 4F2B31C0A1: reject: header Subject: win from a[192.0.2.1]; from=<s@x> to=<b@example.test> proto=ESMTP helo=<a>: 5.7.1 spam",
        ) else {
            panic!()
        };
        assert_eq!((stage, qid, from), (Stage::Data, Some("4F2B31C0A1"), Some("s@x")));
    }

    #[test]
    fn postscreen_lines() {
        let c = ev("Dec  6 10:00:01 mx postfix/postscreen[5]: CONNECT from [192.0.2.9]:40000 to [192.0.2.1]:25");
        let p = ev("Dec  6 10:00:01 mx postfix/postscreen[5]: PASS NEW [192.0.2.9]:40000");
        let (Some(Event::Connect { key: a, .. }), Some(Event::Passed { key: b })) = (c, p) else { panic!() };
        assert_eq!(a, b);
        let Some(Event::Reject { key, code, from, to, .. }) = ev(
            "Dec  6 10:00:02 mx postfix/postscreen[5]: NOQUEUE: reject: RCPT from [192.0.2.9]:40000: 550 5.7.1 Service unavailable; client [192.0.2.9] blocked using zen.spamhaus.org; from=<a@b>, to=<c@example.test>, proto=ESMTP, helo=<x>",
        ) else {
            panic!()
        };
        assert_eq!((key, code, from, to), (a, 550, Some("a@b"), Some("c@example.test")));
    }
}
