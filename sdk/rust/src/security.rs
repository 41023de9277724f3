//! The security proxy of a running sandbox: its policy changed live, and its audit (one
//! record per HTTP request the guest made through the interception), paged, read whole,
//! or followed.

use crate::sandbox::call;
use crate::{Error, Result, Sandbox, SandboxInfo, SecurityPolicy};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

/// The largest audit page the API serves.
pub const MAX_AUDIT_PAGE: u32 = 1000;

/// One thing the security policy found in a request or response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditDetection {
    /// What: a PII detector (`card`), `injection:<rule>`, `secret:<name>`,
    /// `upstreamCertificate`, `uninspected` (a compressed body), ...
    #[serde(default)]
    pub kind: String,
    /// Where (REST `where`): `url`, `requestHeader:<name>`, `requestBody`,
    /// `responseHeader:<name>`, `responseBody`, `tls`.
    #[serde(rename = "where", default)]
    pub location: String,
    /// What was done: `log`, `redact`, `block`, `flag`, `strip`, `inserted`, `masked`, ...
    #[serde(default)]
    pub action: String,
}

/// One HTTP request of a sandbox with a security policy, as its audit keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// Increasing per sandbox; pass one as `after` to read what came later.
    pub id: u64,
    /// When the request arrived (RFC 3339, UTC); see [`AuditRecord::timestamp`].
    #[serde(default)]
    pub time: String,
    /// The method.
    #[serde(default)]
    pub method: String,
    /// The host: the TLS server name, else the destination address.
    #[serde(default)]
    pub host: String,
    /// The path and query as sent upstream (after redaction, never with a real secret).
    #[serde(default)]
    pub path: String,
    /// The status the guest got (0: none, the connection failed first).
    #[serde(default)]
    pub status: u16,
    /// Body bytes from the upstream to the guest.
    #[serde(default)]
    pub bytes_in: u64,
    /// Body bytes from the guest to the upstream.
    #[serde(default)]
    pub bytes_out: u64,
    /// From the request's arrival to the response body's end.
    #[serde(default)]
    pub duration_ms: u64,
    /// What the policy found.
    #[serde(default)]
    pub detections: Vec<AuditDetection>,
    /// What became of it: `allowed`, `modified` (redacted, stripped, secrets swapped),
    /// `blocked`, or `error` (the upstream failed).
    #[serde(default)]
    pub action: String,
}

impl AuditRecord {
    /// [`AuditRecord::time`] as a [`SystemTime`]; `None` if it is not RFC 3339.
    pub fn timestamp(&self) -> Option<SystemTime> {
        crate::time::parse_rfc3339(&self.time)
    }
}

/// One page of a sandbox's audit ([`Sandbox::audit_page`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditPage {
    /// Records with an ID above the page's `after`, oldest first.
    pub records: Vec<AuditRecord>,
    /// Pass as `after` for the next page: the last record's ID, or `after` itself when
    /// the page is empty.
    pub next: u64,
    /// Whether records past `next` exist now.
    pub more: bool,
}

impl AuditPage {
    /// A page from the API's JSON (`{"records", "next", "more"}`), read after `after`.
    ///
    /// ```
    /// let page = nullspace::AuditPage::from_json(
    ///     serde_json::json!({"records": [], "next": 0, "more": false}),
    ///     0,
    /// )?;
    /// assert!(page.records.is_empty() && !page.more);
    /// # Ok::<(), nullspace::Error>(())
    /// ```
    pub fn from_json(v: serde_json::Value, after: u64) -> Result<AuditPage> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default)]
            records: Vec<AuditRecord>,
            #[serde(default)]
            next: Option<u64>,
            #[serde(default)]
            more: bool,
        }
        let w: Wire = serde_json::from_value(v)
            .map_err(|e| Error::Protocol(format!("an audit page: {e}")))?;
        let next = w
            .next
            .unwrap_or_else(|| w.records.last().map_or(after, |r| r.id));
        Ok(AuditPage {
            records: w.records,
            next,
            more: w.more,
        })
    }
}

