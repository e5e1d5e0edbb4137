//! What happens to a request whose headers the filter holds until its body is read
//! (`settings.forwardAfterBody`), decided on the root's timer ticks.
//!
//! With Envoy's `allow_on_headers_stop_iteration`, a body that came with the headers reaches the
//! filter in the same event-loop turn. Without it, Envoy stops the whole request at the headers
//! and never hands the filter the body. The two are told apart by what Envoy has received, not
//! by time: body bytes Envoy received but the filter never got mean the setting is missing (a
//! 500 that names it, and an error line for the operator); nothing received means a slow
//! client (a 408 once `settings.holdTimeoutMs` is over). So only a real misconfiguration raises
//! the error, and no client can trigger it or use it up.

/// A request whose headers wait for its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Tick at which its headers were held.
    pub tick: u64,
    /// The size Envoy counts for its headers (each name and value), so that Envoy's
    /// `request.total_size` minus this is the body bytes it has received.
    pub header_bytes: u64,
}

/// What the timer does with a held request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldVerdict {
    Wait,
    /// Envoy has body bytes the filter never got: the Envoy setting is missing.
    NotDelivered,
    /// The client sent no body in time.
    TimedOut,
}

/// The verdict at tick `now` for a request held since `held.tick`; `limit`: the hold timeout in
/// ticks; `received`: the body bytes Envoy has received, if known.
pub fn held_verdict(held: Held, now: u64, limit: u64, received: Option<u64>) -> HeldVerdict {
    let waited = now.saturating_sub(held.tick);
    // A full tick after the headers were held, a body that was there would have been handed
    // over already.
    if waited >= 2 && received.is_some_and(|n| n > 0) {
        return HeldVerdict::NotDelivered;
    }
    if waited >= limit {
        return HeldVerdict::TimedOut;
    }
    HeldVerdict::Wait
}

/// How often the root checks held requests, and after how many ticks a request has waited
/// too long, for a hold timeout in milliseconds.
pub fn hold_timer(hold_timeout_ms: u64) -> (std::time::Duration, u64) {
    let period_ms = (hold_timeout_ms / 4).clamp(50, 1000);
    (
        std::time::Duration::from_millis(period_ms),
        hold_timeout_ms.div_ceil(period_ms).max(1),
    )
}

/// Ticks in a minute at this period: the least time between two missing-setting error lines.
pub fn ticks_per_minute(period: std::time::Duration) -> u64 {
    let ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1);
    (60_000 / ms).max(1)
}

/// The size Envoy's header map counts for these headers: each name and value.
pub fn header_bytes<K: AsRef<[u8]>, V: AsRef<[u8]>>(headers: &[(K, V)]) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.as_ref().len() + v.as_ref().len()) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const HELD: Held = Held {
        tick: 10,
        header_bytes: 100,
    };

    #[test]
    fn a_body_envoy_kept_is_the_missing_setting_a_full_tick_later() {
        assert_eq!(held_verdict(HELD, 11, 40, Some(5)), HeldVerdict::Wait);
        assert_eq!(
            held_verdict(HELD, 12, 40, Some(5)),
            HeldVerdict::NotDelivered
        );
        // Even past the timeout: the client did send its body.
        assert_eq!(
            held_verdict(HELD, 60, 40, Some(1)),
            HeldVerdict::NotDelivered
        );
    }

    #[test]
    fn a_client_that_sent_nothing_times_out_and_is_never_blamed_on_the_config() {
        assert_eq!(held_verdict(HELD, 12, 40, Some(0)), HeldVerdict::Wait);
        assert_eq!(held_verdict(HELD, 49, 40, Some(0)), HeldVerdict::Wait);
        assert_eq!(held_verdict(HELD, 50, 40, Some(0)), HeldVerdict::TimedOut);
        assert_eq!(held_verdict(HELD, 50, 40, None), HeldVerdict::TimedOut);
    }

    #[test]
    fn timer_period_and_limit() {
        let (period, limit) = hold_timer(10_000);
        assert_eq!(period.as_millis(), 1000);
        assert_eq!(limit, 10);
        let (period, limit) = hold_timer(100);
        assert_eq!(period.as_millis(), 50);
        assert_eq!(limit, 2);
        assert_eq!(ticks_per_minute(period), 1200);
        assert_eq!(ticks_per_minute(std::time::Duration::from_millis(1000)), 60);
    }

    #[test]
    fn header_bytes_count_names_and_values() {
        let headers = vec![
            (":authority".to_string(), b"a.b".to_vec()),
            ("x".to_string(), vec![]),
        ];
        assert_eq!(header_bytes(&headers), 14);
    }
}
