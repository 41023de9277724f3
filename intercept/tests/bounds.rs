//! What one connection can make the interceptor hold is bounded. Nothing is measured:
//! the limits are asserted.

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use intercept::body::{read_prefix, ProxyBody, MAX_INSPECT_BYTES};
use intercept::ca::LEAF_CACHE_ENTRIES;
use intercept::policy::MAX_SECRET_VALUE;
use intercept::proxy::MAX_HEAD_BYTES;

#[test]
fn the_limits_are_what_the_docs_say() {
    assert_eq!(MAX_INSPECT_BYTES, 1 << 20);
    assert_eq!(MAX_HEAD_BYTES, 64 * 1024);
    assert_eq!(LEAF_CACHE_ENTRIES, 1024);
    assert_eq!(MAX_SECRET_VALUE, 4096);
}

/// A body of `n` frames of `size` bytes that never ends early.
fn body(n: usize, size: usize) -> intercept::body::Inner {
    let frames = (0..n).map(move |_| {
        Ok::<_, intercept::body::BoxError>(Frame::data(Bytes::from(vec![b'z'; size])))
    });
    http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
}

#[tokio::test]
async fn a_hostile_body_costs_the_prefix_and_one_frame() {
    // 64 MiB offered: the inspected prefix holds at most MAX_INSPECT_BYTES, the split
    // frame's overflow at most one frame, and the rest passes a frame at a time.
    let frame = 64 * 1024;
    let mut b = body(1024, frame);
    let p = read_prefix(&mut b, MAX_INSPECT_BYTES).await.unwrap();
    assert!(p.data.len() <= MAX_INSPECT_BYTES);
    assert!(p.overflow.len() < frame);
    assert!(!p.ended);
    let mut head = p.data;
    head.extend_from_slice(&p.overflow);
    let mut rest = std::pin::pin!(ProxyBody::streamed(Bytes::from(head), Some(b), None));
    let mut total = 0;
    let mut first = true;
    while let Some(f) = rest.frame().await {
        let d = f.unwrap().into_data().unwrap();
        if !first {
            assert!(
                d.len() <= frame,
                "frames are passed one at a time, not gathered"
            );
        }
        first = false;
        total += d.len();
    }
    assert_eq!(total, 1024 * frame);
}

#[test]
fn the_secret_rewriter_holds_back_less_than_a_pattern() {
    use intercept::policy::SecurityPolicy;
    let p: SecurityPolicy = serde_json::from_str(
        r#"{"envMasking":{"secrets":[{"name":"K","placeholder":"nsk_k_0123456789abcdef","hosts":["a.com"]}]}}"#,
    )
    .unwrap();
    let v = "v".repeat(MAX_SECRET_VALUE);
    let c = p
        .compile(&std::collections::HashMap::from([("K".to_string(), v)]))
        .unwrap();
    let mut s = c.secrets.for_response().unwrap().stream();
    for _ in 0..1000 {
        s.push(&[b'v'; 1000]);
        assert!(s.held() < MAX_SECRET_VALUE);
    }
}
