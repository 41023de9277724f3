//! Port tunnels: a stream bridged to a TCP connection to a port on the guest's loopback,
//! so preview URLs and `sandbox proxy` reach servers in the sandbox without any guest
//! networking.

use crate::session::{Inbound, Outbox};
use agent_protocol::{AgentError, Channel, ErrorCode, Reply, DATA_CHUNK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Connects to `port` and bridges it to `out`'s stream until both directions close.
pub async fn connect(port: u16, out: Outbox, mut inbox: mpsc::Receiver<Inbound>) {
    let socket = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                ErrorCode::NotFound
            } else {
                ErrorCode::Io
            };
            return out
                .error(AgentError::new(
                    code,
                    format!("nothing accepts connections on port {port} in the sandbox ({e}); start a server listening on it"),
                ))
                .await;
        }
    };
    let _ = socket.set_nodelay(true);
    out.reply(&Reply::Connected).await;
    let (mut from_socket, mut to_socket) = socket.into_split();
    let mut buf = vec![0u8; DATA_CHUNK];
    let (mut reading, mut writing) = (true, true);
    while reading || writing {
        tokio::select! {
            n = from_socket.read(&mut buf), if reading => match n {
                Ok(n) if n > 0 => out.data(Channel::Output, buf[..n].to_vec()).await,
                _ => {
                    out.eof(Channel::Output).await;
                    reading = false;
                }
            },
            msg = inbox.recv(), if writing => match msg {
                Some(Inbound::Data(bytes)) => {
                    if to_socket.write_all(&bytes).await.is_err() {
                        writing = false;
                    }
                }
                Some(Inbound::Eof) => {
                    let _ = to_socket.shutdown().await;
                    writing = false;
                }
                Some(Inbound::Detach) | Some(Inbound::Resize { .. }) => {}
                Some(Inbound::Abort(e)) => return out.error(e).await,
                Some(Inbound::SessionEnded) | None => return,
            },
        }
    }
    out.reply(&Reply::Done { bytes: None }).await;
}
