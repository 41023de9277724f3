//! Points in time as the API writes them (RFC 3339, UTC) and as calls take them (Unix
//! seconds or [`SystemTime`]), without a date library.

use crate::{Error, Result};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time for [`crate::Sandbox::get_metrics`]: Unix seconds, a
/// [`SystemTime`], or text (RFC 3339 such as `2025-01-31T12:00:00Z`, or Unix seconds).
/// Sub-second parts are dropped (samples are stamped in whole seconds).
///
/// ```no_run
/// # async fn demo(sbx: &nullspace::Sandbox) -> nullspace::Result<()> {
/// use nullspace::MetricsTime;
/// use std::time::{Duration, SystemTime};
/// let hour_ago = SystemTime::now() - Duration::from_secs(3600);
/// let samples = sbx.get_metrics(Some(hour_ago.into()), None).await?;
/// let same = sbx.get_metrics(Some(MetricsTime::from(1_700_000_000)), None).await?;
/// let parsed: MetricsTime = "2025-01-31T12:00:00Z".parse()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetricsTime(i64);

impl MetricsTime {
    /// Seconds since the Unix epoch.
    pub fn unix_seconds(self) -> i64 {
        self.0
    }

    /// The same instant as a [`SystemTime`].
    pub fn to_system_time(self) -> SystemTime {
        unix_to_system_time(self.0)
    }
}

impl From<i64> for MetricsTime {
    fn from(seconds: i64) -> Self {
        Self(seconds)
    }
}

impl From<SystemTime> for MetricsTime {
    fn from(t: SystemTime) -> Self {
        Self(system_time_to_unix(t))
    }
}

impl std::str::FromStr for MetricsTime {
    type Err = Error;

    /// RFC 3339 (`2025-01-31T12:00:00Z`, `2025-01-31T13:00:00.5+01:00`) or Unix seconds
    /// (`1738324800`, `1738324800.25`).
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Ok(n) = s.parse::<i64>() {
            return Ok(Self(n));
        }
        if let Ok(f) = s.parse::<f64>() {
            if f.is_finite() {
                return Ok(Self(f.floor() as i64));
            }
        }
        parse_rfc3339(s).map(Self::from).ok_or_else(|| {
            Error::invalid(format!(
                "{s:?} is not a time; send RFC 3339 (e.g. 2025-01-31T12:00:00Z) or Unix seconds"
            ))
        })
    }
}

/// Whole seconds since the epoch (negative before it), rounded down.
pub(crate) fn system_time_to_unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => {
            let d = e.duration();
            -(d.as_secs() as i64) - i64::from(d.subsec_nanos() > 0)
        }
    }
}

pub(crate) fn unix_to_system_time(seconds: i64) -> SystemTime {
    if seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(seconds as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    }
}

/// Parses RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`), the API's timestamps.
pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut nanos: u32 = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let frac = s.get(start..i)?;
        if frac.is_empty() {
            return None;
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = digits.parse().ok()?;
    }
    let offset = match s.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6
            && matches!(tz.as_bytes()[0], b'+' | b'-')
            && tz.as_bytes()[3] == b':' =>
        {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            let sign = if tz.as_bytes()[0] == b'-' { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let seconds =
        days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - offset;
    Some(unix_to_system_time(seconds) + Duration::from_nanos(u64::from(nanos)))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(s: &str) -> i64 {
        system_time_to_unix(parse_rfc3339(s).unwrap())
    }

    #[test]
    fn rfc3339_parses_like_the_api_writes_it() {
        assert_eq!(unix("1970-01-01T00:00:00Z"), 0);
        assert_eq!(unix("2025-01-31T12:00:00.123Z"), 1_738_324_800);
        assert_eq!(unix("2025-01-31T13:00:00+01:00"), 1_738_324_800);
        assert_eq!(unix("2024-02-29T00:00:00Z"), 1_709_164_800);
        assert_eq!(unix("1969-12-31T23:59:59Z"), -1);
        let t = parse_rfc3339("2025-01-31T12:00:00.5Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_738_324_800_500)
        );
        for bad in [
            "",
            "2025-01-31",
            "2025-02-30T00:00:00Z",
            "2025-01-31T12:00:00",
            "2025-01-31T12:00:00.Z",
            "2025-01-31T25:00:00Z",
            "2025-01-31T12:00:00+1:00",
            "２０２５-01-31T12:00:00Z",
            "2025-01-31T12:00:00é1:00",
            "2025-01-31T12:00:00+é:00",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn metrics_times_come_from_seconds_system_times_and_text() {
        assert_eq!(MetricsTime::from(5).unix_seconds(), 5);
        let t = UNIX_EPOCH + Duration::from_millis(10_900);
        assert_eq!(MetricsTime::from(t).unix_seconds(), 10);
        let before = UNIX_EPOCH - Duration::from_millis(1_500);
        assert_eq!(MetricsTime::from(before).unix_seconds(), -2);
        assert_eq!(
            MetricsTime::from(-2).to_system_time(),
            UNIX_EPOCH - Duration::from_secs(2)
        );
        let p = |s: &str| s.parse::<MetricsTime>().map(MetricsTime::unix_seconds);
        assert_eq!(p("1738324800").unwrap(), 1_738_324_800);
        assert_eq!(p("1738324800.75").unwrap(), 1_738_324_800);
        assert_eq!(p("2025-01-31T12:00:00Z").unwrap(), 1_738_324_800);
        let e = p("yesterday").unwrap_err();
        assert_eq!(e.code(), Some("invalid_request"), "{e}");
    }
}
