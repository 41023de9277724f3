//! Host-to-host calls of the cluster's own (not a caller's request carried on, which is
//! [`super::forward`]): a JSON exchange with another host's control API, and a byte
//! stream to it through an HTTP upgrade, which live migration carries its disk and RAM
//! streams in.

use super::forward::ForwardError;
use axum::body::Body;
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// The protocol a migration stream upgrades to.
pub const STREAM_PROTOCOL: &str = "nullspace-migration";

/// How long connecting to another host may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP/1 connection to the host at `base_url` (`http://HOST:PORT`), upgrades
/// allowed, with its authority (`HOST:PORT`).
pub(super) async fn connect(
    base_url: &str,
) -> Result<(hyper::client::conn::http1::SendRequest<Body>, String), ForwardError> {
    let authority = base_url
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| ForwardError::BadUrl(base_url.to_string()))?
        .to_string();
    let failed = |why: String| ForwardError::Connect {
        url: base_url.into(),
        why,
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&authority))
        .await
        .map_err(|_| failed(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok((sender, authority))
}

fn request(
    method: Method,
    authority: &str,
    path: &str,
    credential: (&str, &str),
    body: Body,
) -> Result<Request<Body>, ForwardError> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, authority)
        .header(credential.0, credential.1)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|e| ForwardError::BadUrl(format!("{path}: {e}")))
}

/// Sends `body` (JSON) to `path` on the host at `base_url` with the header
/// `credential`, and returns its status and body, within `timeout`.
pub async fn call(
    base_url: &str,
    method: Method,
    path: &str,
    credential: (&str, &str),
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<(StatusCode, serde_json::Value), ForwardError> {
    let exchange = async {
        let (mut sender, authority) = connect(base_url).await?;
        let req = request(
            method,
            &authority,
            path,
            credential,
            Body::from(serde_json::to_vec(body).expect("json")),
        )?;
        let broke = |why: String| ForwardError::Exchange {
            url: base_url.into(),
            why,
        };
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| broke(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| broke(e.to_string()))?
            .to_bytes();
        let value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            })
        };
        Ok((status, value))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ForwardError::Exchange {
            url: base_url.into(),
            why: format!("no answer within {timeout:?}"),
        })?
}

/// Opens a byte stream to `path` on the host at `base_url`: an HTTP upgrade to
/// [`STREAM_PROTOCOL`] with the header `credential`.
pub async fn open(
    base_url: &str,
    path: &str,
    credential: (&str, &str),
) -> Result<TokioIo<Upgraded>, ForwardError> {
    let (mut sender, authority) = connect(base_url).await?;
    let mut req = request(Method::GET, &authority, path, credential, Body::empty())?;
    req.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(STREAM_PROTOCOL));
    req.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let broke = |why: String| ForwardError::Exchange {
        url: base_url.into(),
        why,
    };
    let mut resp = tokio::time::timeout(CONNECT_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| broke(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| broke(e.to_string()))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        return Err(broke(format!("the stream was refused: {status} {body}")));
    }
    let upgraded = hyper::upgrade::on(&mut resp)
        .await
        .map_err(|e| broke(e.to_string()))?;
    Ok(TokioIo::new(upgraded))
}
