//! A sandbox's filesystem: streamed reads and writes, listing, metadata.

use crate::error::check;
use crate::models::FileInfo;
use crate::{Error, Result, Sandbox};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// A presigned file URL ([`Files::presign`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Presigned {
    /// Works without a credential until `expires_at`; treat it as a secret.
    pub url: String,
    /// `GET` or `PUT`.
    pub method: String,
    /// The one path it reads or writes.
    pub path: String,
    /// ISO 8601.
    pub expires_at: String,
}

/// The filesystem of one sandbox. Relative paths are under `/workspace`.
pub struct Files<'a> {
    pub(crate) sandbox: &'a Sandbox,
}

impl Files<'_> {
    fn at(
        &self,
        method: reqwest::Method,
        route: &str,
        path: &str,
    ) -> Result<reqwest::RequestBuilder> {
        Ok(self.sandbox.data(method, route)?.query(&[("path", path)]))
    }

    /// The whole file.
    pub async fn read(&self, path: &str) -> Result<Vec<u8>> {
        let resp = self
            .at(reqwest::Method::GET, "/files", path)?
            .send()
            .await?;
        Ok(check(resp).await?.bytes().await?.to_vec())
    }

    /// The whole file as text (invalid UTF-8 replaced).
    pub async fn read_to_string(&self, path: &str) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.read(path).await?).into_owned())
    }

    /// Replaces `path` with `data` (atomically; parents are created).
    pub async fn write(&self, path: &str, data: impl Into<Vec<u8>>) -> Result<()> {
        let resp = self
            .at(reqwest::Method::PUT, "/files", path)?
            .body(data.into())
            .send()
            .await?;
        check(resp).await.map(drop)
    }

    /// Streams a local file to `path` in the sandbox.
    pub async fn upload(&self, local: &std::path::Path, path: &str) -> Result<u64> {
        let file = tokio::fs::File::open(local).await?;
        let size = file.metadata().await?.len();
        let stream = futures::stream::unfold(file, |mut f| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 256 * 1024];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok::<_, std::io::Error>(buf), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        });
        let resp = self
            .at(reqwest::Method::PUT, "/files", path)?
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await?;
        check(resp).await?;
        Ok(size)
    }

    /// Streams `path` from the sandbox into a local file; returns the bytes written.
    pub async fn download(&self, path: &str, local: &std::path::Path) -> Result<u64> {
        let resp = self
            .at(reqwest::Method::GET, "/files", path)?
            .send()
            .await?;
        let mut stream = check(resp).await?.bytes_stream();
        let tmp = local.with_extension("nullspace-partial");
        let mut out = tokio::fs::File::create(&tmp).await?;
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            n += chunk.len() as u64;
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        drop(out);
        // Only a complete download takes the name.
        tokio::fs::rename(&tmp, local).await?;
        Ok(n)
    }

    /// A directory's entries.
    pub async fn list(&self, path: &str) -> Result<Vec<FileInfo>> {
        let resp = self
            .at(reqwest::Method::GET, "/files/list", path)?
            .send()
            .await?;
        let v: Value = check(resp).await?.json().await?;
        serde_json::from_value(v["entries"].clone()).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Describes a path.
    pub async fn stat(&self, path: &str) -> Result<FileInfo> {
        let resp = self
            .at(reqwest::Method::GET, "/files/stat", path)?
            .send()
            .await?;
        let v: Value = check(resp).await?.json().await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// A URL that downloads (`"GET"`) or uploads (`"PUT"`: the request body replaces the
    /// file) `path` with no other credential for `expires_s` seconds (1 to 86400); bound
    /// to that path and method, ended early only by the sandbox's deletion.
    ///
    /// ```no_run
    /// # async fn demo(sbx: &nullspace::Sandbox) -> nullspace::Result<()> {
    /// let link = sbx.files().presign("/workspace/report.csv", "GET", 3600).await?;
    /// println!("{}", link.url); // anyone with it can download the file for an hour
    /// # Ok(()) }
    /// ```
    pub async fn presign(&self, path: &str, method: &str, expires_s: u64) -> Result<Presigned> {
        let resp = self
            .sandbox
            .data(reqwest::Method::POST, "/files/presign")?
            .json(&serde_json::json!({ "path": path, "method": method, "expires": expires_s }))
            .send()
            .await?;
        let v: Value = check(resp).await?.json().await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a presigned URL: {e}")))
    }

    /// Whether a path exists.
    pub async fn exists(&self, path: &str) -> Result<bool> {
        match self.stat(path).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates a directory and its parents.
    pub async fn mkdir(&self, path: &str) -> Result<()> {
        let resp = self
            .sandbox
            .data(reqwest::Method::POST, "/files/mkdir")?
            .json(&json!({ "path": path }))
            .send()
            .await?;
        check(resp).await.map(drop)
    }

    /// Removes a file or a directory tree.
    pub async fn remove(&self, path: &str) -> Result<()> {
        let resp = self
            .at(reqwest::Method::DELETE, "/files", path)?
            .send()
            .await?;
        check(resp).await.map(drop)
    }

    /// Renames (moves) a path.
    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        let resp = self
            .sandbox
            .data(reqwest::Method::POST, "/files/rename")?
            .json(&json!({ "from": from, "to": to }))
            .send()
            .await?;
        check(resp).await.map(drop)
    }
}