/// Follows a sandbox's audit ([`Sandbox::follow_audit`]): every record after a
/// starting point, then new ones as they come, polling.
pub struct AuditFollow {
    sandbox: Sandbox,
    /// Where the next page starts.
    cursor: u64,
    /// The last record yielded (or the starting point).
    last: u64,
    every: Duration,
    pending: VecDeque<AuditRecord>,
}

impl AuditFollow {
    /// The next record, waiting (polling every interval) until there is one. Errors
    /// (the sandbox gone, the API unreachable) are returned; calling again retries.
    pub async fn next(&mut self) -> Result<AuditRecord> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                self.last = r.id;
                return Ok(r);
            }
            let page = self
                .sandbox
                .audit_page(self.cursor, Some(MAX_AUDIT_PAGE))
                .await?;
            self.cursor = self.cursor.max(page.next);
            let caught_up = !page.more;
            self.pending.extend(page.records);
            if self.pending.is_empty() && caught_up {
                tokio::time::sleep(self.every).await;
            }
        }
    }

    /// The ID of the last record yielded, or the starting point (pass it as `after` to
    /// resume later or elsewhere).
    pub fn after(&self) -> u64 {
        self.last
    }
}

fn check_limit(limit: Option<u32>) -> Result<()> {
    match limit {
        Some(l) if !(1..=MAX_AUDIT_PAGE).contains(&l) => Err(Error::invalid(format!(
            "limit {l} is not an audit page size; send 1 to {MAX_AUDIT_PAGE} (default 100)"
        ))),
        _ => Ok(()),
    }
}

impl Sandbox {
    /// Replaces its security policy (see [`SecurityPolicy`]); a running sandbox follows
    /// it at once. Masked secrets keep their placeholders; one not given at create
    /// cannot be added live (400). Returns its new description, with
    /// [`SandboxInfo::security_policy`] as the API keeps it.
    ///
    /// ```no_run
    /// # async fn demo(sbx: &nullspace::Sandbox) -> nullspace::Result<()> {
    /// use nullspace::SecurityPolicy;
    /// let info = sbx
    ///     .set_security_policy(&SecurityPolicy::new().pii_detector("email", "log"))
    ///     .await?;
    /// println!("{}", info.security_policy.unwrap_or_default());
    /// # Ok(()) }
    /// ```
    pub async fn set_security_policy(&self, policy: &SecurityPolicy) -> Result<SandboxInfo> {
        let body = policy.checked_body()?;
        let v = call(
            &self.http,
            &self.config,
            reqwest::Method::PUT,
            &format!("/sandboxes/{}/security-policy", self.id()),
            Some(body),
        )
        .await?;
        serde_json::from_value(v).map_err(|e| Error::Protocol(format!("a sandbox: {e}")))
    }

