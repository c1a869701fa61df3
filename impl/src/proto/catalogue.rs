//! The catalogue of replies the gatekeeper sends: one named constructor per reply, so that the
//! session and the rules never spell a code or a text inline, and a reader finds every word the
//! gatekeeper can say in one place. Codes follow RFC 5321 §4.2.2 and §4.3.2 (see `verb`),
//! enhanced codes RFC 3463.
//!
//! The texts are part of the gatekeeper's observable behaviour (clients, logs and the
//! simulation's reports see them): change one only on purpose. Client text quoted back is
//! made safe here (`echo`), so every reply stays a textstring within 512-octet lines. No
//! decisions: which reply a situation deserves is the session's and the rules' business.

use std::borrow::Cow;

use super::{Enhanced, PathError, Reply};

/// The commands HELP lists.
const HELP: &str = "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP";

/// Connection: the greeting, refusals at connect, and the closing replies.
impl Reply {
    /// 220: the greeting (no enhanced code before EHLO, RFC 2034 §3).
    pub fn greeting(host: &str) -> Reply {
        Reply::plain(220, vec![format!("{host} ESMTP Gatekeeper").into()])
    }

    /// 554 5.7.1 at connect to a banned client (G2); the session then answers 503 until QUIT
    /// (RFC 5321 §3.1).
    pub fn banned(host: &str) -> Reply {
        Reply::new(554, Enhanced(5, 7, 1), format!("{host} Service unavailable: your address is banned"))
    }

    /// 421 4.7.0 at connect: over the connection rate (G1).
    pub fn rate_limited(host: &str) -> Reply {
        Reply::new(421, Enhanced(4, 7, 0), format!("{host} Too many connections from your address, try again later"))
    }

    /// 421 4.3.2 at connect: too many sessions overall or from this address.
    pub fn busy(host: &str) -> Reply {
        Reply::new(421, Enhanced(4, 3, 2), format!("{host} Too busy, try again later"))
    }

    /// 421 4.3.2: the server is shutting down (RFC 5321 §3.8).
    pub fn shutting_down(host: &str) -> Reply {
        Reply::new(421, Enhanced(4, 3, 2), format!("{host} Service shutting down, closing connection"))
    }

    /// 421 4.4.2: no command or data within the timeout (RFC 5321 §4.5.3.2.7).
    pub fn idle_timeout(host: &str) -> Reply {
        Reply::new(421, Enhanced(4, 4, 2), format!("{host} Timeout waiting for input, closing connection"))
    }

    /// 421 4.4.2: the session has lasted as long as a session may.
    pub fn lifetime_exceeded(host: &str) -> Reply {
        Reply::new(421, Enhanced(4, 4, 2), format!("{host} Session lifetime exceeded, closing connection"))
    }

    /// 421 4.7.0 after the reply that carried a ban: a ban ends the session that earned it.
    pub fn banned_closing(host: &str) -> Reply {
        Reply::new(421, Enhanced(4, 7, 0), format!("{host} Your address is banned, closing connection"))
    }

    /// 421 4.7.0 to DATA after an unknown recipient, when that makes a dictionary attack (E2,
    /// ban B4): no message is taken, the session ends (RFC 5321 §3.8).
    pub fn unknown_recipients_closing() -> Reply {
        Reply::new(421, Enhanced(4, 7, 0), "Unknown recipients given, closing connection")
    }

    /// 421 4.7.0: the client has had as many 4xx/5xx replies as a session allows.
    pub fn too_many_errors(host: &str) -> Reply {
        Reply::new(421, Enhanced(4, 7, 0), format!("{host} Too many errors, closing connection"))
    }

    /// 421 4.7.0: the session has given as many messages as one session may
    /// (`smtp.messages_max`); the client sends the rest in a new session.
    pub fn too_many_messages(host: &str) -> Reply {
        Reply::new(421, Enhanced(4, 7, 0), format!("{host} Too many messages in this session, closing connection"))
    }

