//! A fault-injecting loopback proxy in front of an HTTP server (the suite's S3 server,
//! a pool manager's control API between hosts): pass-through, `503 SlowDown` to every
//! request or a fraction of them, stalls, connections reset part way through a body, and
//! faults on the first requests to one path only (streams in HTTP upgrades included). The fault is switched at run time
//! ([`FaultProxy::set`]); connections already passing through are closed when it
//! changes, so the next request meets the new fault.
//!
//! The HTTP-aware faults read only the request head (up to `\r\n\r\n`) and its
//! `Content-Length`; each answers one request per connection and closes it. The proxy
//! runs on a runtime of its own thread, so a test that blocks (starting a daemon that
//! reaches the server through it) does not stall it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to the requests that reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Bytes pass both ways untouched.
    PassThrough,
    /// `503 SlowDown` (S3's XML error body) to `percent` % of requests, spread evenly
    /// (100: a storm); the rest pass.
    SlowDown { percent: u32 },
    /// Reads the request, answers nothing for this long, then closes.
    Stall(Duration),
    /// A request with a body: half of it is read, then the connection is reset (the
    /// server never sees it). One without: it is sent on, and half of the response
    /// body (half of the head if there is none) reaches the client before the reset.
    ResetMidBody,
    /// The first `times` requests whose request line contains `path` meet `fault`;
    /// every other request passes, upgrades and all (its connection is then piped
    /// as it is).
    OnPath {
        path: &'static str,
        times: u32,
        fault: PathFault,
    },
}

/// What [`Fault::OnPath`] does to a request it picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathFault {
    /// `503` at once; the server never sees it.
    Refuse,
    /// The connection is reset once the head is read; the server never sees it.
    Reset,
    /// Sent on, then the connection is reset once this many bytes went from the client
    /// to the server (a stream cut part way).
    CutAfter(u64),
    /// Sent on; once the server starts to answer, the connection is reset: the server
    /// did it, the client never hears.
    LoseAnswer,
    /// Held this long, then sent on as it is.
    Delay(Duration),
}

/// The XML body of S3's throttling error.
pub const SLOW_DOWN_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>";