    /// One page of its audit: at most `limit` (1 to 1000; `None`: the API's 100) records
    /// with an ID above `after`, oldest first. Pass the page's `next` as `after` for the
    /// next page; `more` says whether there are more now. A sandbox without a security
    /// policy has an empty audit (`next` 0).
    ///
    /// ```no_run
    /// # async fn demo(sbx: &nullspace::Sandbox) -> nullspace::Result<()> {
    /// let mut after = 0;
    /// loop {
    ///     let page = sbx.audit_page(after, Some(500)).await?;
    ///     for r in &page.records {
    ///         println!("{} {} {}{} {} {}", r.time, r.method, r.host, r.path, r.status, r.action);
    ///     }
    ///     if !page.more {
    ///         break;
    ///     }
    ///     after = page.next;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn audit_page(&self, after: u64, limit: Option<u32>) -> Result<AuditPage> {
        check_limit(limit)?;
        let limit = limit.map_or(String::new(), |l| format!("&limit={l}"));
        let v = call(
            &self.http,
            &self.config,
            reqwest::Method::GET,
            &format!("/sandboxes/{}/audit?after={after}{limit}", self.id()),
            None,
        )
        .await?;
        AuditPage::from_json(v, after)
    }

    /// Every audit record with an ID above `after`, oldest first, page after page, up
    /// to the newest there is now.
    pub async fn audit_all(&self, after: u64) -> Result<Vec<AuditRecord>> {
        let mut all = Vec::new();
        let mut after = after;
        loop {
            let page = self.audit_page(after, Some(MAX_AUDIT_PAGE)).await?;
            all.extend(page.records);
            if !page.more || page.next <= after {
                return Ok(all);
            }
            after = page.next;
        }
    }

    /// Follows its audit from `after`: [`AuditFollow::next`] yields every later record,
    /// then waits for new ones, asking the API every `every`.
    ///
    /// ```no_run
    /// # async fn demo(sbx: &nullspace::Sandbox) -> nullspace::Result<()> {
    /// let mut follow = sbx.follow_audit(0, std::time::Duration::from_secs(1));
    /// loop {
    ///     let r = follow.next().await?;
    ///     if r.action == "blocked" {
    ///         println!("blocked: {} {}{}", r.method, r.host, r.path);
    ///     }
    /// }
    /// # }
    /// ```
    pub fn follow_audit(&self, after: u64, every: Duration) -> AuditFollow {
        AuditFollow {
            sandbox: self.clone(),
            cursor: after,
            last: after,
            every,
            pending: VecDeque::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(id: u64) -> serde_json::Value {
        json!({
            "id": id, "time": "2026-01-02T03:04:05.123Z", "method": "POST",
            "host": "api.example.com", "path": "/v1/x?y", "status": 403, "bytesIn": 12,
            "bytesOut": 34, "durationMs": 3,
            "detections": [{ "kind": "card", "where": "requestBody", "action": "block" }],
            "action": "blocked",
        })
    }

    #[test]
    fn an_audit_page_parses_with_its_rest_names() {
        let page = AuditPage::from_json(
            json!({ "records": [record(17)], "next": 17, "more": true }),
            0,
        )
        .unwrap();
        assert_eq!((page.next, page.more), (17, true));
        let r = &page.records[0];
        assert_eq!(
            (
                r.id,
                r.method.as_str(),
                r.host.as_str(),
                r.path.as_str(),
                r.status
            ),
            (17, "POST", "api.example.com", "/v1/x?y", 403)
        );
        assert_eq!((r.bytes_in, r.bytes_out, r.duration_ms), (12, 34, 3));
        assert_eq!(r.action, "blocked");
        assert_eq!(
            r.detections,
            [AuditDetection {
                kind: "card".into(),
                location: "requestBody".into(),
                action: "block".into(),
            }]
        );
        let t = r.timestamp().unwrap();
        let secs = crate::time::system_time_to_unix(t);
        assert_eq!(secs, 1_767_323_045);
        // Back to JSON with the REST names (what the CLI prints).
        assert_eq!(serde_json::to_value(r).unwrap(), record(17));
    }

    #[test]
    fn empty_and_sparse_pages() {
        let empty =
            AuditPage::from_json(json!({ "records": [], "next": 0, "more": false }), 0).unwrap();
        assert_eq!(
            empty,
            AuditPage {
                records: vec![],
                next: 0,
                more: false
            }
        );
        // Absent parts: next is the last ID, or after itself.
        let sparse = AuditPage::from_json(json!({ "records": [{ "id": 4 }] }), 3).unwrap();
        assert_eq!(sparse.next, 4);
        assert!(sparse.records[0].detections.is_empty() && !sparse.more);
        assert_eq!(AuditPage::from_json(json!({}), 9).unwrap().next, 9);
        // An unknown detection kind or action is kept as text.
        let mut odd = record(5);
        odd["action"] = json!("quarantined");
        odd["detections"][0]["kind"] = json!("injection:ignore-previous");
        let page = AuditPage::from_json(json!({ "records": [odd], "next": 5 }), 0).unwrap();
        assert_eq!(page.records[0].action, "quarantined");
        assert!(AuditPage::from_json(json!({ "records": [{ "time": "x" }] }), 0).is_err());
    }

    #[test]
    fn page_sizes_out_of_range_are_refused() {
        for bad in [0, 1001] {
            let e = check_limit(Some(bad)).unwrap_err();
            assert_eq!(e.code(), Some("invalid_request"), "{e}");
            assert!(e.to_string().contains("1 to 1000"), "{e}");
        }
        assert!(check_limit(Some(1)).is_ok() && check_limit(Some(1000)).is_ok());
        assert!(check_limit(None).is_ok());
    }
}
