//! A provider's answer (any bytes) through the usage readers: the SSE reader cut into
//! chunks at fuzzer-chosen points must read exactly as when fed whole, and nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_filter::usage::{report_from_json, ResponseObserver, SseReader};

fuzz_target!(|data: &[u8]| {
    // Layout: n (cut count, mod 8), n little-endian u16 cut offsets, then the stream.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8);
    if rest.len() < 2 * n {
        return;
    }
    let (cut_bytes, stream) = rest.split_at(2 * n);
    let mut cuts: Vec<usize> = cut_bytes
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();

    let mut whole = SseReader::new();
    whole.feed(stream);
    let whole_report = whole.finish().clone();

    let mut split = SseReader::new();
    let mut start = 0;
    for cut in cuts {
        split.feed(&stream[start..cut]);
        start = cut;
    }
    split.feed(&stream[start..]);
    let split_report = split.finish().clone();
    assert_eq!(
        whole_report, split_report,
        "chunk boundaries changed the report"
    );
    assert_eq!(whole.events(), split.events());
    assert_eq!(whole.done(), split.done());

    let _ = report_from_json(stream);
    for content_type in ["text/event-stream", "application/json; charset=utf-8"] {
        let headers = vec![("content-type".to_string(), content_type.as_bytes().to_vec())];
        let mut observer = ResponseObserver::for_response(&headers);
        observer.feed(stream);
        let _ = observer.events();
        let _ = observer.finish();
    }
});
