//! The host's bounds against a hostile agent, with a scripted agent on a socket pair.

use super::*;
use agent_protocol::{frame, FrameKind};
use std::collections::HashSet;
use tokio::sync::Mutex as AsyncMutex;

/// The guest side of a connection: answers hellos, reports every other request, and
/// writes whatever frames a test makes it send.
struct FakeAgent {
    out: Arc<AsyncMutex<OwnedWriteHalf>>,
    requests: mpsc::UnboundedReceiver<(u32, Request)>,
}

impl FakeAgent {
    async fn send(&self, frame: Frame) {
        self.send_raw(frame.encode()).await;
    }

    async fn send_raw(&self, bytes: Vec<u8>) {
        self.out.lock().await.write_all(&bytes).await.unwrap();
    }

    async fn data(&self, stream: u32, bytes: usize) {
        for chunk in vec![b'x'; bytes].chunks(DATA_CHUNK) {
            self.send(Frame::Data {
                stream,
                channel: Channel::Output,
                bytes: chunk.to_vec(),
            })
            .await;
        }
    }

    async fn reply(&self, stream: u32, reply: &Reply) {
        let json = serde_json::to_vec(reply).unwrap();
        self.send(Frame::Control { stream, json }).await;
    }

    /// The next request the host sent (hellos aside), within 10 s.
    async fn request(&mut self) -> (u32, Request) {
        tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
            .await
            .expect("a request within 10 s")
            .expect("the connection is open")
    }

    /// Waits (10 s at most) for the host to cancel `stream`.
    async fn cancelled(&mut self, stream: u32) {
        loop {
            if self.request().await == (stream, Request::Cancel) {
                return;
            }
        }
    }
}

async fn connect(limits: Limits) -> (AgentClient, FakeAgent) {
    let (host, guest) = UnixStream::pair().unwrap();
    let (mut read, write) = guest.into_split();
    let out = Arc::new(AsyncMutex::new(write));
    let (tx, requests) = mpsc::unbounded_channel();
    let answer = out.clone();
    tokio::spawn(async move {
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = read.read(&mut buf).await {
            decoder.feed(&buf[..n]);
            while let Some(item) = decoder.decode_next() {
                let Decoded::Frame(Frame::Control { stream, json }) = item else {
                    continue;
                };
                match serde_json::from_slice::<Request>(&json).unwrap() {
                    Request::Hello { nonce, .. } => {
                        let json = serde_json::to_vec(&Reply::Hello {
                            version: PROTOCOL_VERSION,
                            agent_version: "fake".into(),
                            nonce,
                        })
                        .unwrap();
                        let frame = Frame::Control { stream, json }.encode();
                        answer.lock().await.write_all(&frame).await.unwrap();
                    }
                    other => {
                        let _ = tx.send((stream, other));
                    }
                }
            }
        }
    });
    let client = AgentClient::handshake_within(host, Duration::from_secs(10), limits)
        .await
        .unwrap();
    (client, FakeAgent { out, requests })
}

fn stat() -> Request {
    Request::Stat { path: "/".into() }
}

