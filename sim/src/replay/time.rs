//! Log timestamps: classic syslog (`Dec  6 10:00:01`, no year, no zone), RFC 3339 (Debian 12
//! rsyslog's default high-precision format, `2026-12-06T10:00:01.123456+01:00`) and ISO 8601
//! with `Z` (the gatekeeper's JSON logs). Times are milliseconds since the Unix epoch, UTC.
//!
//! A year-less timestamp takes its year from a [`YearClock`]: the year given (`--year`), moved
//! on by one each time the month goes back (December → January), since a log runs forward.

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `(year, month, day, hour, minute, second)` of a time in ms since the epoch (UTC).
pub fn civil(ms: i64) -> (i64, u32, u32, u32, u32, u32) {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, (rem / 3600) as u32, (rem % 3600 / 60) as u32, (rem % 60) as u32)
}

/// `2026-12-06 10:00:01` (UTC) for reports.
pub fn show(ms: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(ms);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

const MONTHS: [&[u8; 3]; 12] =
    [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"];

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || b.len() > 9 {
        return None;
    }
    let mut n = 0u32;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u32::from(c - b'0');
    }
    Some(n)
}

fn hms(b: &[u8]) -> Option<(u32, u32, u32)> {
    // HH:MM:SS
    if b.len() != 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let (h, m, s) = (digits(&b[0..2])?, digits(&b[3..5])?, digits(&b[6..8])?);
    (h < 24 && m < 60 && s < 61).then_some((h, m, s))
}

/// The year of year-less timestamps, and the zone they are in.
#[derive(Debug, Clone, Copy)]
pub struct YearClock {
    year: i64,
    last_month: u32,
    /// Offset of the log's local time from UTC, seconds (`--utc-offset`).
    pub offset_secs: i64,
}

impl YearClock {
    /// Year-less stamps start in `year`, in a zone `offset_secs` east of UTC.
    pub fn new(year: i64, offset_secs: i64) -> YearClock {
        YearClock { year, last_month: 0, offset_secs }
    }

    /// The year now assumed.
    pub fn year(&self) -> i64 {
        self.year
    }

    /// A syslog stamp `Mmm dd HH:MM:SS` (15 octets; the day may be space-padded) in ms;
    /// moves the year on at a rollover.
    pub fn syslog(&mut self, b: &[u8]) -> Option<i64> {
        if b.len() < 15 || b[3] != b' ' || b[6] != b' ' {
            return None;
        }
        let month = MONTHS.iter().position(|m| &b[0..3] == *m)? as u32 + 1;
        let day = if b[4] == b' ' { digits(&b[5..6])? } else { digits(&b[4..6])? };
        if !(1..=31).contains(&day) {
            return None;
        }
        let (h, mi, s) = hms(&b[7..15])?;
        if month < self.last_month && self.last_month - month >= 6 {
            self.year += 1;
        }
        self.last_month = month;
        let days = days_from_civil(self.year, month, day);
        Some((days * 86_400 + i64::from(h * 3600 + mi * 60 + s) - self.offset_secs) * 1000)
    }
}

/// An RFC 3339 / ISO 8601 stamp: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` (a space instead of
/// `T` is taken too; no zone means `default_offset_secs`). Returns ms and the octets used.
pub fn rfc3339(b: &[u8], default_offset_secs: i64) -> Option<(i64, usize)> {
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b' ') {
        return None;
    }
    let y = i64::from(digits(&b[0..4])?);
    let (mo, d) = (digits(&b[5..7])?, digits(&b[8..10])?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let (h, mi, s) = hms(&b[11..19])?;
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &b[start..i];
        if frac.is_empty() {
            return None;
        }
        for (k, &c) in frac.iter().take(3).enumerate() {
            ms += i64::from(c - b'0') * [100, 10, 1][k];
        }
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') => {
            i += 1;
            0
        }
        Some(&sign @ (b'+' | b'-')) => {
            // ±HH:MM or ±HHMM
            let (oh, om, len) = if b.get(i + 3) == Some(&b':') {
                let z = b.get(i + 1..i + 6)?;
                (digits(&z[0..2])?, digits(&z[3..5])?, 6)
            } else {
                let z = b.get(i + 1..i + 5)?;
                (digits(&z[0..2])?, digits(&z[2..4])?, 5)
            };
            i += len;
            let off = i64::from(oh * 3600 + om * 60);
            if sign == b'-' { -off } else { off }
        }
        _ => default_offset_secs,
    };
    let days = days_from_civil(y, mo, d);
    Some(((days * 86_400 + i64::from(h * 3600 + mi * 60 + s) - offset) * 1000 + ms, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trips() {
        for ms in [0i64, 951_782_400_000, 1_795_000_000_000, 4_102_444_800_000] {
            let (y, mo, d, h, mi, s) = civil(ms);
            let back = (days_from_civil(y, mo, d) * 86_400 + i64::from(h * 3600 + mi * 60 + s)) * 1000;
            assert_eq!(back, ms);
        }
        assert_eq!(show(0), "1970-01-01 00:00:00");
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn syslog_stamps_roll_the_year_over() {
        let mut c = YearClock::new(2025, 0);
        let dec = c.syslog(b"Dec 31 23:59:59").unwrap();
        let jan = c.syslog(b"Jan  1 00:00:01").unwrap();
        assert_eq!(jan - dec, 2000);
        assert_eq!(c.year(), 2026);
        assert_eq!(show(jan), "2026-01-01 00:00:01");
        // Out-of-order lines within a month or two do not move the year.
        let mut c = YearClock::new(2026, 3600);
        c.syslog(b"Mar  2 10:00:00").unwrap();
        assert_eq!(show(c.syslog(b"Feb 28 11:00:00").unwrap()), "2026-02-28 10:00:00");
        assert_eq!(c.year(), 2026);
        for bad in [&b"Foo  1 00:00:00"[..], b"Dec 32 00:00:00", b"Dec  1 24:00:00", b"Dec  1 0:00:00", b"Dec"] {
            assert_eq!(YearClock::new(2026, 0).syslog(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn rfc3339_stamps_with_zones_and_fractions() {
        let (t, used) = rfc3339(b"2026-12-06T10:00:01.123456+01:00 host", 0).unwrap();
        assert_eq!((show(t), t % 1000, used), ("2026-12-06 09:00:01".to_string(), 123, 32));
        let (t, used) = rfc3339(b"2026-12-06T10:00:01Z", 0).unwrap();
        assert_eq!((show(t), used), ("2026-12-06 10:00:01".to_string(), 20));
        let (t, _) = rfc3339(b"2026-12-06T10:00:01-0230 x", 0).unwrap();
        assert_eq!(show(t), "2026-12-06 12:30:01");
        let (t, used) = rfc3339(b"2026-12-06 10:00:01 x", 3600).unwrap();
        assert_eq!((show(t), used), ("2026-12-06 09:00:01".to_string(), 19));
        for bad in
            [&b"2026-13-06T10:00:01Z"[..], b"2026-12-06T10:00:01.+01:00", b"2026-12-06T10:00", b"2026-12-06T10:00:01+0"]
        {
            assert_eq!(rfc3339(bad, 0), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
