//! sendmail log lines (`sm-mta`/`sendmail`): the receiving child's `from=... relay=h [a]`,
//! `ruleset=check_* ... reject=` refusals, `did not issue MAIL` sessions, and the delivery
//! lines `to=... stat=`. sendmail logs no connect line by default: a session is what one
//! receiving child logged (the assembler closes it when the child serves another client or
//! falls silent).

use super::event::{Event, Stage, Status, key_of};
use super::line::{Header, angle_field, bracketed, plain_field, reply_code};

/// The meaning of one sendmail line; `None`: not a line this parser knows.
pub fn parse<'a>(h: &Header<'a>) -> Option<Event<'a>> {
    if !matches!(h.program, "sm-mta" | "sendmail" | "sm-msp-queue") {
        return None;
    }
    let key = key_of(&[h.host.as_bytes(), b"sendmail", &h.pid.to_le_bytes()]);
    let (qid, rest) = h.msg.split_once(": ")?;
    let qid = (qid != "NOQUEUE").then_some(qid);
    if let Some(r) = rest.strip_prefix("ruleset=") {
        let stage = match r.split([',', ' ']).next() {
            Some("check_relay") => Stage::Connect,
            Some("check_mail") => Stage::Mail,
            Some("check_rcpt") => Stage::Rcpt,
            Some("check_data" | "check_eom") => Stage::Data,
            _ => Stage::Other,
        };
        let client = plain_relay(r);
        let reject = r.split_once("reject=")?.1;
        let arg1 = angle_field(r, "arg1").or_else(|| plain_field(r, "arg1"));
        let (from, to) = match stage {
            Stage::Mail => (arg1, None),
            Stage::Rcpt => (None, arg1),
            _ => (None, None),
        };
        return Some(Event::Reject {
            key,
            qid,
            client,
            stage,
            code: reply_code(reject).unwrap_or(550),
            from,
            to,
            helo: None,
        });
    }
    if rest.starts_with("from=") {
        let from = angle_field(rest, "from").or_else(|| plain_field(rest, "from"))?;
        let nrcpt = plain_field(rest, "nrcpts").and_then(|n| n.parse().ok());
        // A message submitted locally (relay=user@localhost) names no address.
        let origin = plain_relay(rest).map(|c| (key, c));
        let Some(qid) = qid else { return Some(Event::Ignored) };
        return Some(Event::Sender { qid, from, nrcpt, origin });
    }
    if rest.starts_with("to=") {
        let Some(qid) = qid else { return Some(Event::Ignored) };
        let to = angle_field(rest, "to").or_else(|| plain_field(rest, "to"))?;
        let stat = plain_field(rest, "stat")?;
        let status = match stat {
            "Sent" => Status::Sent,
            "Deferred" => Status::Deferred,
            _ => Status::Bounced,
        };
        // `to=a@x,b@x` lists several recipients; the first stands for the line.
        let to = to.split(',').next().unwrap_or(to);
        return Some(Event::Delivery { qid, to, status });
    }
    if let Some(r) = rest.strip_prefix("connect from ") {
        let (client, _) = bracketed(r)?;
        return Some(Event::Connect { key, client });
    }
    if (rest.contains("did not issue MAIL/EXPN/VRFY/ETRN") || rest.starts_with("lost input channel"))
        && let Some((client, _)) = bracketed(rest)
    {
        // A session the log shows only by its end.
        let stage = Stage::Other;
        return Some(Event::Reject {
            key,
            qid,
            client: Some(client),
            stage,
            code: 0,
            from: None,
            to: None,
            helo: None,
        });
    }
    Some(Event::Ignored)
}

/// The address of `relay=name [a]` or `relay=[a]`.
fn plain_relay(s: &str) -> Option<std::net::IpAddr> {
    let i = s.find("relay=")?;
    let r = &s[i + 6..];
    let end = r.find(", ").unwrap_or(r.len());
    bracketed(&r[..end]).map(|x| x.0)
}

#[cfg(test)]
mod tests {
    use super::super::line::split;
    use super::super::time::YearClock;
    use super::*;

    fn ev(line: &str) -> Option<Event<'_>> {
        let mut c = YearClock::new(2026, 0);
        parse(&split(line, &mut c).expect("header"))
    }

    #[test]
    fn sendmail_lines() {
        let Some(Event::Sender { qid, from, nrcpt, origin: Some((_, client)) }) = ev(
            "Dec  6 10:00:01 mx sm-mta[4242]: 0B6A01aB012345: from=<a@remote.test>, size=812, class=0, nrcpts=1, msgid=<x@y>, proto=ESMTP, daemon=MTA-v4, relay=a.remote.test [192.0.2.3]",
        ) else {
            panic!()
        };
        assert_eq!(
            (qid, from, nrcpt, client.to_string().as_str()),
            ("0B6A01aB012345", "a@remote.test", Some(1), "192.0.2.3")
        );
        let Some(Event::Reject { stage, to, code, client, .. }) = ev(
            "Dec  6 10:00:01 mx sm-mta[4242]: 0B6A01aB012345: ruleset=check_rcpt, arg1=<nobody@example.test>, relay=a.remote.test [192.0.2.3] (may be forged), reject=550 5.1.1 <nobody@example.test>... User unknown",
        ) else {
            panic!()
        };
        assert_eq!(
            (stage, to, code, client),
            (Stage::Rcpt, Some("nobody@example.test"), 550, Some("192.0.2.3".parse().unwrap()))
        );
        assert_eq!(
            ev(
                "Dec  6 10:00:02 mx sm-mta[4243]: 0B6A01aB012345: to=<bob@example.test>, delay=00:00:01, xdelay=00:00:01, mailer=local, pri=30, dsn=2.0.0, stat=Sent"
            ),
            Some(Event::Delivery { qid: "0B6A01aB012345", to: "bob@example.test", status: Status::Sent })
        );
        let Some(Event::Reject { stage: Stage::Other, client: Some(_), .. }) = ev(
            "Dec  6 10:00:02 mx sm-mta[4244]: 0B6A01aB012346: host.remote.test [192.0.2.4] did not issue MAIL/EXPN/VRFY/ETRN during connection to MTA-v4",
        ) else {
            panic!()
        };
        assert_eq!(
            ev("Dec  6 10:00:02 mx sm-mta[4244]: 0B6A01aB012346: STARTTLS=server, relay=x, version=TLSv1.3"),
            Some(Event::Ignored)
        );
        assert_eq!(ev("Dec  6 10:00:02 mx postfix/smtpd[1]: connect from a[192.0.2.1]"), None);
    }
}
