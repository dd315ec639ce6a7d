//! Pure retry arithmetic: `Retry-After` parsing and exponential backoff with full jitter.
//!
//! Kept free of I/O and clocks (the caller passes `now` and the random source) so every rule is
//! unit-tested here.
use rand::Rng;
use std::time::{Duration, SystemTime};

/// Parse a `Retry-After` value: integer seconds (`10`), fractional seconds (`2.128`, which Graph
/// sends), or an HTTP-date. Dates in the past mean "now" (zero). Garbage yields `None`, so the
/// caller falls back to exponential backoff.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    if v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = v.parse().ok()?;
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        // Cap absurd values at a day; `Duration::from_secs_f64` panics on overflow.
        return Some(Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Full-jitter exponential backoff (AWS architecture blog): uniform in `[0, min(max, base·2^n)]`,
/// where `retry` counts from 0 for the first retry. Full jitter spreads a herd of callers that
/// failed together, which is exactly the throttling-storm case.
pub fn full_jitter_backoff(
    retry: u32,
    base: Duration,
    max: Duration,
    rng: &mut impl Rng,
) -> Duration {
    let ceiling = exp_ceiling(retry, base, max);
    let ms = ceiling.as_millis() as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rng.gen_range(0..=ms))
}

/// `min(max, base·2^retry)` without overflow.
pub fn exp_ceiling(retry: u32, base: Duration, max: Duration) -> Duration {
    let factor = 1u64.checked_shl(retry.min(32)).unwrap_or(u64::MAX);
    let ms = (base.as_millis() as u64).saturating_mul(factor);
    Duration::from_millis(ms).min(max)
}

/// The wait before the next attempt. With a `Retry-After`, never less than it (plus a little
/// jitter so a herd told the same instant does not return in lockstep); without, full jitter.
pub fn next_delay(
    retry: u32,
    retry_after: Option<Duration>,
    base: Duration,
    max: Duration,
    rng: &mut impl Rng,
) -> Duration {
    match retry_after {
        Some(ra) => {
            let spread = (base / 2).min(Duration::from_millis(250)).as_millis() as u64;
            ra + Duration::from_millis(if spread == 0 {
                0
            } else {
                rng.gen_range(0..=spread)
            })
        }
        None => full_jitter_backoff(retry, base, max, rng),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap is fine in tests (developers' guide)
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn integer_and_fractional_seconds() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("10", now), Some(Duration::from_secs(10)));
        assert_eq!(
            parse_retry_after(" 2.128 ", now),
            Some(Duration::from_millis(2128))
        );
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(parse_retry_after("1.2.3", now), None);
    }

    #[test]
    fn http_date_relative_to_now() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:40 GMT", now),
            Some(Duration::from_secs(3))
        );
        // In the past: retry now, not never.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn absurd_values_are_capped_not_panicking() {
        let d = parse_retry_after("99999999999999999999999", SystemTime::now()).unwrap();
        assert_eq!(d, Duration::from_secs(86_400));
    }

    #[test]
    fn backoff_grows_then_caps_and_stays_within_ceiling() {
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        assert_eq!(exp_ceiling(0, base, max), Duration::from_millis(500));
        assert_eq!(exp_ceiling(3, base, max), Duration::from_secs(4));
        assert_eq!(exp_ceiling(10, base, max), max);
        assert_eq!(exp_ceiling(u32::MAX, base, max), max);
        let mut rng = StdRng::seed_from_u64(7);
        for retry in 0..12 {
            for _ in 0..50 {
                let d = full_jitter_backoff(retry, base, max, &mut rng);
                assert!(d <= exp_ceiling(retry, base, max));
            }
        }
    }

    #[test]
    fn jitter_actually_spreads() {
        let mut rng = StdRng::seed_from_u64(1);
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(30);
        let samples: std::collections::HashSet<_> = (0..20)
            .map(|_| full_jitter_backoff(4, base, max, &mut rng))
            .collect();
        assert!(samples.len() > 10);
    }

    #[test]
    fn retry_after_is_a_floor() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..100 {
            let d = next_delay(
                0,
                Some(Duration::from_secs(1)),
                Duration::from_millis(500),
                Duration::from_secs(30),
                &mut rng,
            );
            assert!(d >= Duration::from_secs(1) && d <= Duration::from_millis(1250));
        }
    }
}