/// The error a stream ended with.
async fn error_of(stream: &mut Stream) -> AgentError {
    loop {
        match stream.next().await.unwrap() {
            StreamEvent::Reply(Reply::Error(e)) => return e,
            StreamEvent::Reply(other) => panic!("expected an error, got {other:?}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn empty_frames_count_toward_the_stream_bound() {
    let limits = Limits {
        per_stream: 64 * 1024,
        ..Limits::default()
    };
    let (client, mut agent) = connect(limits).await;
    let mut stream = client.open(&stat()).await.unwrap();
    assert_eq!(agent.request().await, (stream.id(), stat()));
    // Frames without a payload: 12 bytes each on the wire, but each one an event queued.
    let mut wire = Vec::new();
    for _ in 0..10_000 {
        Frame::Eof {
            stream: stream.id(),
            channel: Channel::Output,
        }
        .encode_into(&mut wire);
    }
    agent.send_raw(wire).await;
    agent.cancelled(stream.id()).await;
    let e = error_of(&mut stream).await;
    assert_eq!(e.code, ErrorCode::Busy);
    assert!(e.message.contains("went unread"), "{}", e.message);
    // What it held was dropped with the cut-off, not kept for a reader that never comes.
    assert_eq!(client.unread_bytes(), 0);
    assert!(matches!(
        stream.next().await,
        Err(ClientError::Disconnected)
    ));
}

#[tokio::test]
async fn the_vm_bound_cuts_off_the_stream_holding_the_most() {
    let limits = Limits {
        per_stream: 1024 * 1024,
        per_vm: 1536 * 1024,
        ..Limits::default()
    };
    let (client, mut agent) = connect(limits).await;
    let mut hog = client.open(&stat()).await.unwrap();
    let mut reader = client.open(&stat()).await.unwrap();
    let mut small = client.open(&stat()).await.unwrap();
    for _ in 0..3 {
        agent.request().await;
    }
    // Each under the bound per stream; together over the bound per VM.
    agent.data(hog.id(), 900 * 1024).await;
    agent.data(small.id(), 4 * 1024).await;
    agent.data(reader.id(), 700 * 1024).await;
    agent.reply(reader.id(), &Reply::Done { bytes: None }).await;
    agent.cancelled(hog.id()).await;
    let e = error_of(&mut hog).await;
    assert!(e.message.contains("together"), "{}", e.message);
    // The others lost nothing.
    let mut got = 0;
    loop {
        match reader.next().await.unwrap() {
            StreamEvent::Data(_, b) => got += b.len(),
            StreamEvent::Reply(Reply::Done { .. }) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, 700 * 1024);
    match small.next().await.unwrap() {
        StreamEvent::Data(_, b) => assert_eq!(b.len(), 4 * 1024),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.unread_bytes(), 0);
}

#[tokio::test]
async fn frames_for_unknown_or_ended_streams_are_not_buffered() {
    let (client, mut agent) = connect(Limits::default()).await;
    let mut stream = client.open(&stat()).await.unwrap();
    agent.request().await;
    agent.reply(stream.id(), &Reply::Done { bytes: None }).await;
    // After its final reply, and on a stream never opened: dropped on arrival.
    agent.data(stream.id(), 4 * 1024 * 1024).await;
    agent.data(stream.id() + 1000, 4 * 1024 * 1024).await;
    let mut probe = client.open(&stat()).await.unwrap();
    agent.request().await;
    agent.reply(probe.id(), &Reply::Done { bytes: None }).await;
    assert!(matches!(probe.next().await, Ok(StreamEvent::Reply(_))));
    // Only the first stream's final reply (its cost) is still held.
    assert!(client.unread_bytes() < 1024, "{}", client.unread_bytes());
    assert!(matches!(stream.next().await, Ok(StreamEvent::Reply(_))));
    assert!(matches!(
        stream.next().await,
        Err(ClientError::Disconnected)
    ));
    assert_eq!(client.unread_bytes(), 0);
}

#[tokio::test]
async fn open_streams_are_capped() {
    let limits = Limits {
        streams: 4,
        ..Limits::default()
    };
    let (client, mut agent) = connect(limits).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(client.open(&stat()).await.unwrap());
    }
    let err = client.open(&stat()).await.err().unwrap();
    assert!(
        matches!(err, ClientError::TooManyStreams { limit: 4 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("close some"), "{err}");
    // A handle that goes frees its place (and cancels its operation in the agent).
    let gone = open.pop().unwrap();
    let id = gone.id();
    drop(gone);
    agent.cancelled(id).await;
    assert_eq!(client.open_streams(), 3);
    client.open(&stat()).await.unwrap();
}

#[tokio::test]
async fn an_oversized_or_unreadable_reply_ends_its_stream() {
    let (client, mut agent) = connect(Limits::default()).await;
    let mut big = client.open(&stat()).await.unwrap();
    let mut garbled = client.open(&stat()).await.unwrap();
    let mut fine = client.open(&stat()).await.unwrap();
    for _ in 0..3 {
        agent.request().await;
    }
    let mut raw = Vec::new();
    let len = MAX_REPLY_BYTES as u32 + 1;
    frame::encode_header(&mut raw, FrameKind::Control as u8, 0, big.id(), len);
    raw.resize(raw.len() + len as usize, b'{');
    agent.send_raw(raw).await;
    agent
        .send(Frame::Control {
            stream: garbled.id(),
            json: b"{not json".to_vec(),
        })
        .await;
    agent
        .reply(fine.id(), &Reply::Done { bytes: Some(1) })
        .await;
    let e = error_of(&mut big).await;
    assert!(e.message.contains("over the"), "{}", e.message);
    let e = error_of(&mut garbled).await;
    assert!(e.message.contains("unreadable"), "{}", e.message);
    assert!(matches!(
        fine.next().await,
        Ok(StreamEvent::Reply(Reply::Done { bytes: Some(1) }))
    ));
    // Both were cancelled in the agent.
    let mut cancelled = HashSet::new();
    while cancelled.len() < 2 {
        let (id, req) = agent.request().await;
        assert_eq!(req, Request::Cancel);
        cancelled.insert(id);
    }
    assert_eq!(cancelled, HashSet::from([big.id(), garbled.id()]));
}

/// A budget of its own for a test (the process-wide one is shared by every test).
fn budget(limit: usize) -> &'static Budget {
    Box::leak(Box::new(Budget::new(limit)))
}

fn used(budget: &Budget) -> usize {
    budget.used.load(Ordering::Relaxed)
}

/// Waits (10 s at most) until `stream` has received its last event: every frame the
/// agent sent before that has been routed too.
async fn ended(stream: &Stream) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !stream.inbox.queue.lock().unwrap().ended {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the stream ends within 10 s");
}

#[tokio::test]
async fn the_host_bound_cuts_off_only_the_vm_that_crosses_it() {
    let total = budget(1024 * 1024);
    let limits = Limits {
        total,
        ..Limits::default()
    };
    let (quiet, mut quiet_agent) = connect(limits).await;
    let (noisy, mut noisy_agent) = connect(limits).await;
    let mut held = quiet.open(&stat()).await.unwrap();
    quiet_agent.request().await;
    let mut hog = noisy.open(&stat()).await.unwrap();
    let mut small = noisy.open(&stat()).await.unwrap();
    for _ in 0..2 {
        noisy_agent.request().await;
    }
    // One VM holds most of the host's budget unread, under its own bounds...
    quiet_agent.data(held.id(), 700 * 1024).await;
    quiet_agent
        .reply(held.id(), &Reply::Done { bytes: None })
        .await;
    ended(&held).await;
    // ...and another pushes the total past it: that one loses its largest stream.
    noisy_agent.data(small.id(), 4 * 1024).await;
    noisy_agent.data(hog.id(), 400 * 1024).await;
    noisy_agent.cancelled(hog.id()).await;
    let e = error_of(&mut hog).await;
    assert_eq!(e.code, ErrorCode::Busy);
    assert!(e.message.contains("the host held"), "{}", e.message);
    assert!(used(total) <= 1024 * 1024, "{}", used(total));
    match small.next().await.unwrap() {
        StreamEvent::Data(_, b) => assert_eq!(b.len(), 4 * 1024),
        other => panic!("{other:?}"),
    }
    // The VM that got there first lost nothing.
    let mut got = 0;
    loop {
        match held.next().await.unwrap() {
            StreamEvent::Data(_, b) => got += b.len(),
            StreamEvent::Reply(Reply::Done { .. }) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, 700 * 1024);
    assert!(quiet_agent.requests.try_recv().is_err());
    assert_eq!(used(total), 0);
}

#[tokio::test]
async fn every_way_out_returns_bytes_to_the_host_budget() {
    let total = budget(MAX_UNREAD_BYTES_TOTAL);
    let limits = Limits {
        per_stream: 256 * 1024,
        total,
        ..Limits::default()
    };
    let (client, mut agent) = connect(limits).await;
    let mut read = client.open(&stat()).await.unwrap();
    let mut cut = client.open(&stat()).await.unwrap();
    let dropped = client.open(&stat()).await.unwrap();
    let kept = client.open(&stat()).await.unwrap();
    for _ in 0..4 {
        agent.request().await;
    }
    agent.data(read.id(), 100 * 1024).await;
    agent.reply(read.id(), &Reply::Done { bytes: None }).await;
    agent.data(cut.id(), 300 * 1024).await;
    agent.data(dropped.id(), 100 * 1024).await;
    agent.data(kept.id(), 100 * 1024).await;
    agent.reply(kept.id(), &Reply::Done { bytes: None }).await;
    ended(&kept).await;
    assert!(used(total) > 300 * 1024, "{}", used(total));
    assert_eq!(used(total), client.unread_bytes());
    // Read to the end, cut off, dropped unread.
    while !matches!(read.next().await.unwrap(), StreamEvent::Reply(_)) {}
    error_of(&mut cut).await;
    drop(dropped);
    assert_eq!(used(total), client.unread_bytes());
    // The connection closes; a stream still holding output goes, then the client.
    agent.out.lock().await.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while client.open_streams() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the connection closes within 10 s");
    assert!(used(total) > 100 * 1024, "{}", used(total));
    drop((read, cut, kept, client));
    assert_eq!(used(total), 0);
}

#[test]
fn a_connection_that_goes_returns_what_it_still_counts() {
    let total = budget(1024 * 1024);
    let conn = Conn::new(Limits {
        total,
        ..Limits::default()
    });
    // Left registered, as by a handshake given up on mid-wait.
    let _inbox = conn.register(0, true).unwrap();
    let frame = Frame::Data {
        stream: 0,
        channel: Channel::Output,
        bytes: vec![0; 1000],
    };
    conn.route(Decoded::Frame(frame), &mut Complaints::default());
    assert!(used(total) > 1000);
    drop(conn);
    assert_eq!(used(total), 0);
}
