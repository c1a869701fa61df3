//! The exchanges of an SMTP session and the reply codes RFC 5321 §4.3.2 allows for each: the
//! one table by which the simulation's clients and checker, and the catalogue's own tests,
//! judge a reply. Pure data; it decides nothing about what the gatekeeper answers.

use std::fmt;

/// One exchange of an SMTP session that gets a reply: a command, or one of the two that are not
/// commands (the greeting at connect, and the end of the message data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// Connection establishment: the greeting.
    Greeting,
    /// EHLO.
    Ehlo,
    /// HELO.
    Helo,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// The DATA command itself (answered 354 or refused).
    Data,
    /// The message and its final `.` (answered once the message is handed off or refused).
    EndOfData,
    /// RSET.
    Rset,
    /// VRFY.
    Vrfy,
    /// EXPN (not implemented by the gatekeeper: 502).
    Expn,
    /// HELP.
    Help,
    /// NOOP.
    Noop,
    /// QUIT.
    Quit,
}

impl Verb {
    /// Every exchange, the greeting first.
    pub const ALL: [Verb; 13] = [
        Verb::Greeting,
        Verb::Ehlo,
        Verb::Helo,
        Verb::Mail,
        Verb::Rcpt,
        Verb::Data,
        Verb::EndOfData,
        Verb::Rset,
        Verb::Vrfy,
        Verb::Expn,
        Verb::Help,
        Verb::Noop,
        Verb::Quit,
    ];

    /// The codes RFC 5321 §4.3.2 lists for this exchange, success, intermediate and error
    /// alike, in the RFC's order. STARTTLS, AUTH and the other extensions are not offered, so
    /// they have no row: they get 502 (§4.2.4).
    pub fn listed(self) -> &'static [u16] {
        match self {
            Verb::Greeting => &[220, 554],
            // 502 only from a server without EHLO; 504 only in obscure cases (§4.3.2).
            Verb::Ehlo | Verb::Helo => &[250, 504, 550, 502],
            Verb::Mail => &[250, 552, 451, 452, 550, 553, 503, 455, 555],
            Verb::Rcpt => &[250, 251, 550, 551, 552, 553, 450, 451, 452, 503, 455, 555],
            Verb::Data => &[354, 503, 554],
            // "I: 354 -> data -> S: 250 / E: 552, 554, 451, 452 / E: 450, 550 (policy)".
            Verb::EndOfData => &[250, 552, 554, 451, 452, 450, 550],
            Verb::Rset => &[250],
            Verb::Vrfy => &[250, 251, 252, 550, 551, 553, 502, 504],
            Verb::Expn => &[250, 252, 550, 500, 502, 504],
            Verb::Help => &[211, 214, 502, 504],
            Verb::Noop => &[250],
            Verb::Quit => &[221],
        }
    }

    /// Whether `code` may answer this exchange: a code [`Verb::listed`] for it, or one that
    /// may answer anything:
    ///
    /// - 421, the server closing the channel, in answer to anything (§3.8, §4.2.2);
    /// - 500 and 501, syntax errors and too-long lines, to any command (§4.3.2's preamble,
    ///   §4.5.3.1.10), the end of data included: 500 is the answer to an over-long text line;
    /// - 554 to RCPT: §4.3.2 does not list it, but it is the customary refusal to relay,
    ///   and §4.2.2 defines it as "transaction failed".
    ///
    /// After a 554 greeting the rule is another: see [`Verb::allows_after_refusal`].
    pub fn allows(self, code: u16) -> bool {
        code == 421
            || self.listed().contains(&code)
            || (self != Verb::Greeting && matches!(code, 500 | 501))
            || (self == Verb::Rcpt && code == 554)
    }

    /// Whether `code` may answer this exchange in a session whose greeting was 554: the server
    /// answers 503 to every command but QUIT (RFC 5321 §3.1), or 421 when it closes.
    pub fn allows_after_refusal(self, code: u16) -> bool {
        match self {
            Verb::Greeting | Verb::Quit => self.allows(code),
            _ => code == 503 || code == 421,
        }
    }

    /// The name: the command's verb, or `greeting` and `end of data`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Greeting => "greeting",
            Verb::Ehlo => "EHLO",
            Verb::Helo => "HELO",
            Verb::Mail => "MAIL",
            Verb::Rcpt => "RCPT",
            Verb::Data => "DATA",
            Verb::EndOfData => "end of data",
            Verb::Rset => "RSET",
            Verb::Vrfy => "VRFY",
            Verb::Expn => "EXPN",
            Verb::Help => "HELP",
            Verb::Noop => "NOOP",
            Verb::Quit => "QUIT",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_rfc_5321_section_4_3_2() {
        assert!(Verb::Greeting.allows(220) && Verb::Greeting.allows(554) && Verb::Greeting.allows(421));
        assert!(!Verb::Greeting.allows(500) && !Verb::Greeting.allows(250));
        assert!(Verb::Data.allows(354) && !Verb::Data.allows(250) && !Verb::Data.allows(451));
        assert!(Verb::EndOfData.allows(250) && Verb::EndOfData.allows(500) && !Verb::EndOfData.allows(354));
        assert!(Verb::Rcpt.allows(554) && !Verb::Mail.allows(554));
        assert!(Verb::Mail.allows(501) && !Verb::Mail.allows(251));
        assert!(Verb::Quit.allows(221) && !Verb::Quit.allows(250));
        for verb in Verb::ALL {
            assert!(verb.allows(421), "{verb}");
            assert!(verb.listed().iter().all(|&c| verb.allows(c) && (200..=559).contains(&c)), "{verb}");
        }
    }

    #[test]
    fn after_a_554_greeting_only_quit_is_answered() {
        assert!(Verb::Ehlo.allows_after_refusal(503) && !Verb::Ehlo.allows_after_refusal(250));
        assert!(Verb::Mail.allows_after_refusal(421));
        assert!(Verb::Quit.allows_after_refusal(221) && !Verb::Quit.allows_after_refusal(503));
    }
}