    /// 451 4.7.1: the client gave its hourly share of messages (`smtp.client_messages_max`);
    /// its queue retries later. (Postfix says 450, which RFC 5321 §4.3.2 does not list for
    /// MAIL.)
    pub fn too_much_mail_from_client() -> Reply {
        Reply::new(451, Enhanced(4, 7, 1), "Too much mail from your address this hour, try again later")
    }

    /// 221 2.0.0: the answer to QUIT.
    pub fn bye(host: &str) -> Reply {
        Reply::new(221, Enhanced(2, 0, 0), format!("{host} Bye"))
    }
}

/// Commands outside a transaction, and errors of syntax and sequence.
impl Reply {
    /// 250 to EHLO: our name, the client's as it gave it (quoted safely), and the extensions we
    /// advertise: PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152),
    /// ENHANCEDSTATUSCODES (RFC 2034).
    pub fn ehlo(host: &str, client: &str, size_max: u64) -> Reply {
        Reply::ehlo_offering(host, client, size_max, false)
    }

    /// 250 to EHLO, with `STARTTLS` among the extensions when `starttls` (RFC 3207: offered
    /// only while TLS is available and not yet in use).
    pub fn ehlo_offering(host: &str, client: &str, size_max: u64, starttls: bool) -> Reply {
        let mut lines = vec![
            format!("{host} greets {}", echo(client)).into(),
            "PIPELINING".into(),
            format!("SIZE {size_max}").into(),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if starttls {
            lines.push("STARTTLS".into());
        }
        Reply::plain(250, lines)
    }

    /// 220 2.0.0 to STARTTLS: the TLS handshake follows (RFC 3207 §4).
    pub fn tls_ready() -> Reply {
        Reply::new(220, Enhanced(2, 0, 0), "Ready to start TLS")
    }

    /// 454 4.7.0 to STARTTLS: no handshake can be started now (too many under way); the
    /// session goes on in clear text (RFC 3207 §4).
    pub fn tls_unavailable() -> Reply {
        Reply::new(454, Enhanced(4, 7, 0), "TLS not available due to temporary reason")
    }

    /// 503 5.5.1 to STARTTLS once TLS is on, or during a mail transaction.
    pub fn tls_bad_sequence(why: &'static str) -> Reply {
        Reply::new(503, Enhanced(5, 5, 1), why)
    }

    /// 250 to HELO: our name, no extensions.
    pub fn helo(host: &str) -> Reply {
        Reply::plain(250, vec![host.to_owned().into()])
    }

    /// 250 2.0.0 to RSET.
    pub fn reset() -> Reply {
        Reply::new(250, Enhanced(2, 0, 0), "Reset OK")
    }

    /// 250 2.0.0 to NOOP.
    pub fn noop() -> Reply {
        Reply::new(250, Enhanced(2, 0, 0), "OK")
    }

    /// 214 2.0.0 to HELP.
    pub fn help() -> Reply {
        Reply::new(214, Enhanced(2, 0, 0), HELP)
    }

    /// 252 2.5.2 to VRFY: we do not disclose users (RFC 5321 §3.5.3 permits 252).
    pub fn cannot_vrfy() -> Reply {
        Reply::new(252, Enhanced(2, 5, 2), "Cannot VRFY user, but will accept message and attempt delivery")
    }

    /// 502 5.5.1: a command we know but do not implement (EXPN, STARTTLS, AUTH …).
    pub fn not_implemented() -> Reply {
        Reply::new(502, Enhanced(5, 5, 1), "Command not implemented")
    }

    /// 500 5.5.1: not a command.
    pub fn unrecognized() -> Reply {
        Reply::new(500, Enhanced(5, 5, 1), "Command unrecognized")
    }

    /// 500 5.5.2: a command line over 512 octets (RFC 5321 §4.5.3.1.4).
    pub fn line_too_long() -> Reply {
        Reply::new(500, Enhanced(5, 5, 2), "Line too long")
    }

    /// 500 5.5.2: a command line that is not text.
    pub fn not_text() -> Reply {
        Reply::new(500, Enhanced(5, 5, 2), "Syntax error: command line is not text")
    }

    /// 501 5.5.4: a known command with bad arguments; `what` says which.
    pub fn syntax(what: &str) -> Reply {
        Reply::new(501, Enhanced(5, 5, 4), format!("Syntax error: {what}"))
    }

    /// 555 5.5.4: an ESMTP parameter we did not advertise (RFC 5321 §4.1.1.11), quoted safely.
    pub fn bad_parameter(param: &str) -> Reply {
        Reply::new(555, Enhanced(5, 5, 4), format!("Parameter not recognized: {}", echo(param)))
    }

    /// 503 5.5.1 to every command but QUIT after a 554 greeting (RFC 5321 §3.1).
    pub fn refused_session() -> Reply {
        Reply::new(503, Enhanced(5, 5, 1), "Bad sequence of commands: service unavailable")
    }

    /// 503 5.5.1: MAIL before EHLO or HELO.
    pub fn need_helo() -> Reply {
        Reply::new(503, Enhanced(5, 5, 1), "Send EHLO or HELO first")
    }

    /// 503 5.5.1: MAIL inside a transaction.
    pub fn nested_mail() -> Reply {
        Reply::new(503, Enhanced(5, 5, 1), "Nested MAIL command")
    }

    /// 503 5.5.1: RCPT outside a transaction.
    pub fn need_mail() -> Reply {
        Reply::new(503, Enhanced(5, 5, 1), "Need MAIL before RCPT")
    }

    /// 503 5.5.1: DATA outside a transaction.
    pub fn need_mail_and_rcpt() -> Reply {
        Reply::new(503, Enhanced(5, 5, 1), "Need MAIL and RCPT before DATA")
    }
}

/// The transaction: MAIL, RCPT, DATA and the end of the message.
impl Reply {
    /// 553 5.1.7: a MAIL FROM path that does not parse (E1).
    pub fn bad_sender(error: PathError) -> Reply {
        let text = match error {
            PathError::NoDomain => "Sender address must have a domain",
            PathError::TooLong => "Sender address too long",
            _ => "Bad sender address syntax",
        };
        Reply::new(553, Enhanced(5, 1, 7), text)
    }

