//! RFC 3339 timestamps (UTC, `2026-12-02T06:01:33Z`): the one way the crate writes a time for
//! a machine to read, formatted by the `time` crate.
//!
//! Owns: the format: whole seconds, UTC, `Z`. Its readers: the access log's `time` (which adds
//! the milliseconds, [`crate::access_log::format`]), the certificates' dates in `/lb/status`,
//! `ringgate check` and the log, and when the certificates were applied.
//! Must not touch: clocks. Callers pass the time, so tests pin it.

use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// `t` to the second (the fraction is dropped, not rounded).
pub fn seconds(t: SystemTime) -> String {
    format(OffsetDateTime::from(t))
}

/// A Unix timestamp in seconds (a certificate's `notAfter`).
pub fn unix(secs: i64) -> String {
    match OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format(t),
        // Past year 9999 or before year -9999: no RFC 3339 form; the number says it.
        Err(_) => secs.to_string(),
    }
}

/// Whole seconds since the Unix epoch (negative before it).
pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

fn format(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    // RFC 3339 has four-digit years: a time outside years 0 to 9999 is written as its Unix
    // seconds rather than not at all.
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn whole_seconds_in_utc() {
        assert_eq!(seconds(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            seconds(UNIX_EPOCH + Duration::from_millis(1_796_191_293_999)),
            "2026-12-02T06:01:33Z"
        );
        assert_eq!(unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(unix(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(unix(253_402_300_799), "9999-12-31T23:59:59Z");
        assert_eq!(unix(-1), "1969-12-31T23:59:59Z");
        assert_eq!(unix(253_402_300_800), "253402300800");
        assert_eq!(unix(i64::MAX), i64::MAX.to_string());
    }

    #[test]
    fn unix_seconds_either_side_of_the_epoch() {
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_millis(1500)), 1);
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(5)), -5);
    }
}
