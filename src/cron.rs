//! Cron schedules as CronJobs write them: five fields (minute, hour, day of month, month, day of
//! week) with `*`, `?`, ranges, steps, lists and names (`JAN`, `MON`), the macros `@yearly`,
//! `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight`, `@hourly` and `@every <duration>`,
//! evaluated in a time zone. Day of month and day of week combine as in cron: if both are
//! restricted, either may match; if one is `*`, both must.

use std::time::Duration;

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Fields(Fields),
    Every(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    minute: u64,
    hour: u64,
    dom: u64,
    month: u64,
    dow: u64,
    /// The day-of-month or day-of-week field was `*` or `?`.
    dom_star: bool,
    dow_star: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Parses a schedule; the error says what is wrong, for a field error on `spec.schedule`.
pub fn parse(spec: &str) -> Result<Schedule, String> {
    let spec = spec.trim();
    if spec.starts_with("TZ=") || spec.starts_with("CRON_TZ=") {
        return Err("cannot use TZ or CRON_TZ in schedule, use timeZone field instead".into());
    }
    if let Some(m) = spec.strip_prefix('@') {
        let fields = match m.to_ascii_lowercase().as_str() {
            "yearly" | "annually" => "0 0 1 1 *",
            "monthly" => "0 0 1 * *",
            "weekly" => "0 0 * * 0",
            "daily" | "midnight" => "0 0 * * *",
            "hourly" => "0 * * * *",
            other => {
                if let Some(d) = other.strip_prefix("every ") {
                    let d = parse_go_duration(d.trim())
                        .ok_or_else(|| format!("failed to parse duration {spec}"))?;
                    if d < Duration::from_secs(1) {
                        return Err(format!("failed to parse duration {spec}"));
                    }
                    return Ok(Schedule::Every(Duration::from_secs(d.as_secs())));
                }
                return Err(format!("unrecognized descriptor: {spec}"));
            }
        };
        return parse(fields);
    }
    let parts: Vec<&str> = spec.split_whitespace().collect();
    if parts.len() != 5 {
        return Err(format!(
            "expected exactly 5 fields, found {}: {spec}",
            parts.len()
        ));
    }
    let (minute, _) = field(parts[0], 0, 59, &[])?;
    let (hour, _) = field(parts[1], 0, 23, &[])?;
    let (dom, dom_star) = field(parts[2], 1, 31, &[])?;
    let (month, _) = field(parts[3], 1, 12, &MONTHS)?;
    let (dow, dow_star) = field(parts[4], 0, 6, &DAYS)?;
    Ok(Schedule::Fields(Fields {
        minute,
        hour,
        dom,
        month,
        dow,
        dom_star,
        dow_star,
    }))
}

/// A Go duration such as `1h30m`, `90s`, `2.5h`.
fn parse_go_duration(s: &str) -> Option<Duration> {
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += n * unit;
    }
    Some(Duration::from_secs_f64(total))
}

/// One field as a bit set, and whether it was `*`/`?`.
fn field(s: &str, min: u32, max: u32, names: &[&str]) -> Result<(u64, bool), String> {
    let mut bits = 0u64;
    let mut star = false;
    for part in s.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, st)) => {
                let st: u32 = st
                    .parse()
                    .map_err(|_| format!("failed to parse int from {st}: invalid syntax"))?;
                if st == 0 {
                    return Err(format!("step of range should be a positive number: {part}"));
                }
                (r, Some(st))
            }
            None => (part, None),
        };
        let (lo, hi) = if range == "*" || range == "?" {
            if step.is_none() {
                star = true;
            }
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a, names, min)?, value(b, names, min)?)
        } else {
            let v = value(range, names, min)?;
            (v, if step.is_some() { max } else { v })
        };
        if lo < min {
            return Err(format!(
                "beginning of range ({lo}) below minimum ({min}): {part}"
            ));
        }
        if hi > max {
            return Err(format!("end of range ({hi}) above maximum ({max}): {part}"));
        }
        if lo > hi {
            return Err(format!(
                "beginning of range ({lo}) beyond end of range ({hi}): {part}"
            ));
        }
        let step = step.unwrap_or(1);
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, star))
}