    /// 553 5.1.3: a RCPT TO path that does not parse (RFC 5321 §4.1.1.3).
    pub fn bad_recipient(error: PathError) -> Reply {
        let text = match error {
            PathError::NoDomain => "Recipient address must have a domain",
            PathError::TooLong => "Recipient address too long",
            _ => "Bad recipient address syntax",
        };
        Reply::new(553, Enhanced(5, 1, 3), text)
    }

    /// 451 4.3.2 to MAIL on a connection without a client address (PROXY `UNKNOWN` / v2
    /// `LOCAL`, a health check): no rule can judge a client it cannot name, so no mail.
    pub fn no_client_address() -> Reply {
        Reply::new(451, Enhanced(4, 3, 2), "No client address (PROXY UNKNOWN): not accepting mail, try another server")
    }

    /// 250 2.1.0: MAIL FROM accepted.
    pub fn sender_ok() -> Reply {
        Reply::new(250, Enhanced(2, 1, 0), "Sender OK")
    }

    /// 550 5.7.1: a sender in a local domain that is no local user (E1, ban B1).
    pub fn forged_local_sender() -> Reply {
        Reply::new(550, Enhanced(5, 7, 1), "Sender is not a user of this domain")
    }

    /// 552 5.3.4: over SIZE, announced at MAIL (RFC 1870 §6) or found at the end of data.
    pub fn too_big() -> Reply {
        Reply::new(552, Enhanced(5, 3, 4), "Message size exceeds fixed maximum message size")
    }

    /// 250 2.1.5: RCPT TO accepted.
    pub fn recipient_ok() -> Reply {
        Reply::new(250, Enhanced(2, 1, 5), "Recipient OK")
    }