/// Longest request head read.
const MAX_HEAD: usize = 64 << 10;
/// How long a forwarded request may take (the server is on loopback).
const FORWARD_LIMIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Counters {
    /// Requests seen by the HTTP-aware faults.
    requests: AtomicU64,
    /// Requests failed (503, stalled, reset).
    injected: AtomicU64,
    /// Requests [`Fault::OnPath`] picked since it was set.
    on_path: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: watch::Sender<String>,
    fault: watch::Sender<Fault>,
    counters: Arc<Counters>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (`http://host:port`
    /// or `host:port`), passing everything through.
    pub fn start(upstream: &str) -> Self {
        let (upstream, upstream_rx) = watch::channel(bare(upstream));
        let (fault, fault_rx) = watch::channel(Fault::PassThrough);
        let counters = Arc::new(Counters::default());
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("fault proxy runtime");
                rt.block_on(async move {
                    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                    ready_tx.send(listener.local_addr().unwrap()).unwrap();
                    let accept = async {
                        loop {
                            let Ok((client, _)) = listener.accept().await else {
                                continue;
                            };
                            let _ = client.set_nodelay(true);
                            tokio::spawn(serve(
                                client,
                                upstream_rx.borrow().clone(),
                                fault_rx.clone(),
                                c.clone(),
                            ));
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stop_rx => {}
                    }
                });
                // Open connections end with the runtime.
                rt.shutdown_background();
            })
            .expect("fault proxy thread");
        let addr = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the fault proxy listens");
        Self {
            addr,
            upstream,
            fault,
            counters,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`: the endpoint to give clients instead of the server's.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches the fault; connections passing through are closed.
    pub fn set(&self, fault: Fault) {
        self.counters.on_path.store(0, Ordering::SeqCst);
        self.fault.send_replace(fault);
    }

    /// Points the proxy at another server (`http://host:port` or `host:port`), for
    /// connections accepted from now on: a proxy may be started before its server,
    /// which is told the proxy's address.
    pub fn set_upstream(&self, upstream: &str) {
        self.upstream.send_replace(bare(upstream));
    }

    /// The fault now.
    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// Requests seen by the faults other than pass-through, so far.
    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::SeqCst)
    }

    /// Requests failed by a fault (answered 503, stalled, reset), so far.
    pub fn injected(&self) -> u64 {
        self.counters.injected.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `host:port` of `http://host:port/`.
fn bare(upstream: &str) -> String {
    upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// One client connection, under the fault in force when it was accepted.
async fn serve(
    mut client: TcpStream,
    upstream: String,
    mut fault: watch::Receiver<Fault>,
    counters: Arc<Counters>,
) {
    let now = *fault.borrow_and_update();
    if now == Fault::PassThrough {
        let Ok(mut server) = TcpStream::connect(&upstream).await else {
            return;
        };
        let _ = server.set_nodelay(true);
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
            // A new fault: this connection goes, so the client's next one meets it.
            _ = fault.changed() => {}
        }
        return;
    }
    let Some(req) = read_head(&mut client).await else {
        return;
    };
    if let Fault::OnPath { path, times, fault } = now {
        let line = req.head.split(|b| *b == b'\n').next().unwrap_or_default();
        let picked = String::from_utf8_lossy(line).contains(path)
            && counters.on_path.fetch_add(1, Ordering::SeqCst) < u64::from(times);
        if picked {
            counters.requests.fetch_add(1, Ordering::SeqCst);
            counters.injected.fetch_add(1, Ordering::SeqCst);
        }
        match (picked, fault) {
            (true, PathFault::Refuse) => slow_down(client, &req).await,
            (true, PathFault::Reset) => reset(client),
            (true, PathFault::CutAfter(n)) => pipe(client, &upstream, &req, Some(n)).await,
            (true, PathFault::LoseAnswer) => lose_answer(client, &upstream, &req).await,
            (true, PathFault::Delay(d)) => {
                tokio::time::sleep(d).await;
                pipe(client, &upstream, &req, None).await
            }
            (false, _) => pipe(client, &upstream, &req, None).await,
        }
        return;
    }
    let n = counters.requests.fetch_add(1, Ordering::SeqCst);
    match now {
        Fault::PassThrough | Fault::OnPath { .. } => unreachable!(),
        Fault::SlowDown { percent } => {
            let p = u64::from(percent.min(100));
            // Evenly spread: request n fails when the running share of failures steps up.
            if (n + 1) * p / 100 > n * p / 100 {
                counters.injected.fetch_add(1, Ordering::SeqCst);
                slow_down(client, &req).await;
            } else {
                let _ = forward(client, &upstream, &req, None).await;
            }
        }
        Fault::Stall(d) => {
            counters.injected.fetch_add(1, Ordering::SeqCst);
            // Whatever more arrives is read and dropped; the client may give up first.
            let _ = tokio::time::timeout(d, drain(&mut client)).await;
        }
        Fault::ResetMidBody => {
            counters.injected.fetch_add(1, Ordering::SeqCst);
            if req.content_length > 0 && !req.expect_continue {
                let half = req.content_length / 2;
                let have = req.extra.len() as u64;
                if have < half {
                    let _ = tokio::time::timeout(
                        FORWARD_LIMIT,
                        tokio::io::copy(
                            &mut (&mut client).take(half - have),
                            &mut tokio::io::sink(),
                        ),
                    )
                    .await;
                }
                reset(client);
            } else {
                let _ = forward(client, &upstream, &req, Some(())).await;
            }
        }
    }
}

/// Sends the request's head and what came after it on, then pipes the connection both
/// ways as it is (an upgrade, keep-alive requests); with `cut`, the connection is reset
/// once that many bytes went from the client to the server in all.
async fn pipe(mut client: TcpStream, upstream: &str, req: &Head, cut: Option<u64>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    if server.write_all(&req.head).await.is_err() || server.write_all(&req.extra).await.is_err() {
        return;
    }
    let Some(limit) = cut else {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        return;
    };
    let sent = (req.head.len() + req.extra.len()) as u64;
    {
        let (mut from_client, mut to_client) = client.split();
        let (mut from_server, mut to_server) = server.split();
        let mut capped = (&mut from_client).take(limit.saturating_sub(sent));
        let up = tokio::io::copy(&mut capped, &mut to_server);
        let down = tokio::io::copy(&mut from_server, &mut to_client);
        // The upward copy ends at the limit (or the client's end): the cut.
        tokio::select! {
            _ = up => {}
            _ = down => {}
        }
    }
    reset(client);
}

/// Sends the request on (its head, what came with it and the rest of its body), waits
/// for the first byte of the answer, and resets the client's connection.
async fn lose_answer(mut client: TcpStream, upstream: &str, req: &Head) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    if server.write_all(&req.head).await.is_err() || server.write_all(&req.extra).await.is_err() {
        return;
    }
    let rest = req.content_length.saturating_sub(req.extra.len() as u64);
    let _ = tokio::time::timeout(
        FORWARD_LIMIT,
        tokio::io::copy(&mut (&mut client).take(rest), &mut server),
    )
    .await;
    let mut first = [0u8; 1];
    let _ = tokio::time::timeout(FORWARD_LIMIT, server.read(&mut first)).await;
    reset(client);
}

/// A request head and what arrived after it.
struct Head {
    head: Vec<u8>,
    extra: Vec<u8>,
    content_length: u64,
    expect_continue: bool,
}

async fn read_head(client: &mut TcpStream) -> Option<Head> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let extra = buf.split_off(end);
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let header = |name: &str| {
        text.lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    Some(Head {
        content_length: header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        expect_continue: header("expect").is_some_and(|v| v == "100-continue"),
        head: buf,
        extra,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads until EOF or an error.
async fn drain(r: &mut (impl AsyncRead + Unpin)) {
    let _ = tokio::io::copy(r, &mut tokio::io::sink()).await;
}

/// Answers `503 SlowDown` and closes (the request's body read first, so the client sees
/// the answer, not a reset).
async fn slow_down(mut client: TcpStream, req: &Head) {
    if !req.expect_continue {
        let rest = req.content_length.saturating_sub(req.extra.len() as u64);
        let _ = tokio::time::timeout(
            FORWARD_LIMIT,
            tokio::io::copy(&mut (&mut client).take(rest), &mut tokio::io::sink()),
        )
        .await;
    }
    let answer = format!(
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{SLOW_DOWN_BODY}",
        SLOW_DOWN_BODY.len()
    );
    let _ = client.write_all(answer.as_bytes()).await;
    let _ = client.shutdown().await;
    // Until the client closes: closing with unread bytes would reset the connection.
    let _ = tokio::time::timeout(Duration::from_secs(5), drain(&mut client)).await;
}

/// Sends one request on to the server (asking it to close after answering) and its
/// answer back; with `cut`, only half of the answer's body (half the head if it has
/// none) reaches the client, then the connection is reset.
async fn forward(
    mut client: TcpStream,
    upstream: &str,
    req: &Head,
    cut: Option<()>,
) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream).await?;
    let _ = server.set_nodelay(true);
    // The head with `Connection: close`, so the answer ends at EOF.
    let head = String::from_utf8_lossy(&req.head[..req.head.len() - 4]);
    let kept: Vec<&str> = head
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    let head = format!("{}\r\nConnection: close\r\n\r\n", kept.join("\r\n"));
    server.write_all(head.as_bytes()).await?;
    server.write_all(&req.extra).await?;
    let rest = req.content_length.saturating_sub(req.extra.len() as u64);
    let (mut from_client, mut to_client) = client.split();
    let (mut from_server, mut to_server) = server.split();
    let work = async {
        if cut.is_none() {
            let mut body = (&mut from_client).take(rest);
            let up = tokio::io::copy(&mut body, &mut to_server);
            let down = tokio::io::copy(&mut from_server, &mut to_client);
            let (up, down) = tokio::join!(up, down);
            up?;
            down?;
            to_client.shutdown().await?;
            return Ok(());
        }
        tokio::io::copy(&mut (&mut from_client).take(rest), &mut to_server).await?;
        let mut answer = Vec::new();
        from_server.read_to_end(&mut answer).await?;
        let end = find(&answer, b"\r\n\r\n").map(|i| i + 4);
        let send = match end {
            Some(end) if answer.len() > end => end + (answer.len() - end) / 2,
            Some(end) => end / 2,
            None => answer.len() / 2,
        };
        to_client.write_all(&answer[..send]).await?;
        to_client.flush().await?;
        Ok::<_, std::io::Error>(())
    };
    let result = tokio::time::timeout(FORWARD_LIMIT, work)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    if cut.is_some() {
        reset(client);
    }
    result
}

/// Closes with a TCP reset (SO_LINGER 0).
fn reset(client: TcpStream) {
    let _ = client.set_zero_linger();
    drop(client);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-request HTTP server answering `200` with `body`.
    async fn origin(body: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut c, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let _ = read_head(&mut c).await;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = c.write_all(answer.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    async fn get(proxy: &FaultProxy) -> Result<(u16, String), String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(1500))
            .build()
            .unwrap();
        let resp = client
            .get(format!("{}/x", proxy.url()))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        Ok((status, text))
    }

    #[tokio::test]
    async fn each_fault_does_what_it_says() {
        let body = "0123456789abcdefghij";
        let proxy = FaultProxy::start(&origin(body).await);
        assert_eq!(get(&proxy).await.unwrap(), (200, body.to_string()));

        proxy.set(Fault::SlowDown { percent: 100 });
        let (status, text) = get(&proxy).await.unwrap();
        assert_eq!(status, 503);
        assert!(text.contains("<Code>SlowDown</Code>"), "{text}");

        proxy.set(Fault::SlowDown { percent: 50 });
        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(get(&proxy).await.unwrap().0);
        }
        assert_eq!(
            statuses.iter().filter(|s| **s == 503).count(),
            2,
            "{statuses:?}"
        );

        proxy.set(Fault::Stall(Duration::from_secs(10)));
        let started = std::time::Instant::now();
        assert!(get(&proxy).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));

        proxy.set(Fault::ResetMidBody);
        let got = get(&proxy).await;
        assert!(got.is_err(), "{got:?}");

        proxy.set(Fault::PassThrough);
        assert_eq!(get(&proxy).await.unwrap(), (200, body.to_string()));
        assert_eq!(proxy.requests(), 7);
        assert_eq!(proxy.injected(), 1 + 2 + 1 + 1);
    }
}
