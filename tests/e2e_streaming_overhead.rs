#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The filter must not delay streamed answers: time to the first SSE event through Envoy with
//! the filter is compared with the same Envoy config without it, against the same kind of
//! mock provider (events 300 ms apart).

mod support;

use std::time::Duration;
use support::client::Req;
use support::mock::Behavior;
use support::*;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn time_to_first_event_with_the_filter_matches_plain_envoy() {
    const ROUNDS: usize = 7;
    let filtered = Stack::start("mesh.yaml");
    let plain = Stack::builder("mesh.yaml").without_filter().start();
    for s in [&filtered, &plain] {
        s.provider.set_behavior(Behavior {
            sse_events: 3,
            sse_gap: Duration::from_millis(300),
            ..Behavior::default()
        });
    }
    // Plain Envoy gets what the filter would have produced; the filter gets the bare request.
    let bare = r#"{"messages": [{"role": "user", "content": "Stream please."}], "stream": true}"#;
    let full = r#"{"model": "qwen1.5-72b-chat", "messages": [{"role": "user", "content": "Stream please."}], "stream": true}"#;
    let mut plain_req = Req::chat(DASHSCOPE, full);
    plain_req.path = DASHSCOPE_PATH.into();
    let filtered_req = Req::chat(DASHSCOPE, bare);

    let first_event = |r: &support::client::Resp| -> Duration {
        assert_eq!(r.status, 200, "{}", r.text());
        let events = r.sse_events();
        assert_eq!(events.len(), 5, "3 events, usage, [DONE]: {events:?}");
        events[0].0
    };
    // Warm both (connection pools, first-request costs), then interleave measured rounds.
    first_event(&filtered.send(&filtered_req).await);
    first_event(&plain.send(&plain_req).await);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        with.push(first_event(&filtered.send(&filtered_req).await));
        without.push(first_event(&plain.send(&plain_req).await));
    }
    let (w, p) = (median(with.clone()), median(without.clone()));
    assert!(
        w <= p + Duration::from_millis(50),
        "median time to first event: {w:?} with the filter vs {p:?} without (rounds: {with:?} vs {without:?})"
    );

    // The baseline really ran without the filter, and the filtered run really rewrote.
    let base = plain.provider.requests();
    assert!(base.iter().all(|r| r.header("authorization").is_none()));
    let rewritten = filtered.provider.requests();
    assert_eq!(rewritten.len(), ROUNDS + 1);
    assert!(rewritten.iter().all(|r| r.path == DASHSCOPE_PATH));
    assert!(rewritten
        .iter()
        .all(|r| r.header("authorization").is_some()));
}