    /// 550 5.1.1: no such local user (E2; towards ban B4 for a non-null sender).
    pub fn unknown_user() -> Reply {
        Reply::new(550, Enhanced(5, 1, 1), "No such user here")
    }

    /// 554 5.7.1: a recipient in no local domain; we are never a relay.
    pub fn relay_denied() -> Reply {
        Reply::new(554, Enhanced(5, 7, 1), "Relay access denied")
    }

    /// 452 4.5.3: over the recipients of one transaction (RFC 5321 §4.5.3.1.10).
    pub fn too_many_recipients() -> Reply {
        Reply::new(452, Enhanced(4, 5, 3), "Too many recipients")
    }

    /// 550 5.1.7: the sender's callback proved it does not exist (C1, ban B2), or its domain
    /// cannot receive mail (NXDOMAIN: no ban).
    pub fn sender_rejected() -> Reply {
        Reply::new(550, Enhanced(5, 1, 7), "Sender address rejected: it does not exist at its domain")
    }

    /// 451 4.4.3: the sender's callback was inconclusive (C1 with `on_unknown = tempfail`).
    pub fn sender_unverified() -> Reply {
        Reply::new(451, Enhanced(4, 4, 3), "Sender address could not be verified, try again later")
    }

    /// 554 5.5.1 to DATA when every recipient was refused (RFC 2920 §3.1, RFC 5321 §3.3).
    pub fn no_valid_recipients() -> Reply {
        Reply::new(554, Enhanced(5, 5, 1), "No valid recipients")
    }

    /// 354 to DATA: send the message (no enhanced code: RFC 3463 has no class 3).
    pub fn start_data() -> Reply {
        Reply::plain(354, vec!["End data with <CR><LF>.<CR><LF>".into()])
    }

    /// 554 5.7.1 at the end of data: the scanner found `signature` (V1, ban B3 unless from
    /// `<>` or to postmaster/abuse).
    pub fn virus(signature: &str) -> Reply {
        Reply::new(554, Enhanced(5, 7, 1), format!("Message rejected: virus found ({signature})"))
    }

    /// 451 4.7.0 at the end of data: the scanner could not scan (V1 with
    /// `on_scan_failure = tempfail`).
    pub fn scan_failed() -> Reply {
        Reply::new(451, Enhanced(4, 7, 0), "Message could not be scanned, try again later")
    }

    /// 250 2.0.0 at the end of data: handed off durably as `queue_id`.
    pub fn queued(queue_id: &str) -> Reply {
        Reply::new(250, Enhanced(2, 0, 0), format!("Ok: queued as {queue_id}"))
    }

    /// 452 4.3.1 at MAIL or the end of data: free space is below `server.queue_minfree`, or
    /// the message could not be written (RFC 3463: mail system full).
    pub fn insufficient_storage() -> Reply {
        Reply::new(452, Enhanced(4, 3, 1), "Insufficient system storage, try again later")
    }

    /// 451 4.3.0 at the end of data: the handoff failed for now.
    pub fn local_error() -> Reply {
        Reply::new(451, Enhanced(4, 3, 0), "Local error in processing, try again later")
    }