fn value(s: &str, names: &[&str], min: u32) -> Result<u32, String> {
    if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        return Ok(i as u32 + min);
    }
    s.parse()
        .map_err(|_| format!("failed to parse int from {s}: invalid syntax"))
}

fn has(bits: u64, v: i8) -> bool {
    bits & (1 << v) != 0
}

impl Fields {
    fn day_matches(&self, d: Date) -> bool {
        let dom = has(self.dom, d.day());
        let dow = has(self.dow, d.weekday().to_sunday_zero_offset());
        if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first matching minute strictly after `after`, in `tz`; `None` if none within five
    /// years (e.g. `0 0 30 2 *`).
    fn next(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let start = after.to_zoned(tz.clone()).datetime();
        let mut t = start
            .with()
            .second(0)
            .subsec_nanosecond(0)
            .build()
            .ok()?
            .checked_add(1.minute())
            .ok()?;
        let limit = start.year() + 5;
        // Each step moves to the next candidate of the coarsest field that does not match.
        for _ in 0..100_000 {
            if t.year() > limit {
                return None;
            }
            if !has(self.month, t.month()) {
                t = first_of_next_month(t)?;
                continue;
            }
            if !self.day_matches(t.date()) {
                t = t
                    .date()
                    .tomorrow()
                    .ok()?
                    .to_datetime(jiff::civil::time(0, 0, 0, 0));
                continue;
            }
            if !has(self.hour, t.hour()) {
                t = t
                    .with()
                    .minute(0)
                    .build()
                    .ok()?
                    .checked_add(1.hour())
                    .ok()?;
                continue;
            }
            if !has(self.minute, t.minute()) {
                t = t.checked_add(1.minute()).ok()?;
                continue;
            }
            let ts = t.to_zoned(tz.clone()).ok()?.timestamp();
            if ts > after {
                return Some(ts);
            }
            t = t.checked_add(1.minute()).ok()?;
        }
        None
    }
}

fn first_of_next_month(t: DateTime) -> Option<DateTime> {
    let first = t.date().first_of_month();
    let next = first.checked_add(1.month()).ok()?;
    Some(next.to_datetime(jiff::civil::time(0, 0, 0, 0)))
}

impl Schedule {
    /// The first schedule time strictly after `after`.
    pub fn next(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        match self {
            Schedule::Fields(f) => f.next(after, tz),
            Schedule::Every(d) => {
                let secs = after.as_second() + d.as_secs() as i64;
                Timestamp::from_second(secs).ok()
            }
        }
    }