    /// 554 5.3.0 at the end of data: the downstream refused the message for good.
    pub fn refused_downstream() -> Reply {
        Reply::new(554, Enhanced(5, 3, 0), "Message refused downstream")
    }
}

/// Client text quoted in a reply: at most 64 printable ASCII characters, so that the reply
/// line stays within 512 octets (RFC 5321 §4.5.3.1.5) and holds no CR, LF or control octet
/// (§4.2 textstring).
fn echo(s: &str) -> Cow<'_, str> {
    super::text::printable(s, 64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Verb;

    /// Every reply of the catalogue, its wire form, and the exchange it answers. The texts are
    /// observable behaviour: this table changes only on purpose.
    fn catalogue() -> Vec<(Reply, &'static str, &'static [Verb])> {
        use Verb::*;
        let h = "mx.test";
        let any: &[Verb] = &Verb::ALL;
        let commands: &[Verb] = &Verb::ALL[1..];
        vec![
            (Reply::greeting(h), "220 mx.test ESMTP Gatekeeper\r\n", &[Greeting]),
            (Reply::banned(h), "554 5.7.1 mx.test Service unavailable: your address is banned\r\n", &[Greeting]),
            (
                Reply::rate_limited(h),
                "421 4.7.0 mx.test Too many connections from your address, try again later\r\n",
                &[Greeting],
            ),
            (Reply::busy(h), "421 4.3.2 mx.test Too busy, try again later\r\n", &[Greeting]),
            (Reply::shutting_down(h), "421 4.3.2 mx.test Service shutting down, closing connection\r\n", any),
            (Reply::idle_timeout(h), "421 4.4.2 mx.test Timeout waiting for input, closing connection\r\n", any),
            (Reply::lifetime_exceeded(h), "421 4.4.2 mx.test Session lifetime exceeded, closing connection\r\n", any),
            (Reply::banned_closing(h), "421 4.7.0 mx.test Your address is banned, closing connection\r\n", any),
            (
                Reply::unknown_recipients_closing(),
                "421 4.7.0 Unknown recipients given, closing connection\r\n",
                &[Data],
            ),
            (Reply::too_many_errors(h), "421 4.7.0 mx.test Too many errors, closing connection\r\n", any),
            (
                Reply::too_many_messages(h),
                "421 4.7.0 mx.test Too many messages in this session, closing connection\r\n",
                &[Mail],
            ),
            (Reply::bye(h), "221 2.0.0 mx.test Bye\r\n", &[Quit]),
            (
                Reply::ehlo(h, "client.test", 1000),
                "250-mx.test greets client.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n\
                 250 ENHANCEDSTATUSCODES\r\n",
                &[Ehlo],
            ),
            (Reply::helo(h), "250 mx.test\r\n", &[Helo]),
            (Reply::reset(), "250 2.0.0 Reset OK\r\n", &[Rset]),
            (Reply::noop(), "250 2.0.0 OK\r\n", &[Noop]),
            (Reply::help(), "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\r\n", &[Help]),
            (
                Reply::cannot_vrfy(),
                "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n",
                &[Vrfy],
            ),
            (Reply::not_implemented(), "502 5.5.1 Command not implemented\r\n", &[Expn]),
            (Reply::unrecognized(), "500 5.5.1 Command unrecognized\r\n", commands),
            (Reply::line_too_long(), "500 5.5.2 Line too long\r\n", commands),
            (Reply::not_text(), "500 5.5.2 Syntax error: command line is not text\r\n", commands),
            (Reply::syntax("missing domain"), "501 5.5.4 Syntax error: missing domain\r\n", commands),
            (Reply::bad_parameter("X=1"), "555 5.5.4 Parameter not recognized: X=1\r\n", &[Mail, Rcpt]),
            (
                Reply::refused_session(),
                "503 5.5.1 Bad sequence of commands: service unavailable\r\n",
                &[Mail, Rcpt, Data],
            ),
            (Reply::need_helo(), "503 5.5.1 Send EHLO or HELO first\r\n", &[Mail]),
            (Reply::nested_mail(), "503 5.5.1 Nested MAIL command\r\n", &[Mail]),
            (Reply::need_mail(), "503 5.5.1 Need MAIL before RCPT\r\n", &[Rcpt]),
            (Reply::need_mail_and_rcpt(), "503 5.5.1 Need MAIL and RCPT before DATA\r\n", &[Data]),
            (Reply::bad_sender(PathError::NoDomain), "553 5.1.7 Sender address must have a domain\r\n", &[Mail]),
            (Reply::bad_sender(PathError::TooLong), "553 5.1.7 Sender address too long\r\n", &[Mail]),
            (Reply::bad_sender(PathError::BadDomain), "553 5.1.7 Bad sender address syntax\r\n", &[Mail]),
            (Reply::bad_recipient(PathError::NoDomain), "553 5.1.3 Recipient address must have a domain\r\n", &[Rcpt]),
            (Reply::bad_recipient(PathError::TooLong), "553 5.1.3 Recipient address too long\r\n", &[Rcpt]),
            (Reply::bad_recipient(PathError::NoBrackets), "553 5.1.3 Bad recipient address syntax\r\n", &[Rcpt]),
            (
                Reply::no_client_address(),
                "451 4.3.2 No client address (PROXY UNKNOWN): not accepting mail, try another server\r\n",
                &[Mail],
            ),
            (Reply::sender_ok(), "250 2.1.0 Sender OK\r\n", &[Mail]),
            (Reply::forged_local_sender(), "550 5.7.1 Sender is not a user of this domain\r\n", &[Mail]),
            (Reply::too_big(), "552 5.3.4 Message size exceeds fixed maximum message size\r\n", &[Mail, EndOfData]),
            (Reply::recipient_ok(), "250 2.1.5 Recipient OK\r\n", &[Rcpt]),
            (Reply::unknown_user(), "550 5.1.1 No such user here\r\n", &[Rcpt]),
            (Reply::relay_denied(), "554 5.7.1 Relay access denied\r\n", &[Rcpt]),
            (Reply::too_many_recipients(), "452 4.5.3 Too many recipients\r\n", &[Rcpt]),
            (
                Reply::sender_rejected(),
                "550 5.1.7 Sender address rejected: it does not exist at its domain\r\n",
                &[Rcpt],
            ),
            (
                Reply::sender_unverified(),
                "451 4.4.3 Sender address could not be verified, try again later\r\n",
                &[Rcpt],
            ),
            (Reply::no_valid_recipients(), "554 5.5.1 No valid recipients\r\n", &[Data]),
            (Reply::start_data(), "354 End data with <CR><LF>.<CR><LF>\r\n", &[Data]),
            (Reply::virus("Eicar"), "554 5.7.1 Message rejected: virus found (Eicar)\r\n", &[EndOfData]),
            (Reply::scan_failed(), "451 4.7.0 Message could not be scanned, try again later\r\n", &[EndOfData]),
            (Reply::queued("q1"), "250 2.0.0 Ok: queued as q1\r\n", &[EndOfData]),
            (Reply::local_error(), "451 4.3.0 Local error in processing, try again later\r\n", &[EndOfData]),
            (Reply::refused_downstream(), "554 5.3.0 Message refused downstream\r\n", &[EndOfData]),
            (
                Reply::insufficient_storage(),
                "452 4.3.1 Insufficient system storage, try again later\r\n",
                &[Mail, EndOfData],
            ),
        ]
    }

    #[test]
    fn every_reply_is_pinned_parses_back_and_is_allowed_where_it_is_sent() {
        for (reply, wire, verbs) in catalogue() {
            assert_eq!(reply.to_wire(), wire);
            assert_eq!(Reply::parse(wire.as_bytes()), Ok(reply.clone()), "{wire:?}");
            // RFC 2034 §3 / RFC 3463: the enhanced class is the code's.
            if let Some(Enhanced(class, _, _)) = reply.enhanced {
                assert_eq!(u16::from(class), reply.code / 100, "{wire:?}");
            }
            for verb in verbs {
                assert!(verb.allows(reply.code), "{verb} does not allow {wire:?}");
            }
        }
    }

    #[test]
    fn echo_keeps_replies_within_their_limits() {
        assert_eq!(echo("client.test"), "client.test");
        assert_eq!(echo("a\r\nb\u{e9}"), "a??b?");
        assert_eq!(echo(&"x".repeat(300)).len(), 64);
        let long = Reply::ehlo(&"h".repeat(255), &"\u{1}".repeat(1000), u64::MAX);
        assert!(Reply::parse(long.to_wire().as_bytes()).is_ok());
    }
}