    /// The latest schedule time in `(earliest, now]` and how many there were (counting stops
    /// at `cap`), as the CronJob controller needs for missed runs.
    pub fn most_recent(
        &self,
        earliest: Timestamp,
        now: Timestamp,
        tz: &TimeZone,
        cap: usize,
    ) -> (Option<Timestamp>, usize) {
        let mut last = None;
        let mut count = 0;
        let mut t = earliest;
        while let Some(n) = self.next(t, tz) {
            if n > now {
                break;
            }
            last = Some(n);
            count += 1;
            if count > cap {
                // Too many to enumerate: the most recent is found from just before `now`.
                let back = Timestamp::from_second(now.as_second() - 8 * 24 * 3600)
                    .unwrap_or(earliest)
                    .max(n);
                let mut u = back;
                while let Some(m) = self.next(u, tz) {
                    if m > now {
                        break;
                    }
                    last = Some(m);
                    u = m;
                }
                break;
            }
            t = n;
        }
        (last, count)
    }
}

/// The time zone named by a CronJob's `timeZone` (the server's local zone when unset).
pub fn time_zone(name: Option<&str>) -> Result<TimeZone, String> {
    match name {
        None => Ok(TimeZone::try_system().unwrap_or(TimeZone::UTC)),
        Some(n) if n.trim() != n || n.is_empty() || n.eq_ignore_ascii_case("local") => {
            Err(format!("unknown time zone {n}"))
        }
        Some(n) => TimeZone::get(n).map_err(|_| format!("unknown time zone {n}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(spec: &str, after: &str, tz: &str) -> String {
        let tz = TimeZone::get(tz).unwrap();
        parse(spec)
            .unwrap()
            .next(at(after), &tz)
            .map(|t| t.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn next_times_follow_cron_rules() {
        let cases = [
            (
                "*/5 * * * *",
                "2026-01-01T00:02:00Z",
                "2026-01-01T00:05:00Z",
            ),
            (
                "*/5 * * * *",
                "2026-01-01T00:05:00Z",
                "2026-01-01T00:10:00Z",
            ),
            ("* * * * *", "2026-01-01T00:05:30Z", "2026-01-01T00:06:00Z"),
            (
                "0 9 * * MON-FRI",
                "2026-01-02T10:00:00Z",
                "2026-01-05T09:00:00Z",
            ),
            ("30 2 1 * *", "2026-01-15T00:00:00Z", "2026-02-01T02:30:00Z"),
            ("0 0 29 2 *", "2026-03-01T00:00:00Z", "2028-02-29T00:00:00Z"),
            // Both day fields restricted: either matches (the 13th, or a Friday).
            ("0 0 13 * 5", "2026-02-01T00:00:00Z", "2026-02-06T00:00:00Z"),
            // One is `*`: both must match (Fridays only).
            ("0 0 * * 5", "2026-02-01T00:00:00Z", "2026-02-06T00:00:00Z"),
            (
                "0 12 * jan,JUL *",
                "2026-02-01T00:00:00Z",
                "2026-07-01T12:00:00Z",
            ),
            ("@hourly", "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"),
            ("@yearly", "2026-06-01T00:00:00Z", "2027-01-01T00:00:00Z"),
            ("@weekly", "2026-01-01T00:00:00Z", "2026-01-04T00:00:00Z"),
            ("@every 90s", "2026-01-01T00:00:00Z", "2026-01-01T00:01:30Z"),
            (
                "5-10/2 * * * *",
                "2026-01-01T00:07:00Z",
                "2026-01-01T00:09:00Z",
            ),
        ];
        for (spec, after, want) in cases {
            assert_eq!(next(spec, after, "UTC"), want, "{spec} after {after}");
        }
    }

    #[test]
    fn time_zones_shift_the_schedule() {
        // 09:00 in New York is 14:00 UTC in winter, 13:00 UTC in summer.
        assert_eq!(
            next("0 9 * * *", "2026-01-10T00:00:00Z", "America/New_York"),
            "2026-01-10T14:00:00Z"
        );
        assert_eq!(
            next("0 9 * * *", "2026-07-10T00:00:00Z", "America/New_York"),
            "2026-07-10T13:00:00Z"
        );
        assert!(time_zone(Some("Mars/Olympus")).is_err());
        assert!(time_zone(Some("Europe/Berlin")).is_ok());
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        assert!(parse("* * * *")
            .unwrap_err()
            .contains("expected exactly 5 fields"));
        assert!(parse("61 * * * *").unwrap_err().contains("above maximum"));
        assert!(parse("*/0 * * * *").unwrap_err().contains("positive"));
        assert!(parse("@fortnightly").unwrap_err().contains("unrecognized"));
        assert!(parse("TZ=UTC * * * * *")
            .unwrap_err()
            .contains("timeZone field"));
        assert!(parse("x * * * *")
            .unwrap_err()
            .contains("failed to parse int"));
    }

    #[test]
    fn never_matching_schedule_ends() {
        assert_eq!(next("0 0 30 2 *", "2026-01-01T00:00:00Z", "UTC"), "");
    }

    #[test]
    fn missed_runs_are_counted_and_the_latest_found() {
        let s = parse("* * * * *").unwrap();
        let (last, n) = s.most_recent(
            at("2026-01-01T00:00:00Z"),
            at("2026-01-01T00:10:30Z"),
            &TimeZone::UTC,
            100,
        );
        assert_eq!(last, Some(at("2026-01-01T00:10:00Z")));
        assert_eq!(n, 10);
        let (last, n) = s.most_recent(
            at("2026-01-01T00:00:00Z"),
            at("2026-01-03T00:00:30Z"),
            &TimeZone::UTC,
            100,
        );
        assert_eq!(last, Some(at("2026-01-03T00:00:00Z")));
        assert!(n > 100);
    }
}
