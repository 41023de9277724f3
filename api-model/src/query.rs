//! Query strings: decoding, the parameters each route takes, and `fields=` projection.

use crate::ApiError;
use serde_json::Value;
use std::collections::BTreeMap;

/// Fields a sandbox view has, for `fields=`.
pub const VIEW_FIELDS: &[&str] = &[
    "sandboxID",
    "templateID",
    "state",
    "resources",
    "metadata",
    "lifecycle",
    "timeout",
    "createdAt",
    "expiresAt",
    "timeline",
    "diagnostic",
    "runtime",
    "snapshotInterval",
    "hibernated",
    "egress",
    "mounts",
    "recording",
    "securityPolicy",
    "dashboardUrl",
];

/// The seeds' names for view fields, accepted by `fields=` and answered under the name
/// asked for (`fields=id,status` → `{"id": …, "status": …}`).
pub const FIELD_ALIASES: &[(&str, &str)] = &[("id", "sandboxID"), ("status", "state")];

/// The view field a `fields=` name reads: an alias's target, or the name itself.
fn view_field(name: &str) -> &str {
    FIELD_ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, field)| field)
}

/// The states callers see; internal ones never leave a pool manager.
pub const PUBLIC_STATES: &[&str] = &["starting", "running", "paused", "deleted", "error"];

/// Decodes `a=1&b=x%20y` into pairs, in order.
pub fn parse_query(raw: Option<&str>) -> Vec<(String, String)> {
    raw.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of the first `key`.
pub fn single(pairs: &[(String, String)], key: &str) -> Option<String> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// Refuses parameters outside `allowed`, naming them.
pub fn reject_unknown_params(pairs: &[(String, String)], allowed: &[&str]) -> Result<(), ApiError> {
    if let Some((k, _)) = pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        let allowed = if allowed.is_empty() {
            "none".to_string()
        } else {
            allowed.join(", ")
        };
        return Err(ApiError::bad_request(format!(
            "unknown query parameter `{k}`; send only: {allowed}"
        )));
    }
    Ok(())
}

/// The `fields=` list, checked against [`VIEW_FIELDS`] and [`FIELD_ALIASES`].
pub fn fields_param(pairs: &[(String, String)]) -> Result<Option<Vec<String>>, ApiError> {
    let Some(fields) = single(pairs, "fields").filter(|f| !f.is_empty()) else {
        return Ok(None);
    };
    let wanted: Vec<String> = fields.split(',').map(|f| f.trim().to_string()).collect();
    if let Some(bad) = wanted
        .iter()
        .find(|f| !VIEW_FIELDS.contains(&view_field(f)))
    {
        let aliases: Vec<&str> = FIELD_ALIASES.iter().map(|(a, _)| *a).collect();
        return Err(ApiError::bad_request(format!(
            "fields contains unknown field `{bad}`; send a comma-separated subset of: {} (or the seeds' {})",
            VIEW_FIELDS.join(", "),
            aliases.join(", ")
        )));
    }
    Ok(Some(wanted))
}

/// Applies a checked `fields=` list to a view, each field under the name asked for
/// (`id` → the `sandboxID`, `status` → the `state`). `sandboxID` is always kept: a
/// projection identifies its sandbox under the one name every reader knows (the SDKs
/// hand their callers exactly the names asked for).
pub fn project(view: Value, fields: Option<&[String]>) -> Value {
    let (Some(wanted), Value::Object(map)) = (fields, &view) else {
        return view;
    };
    let mut out = serde_json::Map::new();
    if let Some(id) = map.get("sandboxID") {
        out.insert("sandboxID".into(), id.clone());
    }
    for name in wanted {
        if let Some(v) = map.get(view_field(name)) {
            out.insert(name.clone(), v.clone());
        }
    }
    Value::Object(out)
}

/// Parameters of `GET /sandboxes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListParams {
    /// Public states to keep; `None` keeps all but deleted.
    pub states: Option<Vec<String>>,
    /// `metadata=key=value` filters, all of which must match.
    pub metadata: BTreeMap<String, String>,
    /// Page size, 1 to 100.
    pub limit: usize,
    /// Opaque token of the previous page.
    pub next_token: Option<String>,
    /// Projection.
    pub fields: Option<Vec<String>>,
}

impl ListParams {
    /// Parses and checks a list's query.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        reject_unknown_params(
            pairs,
            &["state", "metadata", "limit", "nextToken", "fields"],
        )?;
        let limit = match single(pairs, "limit") {
            None => 50,
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|l| (1..=100).contains(l))
                .ok_or_else(|| {
                    ApiError::bad_request(format!("limit {l:?} is invalid; send 1 to 100"))
                })?,
        };
        // Seed 003 calls the failed state both `failed` and `error`: either is the one
        // public `error`.
        let states = single(pairs, "state").map(|s| {
            s.split(',')
                .map(|s| if s == "failed" { "error" } else { s }.to_string())
                .collect::<Vec<_>>()
        });
        if let Some(states) = &states {
            if let Some(bad) = states.iter().find(|s| !PUBLIC_STATES.contains(&s.as_str())) {
                return Err(ApiError::bad_request(format!(
                    "state `{bad}` is unknown; send a comma-separated subset of: {} (`failed` is `error`)",
                    PUBLIC_STATES.join(", ")
                )));
            }
        }
        let mut metadata = BTreeMap::new();
        for (_, v) in pairs.iter().filter(|(k, _)| k == "metadata") {
            let (mk, mv) = v.split_once('=').ok_or_else(|| {
                ApiError::bad_request(format!(
                    "metadata filter {v:?} is not key=value; send metadata=key=value"
                ))
            })?;
            metadata.insert(mk.to_string(), mv.to_string());
        }
        Ok(Self {
            states,
            metadata,
            limit,
            next_token: single(pairs, "nextToken").filter(|t| !t.is_empty()),
            fields: fields_param(pairs)?,
        })
    }
}

/// Parameters of `GET /sandboxes/{id}/events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsParams {
    /// Only events after this ID.
    pub after: u64,
    /// At most this many (1 to 1000, default 1000).
    pub limit: u64,
}

impl EventsParams {
    /// Parses and checks an event query.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        reject_unknown_params(pairs, &["after_event_id", "limit"])?;
        let number = |name: &str, max: u64| number_param(pairs, name, max);
        Ok(Self {
            after: number("after_event_id", i64::MAX as u64)?.unwrap_or(0),
            limit: number("limit", 1000)?.unwrap_or(1000).max(1),
        })
    }
}

/// A numeric query parameter from 0 to `max`, if given.
fn number_param(pairs: &[(String, String)], name: &str, max: u64) -> Result<Option<u64>, ApiError> {
    single(pairs, name)
        .map(|v| {
            v.parse::<u64>().ok().filter(|n| *n <= max).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "{name} {v:?} is not a number from 0 to {max}; send one"
                ))
            })
        })
        .transpose()
}

/// Query of `GET /sandboxes/{id}/metrics`: `start` and `end` in unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsParams {
    pub start: Option<i64>,
    pub end: Option<i64>,
}

impl MetricsParams {
    /// Parses and checks a metrics query.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        reject_unknown_params(pairs, &["start", "end"])?;
        let time =
            |name: &str| number_param(pairs, name, i64::MAX as u64).map(|t| t.map(|t| t as i64));
        let (start, end) = (time("start")?, time("end")?);
        if let (Some(s), Some(e)) = (start, end) {
            if s > e {
                return Err(ApiError::bad_request(format!(
                    "start {s} is after end {e}; send start <= end"
                )));
            }
        }
        Ok(Self { start, end })
    }
}

/// Query of `GET /sandboxes/{id}/logs`: `offset` (the line a page starts at; a page's
/// `next`) and `limit` (1 to [`crate::MAX_LOG_PAGE`], default all of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxLogParams {
    pub offset: usize,
    pub limit: usize,
}

impl SandboxLogParams {
    /// Parses and checks a sandbox log query.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        reject_unknown_params(pairs, &["offset", "limit"])?;
        let max = crate::MAX_LOG_PAGE as u64;
        let limit = number_param(pairs, "limit", max)?.unwrap_or(max);
        if limit == 0 {
            return Err(ApiError::bad_request(format!(
                "limit 0 is out of range; send 1 to {max}"
            )));
        }
        Ok(Self {
            offset: number_param(pairs, "offset", u32::MAX as u64)?.unwrap_or(0) as usize,
            limit: limit as usize,
        })
    }
}

/// Largest page of `GET /sandboxes/{id}/audit`.
pub const MAX_AUDIT_PAGE: u64 = 1000;

/// Query of `GET /sandboxes/{id}/audit`: `after` (a record's ID), `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditParams {
    /// Only records with IDs above this one.
    pub after: u64,
    /// At most this many (1 to [`MAX_AUDIT_PAGE`], default 100).
    pub limit: usize,
}

impl AuditParams {
    /// Parses and checks an audit query.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        reject_unknown_params(pairs, &["after", "limit"])?;
        let limit = number_param(pairs, "limit", MAX_AUDIT_PAGE)?.unwrap_or(100);
        if limit == 0 {
            return Err(ApiError::bad_request(format!(
                "limit 0 is out of range; send 1 to {MAX_AUDIT_PAGE}"
            )));
        }
        Ok(Self {
            after: number_param(pairs, "after", i64::MAX as u64)?.unwrap_or(0),
            limit: limit as usize,
        })
    }
}

/// Query of `GET /templates/{id}/logs`: `after` (a line's seq), `limit`, `wait` (s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildLogParams {
    /// Only lines after this seq.
    pub after: u64,
    /// At most this many (1 to 1000, default 1000).
    pub limit: usize,
    /// Seconds to wait for a line while the build runs (0 to 20, default 0).
    pub wait_s: u64,
}

impl BuildLogParams {
    /// Parses and checks a build log query.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, ApiError> {
        reject_unknown_params(pairs, &["after", "limit", "wait"])?;
        let number = |name: &str, max: u64| number_param(pairs, name, max);
        Ok(Self {
            after: number("after", i64::MAX as u64)?.unwrap_or(0),
            limit: number("limit", crate::MAX_LOG_PAGE as u64)?
                .unwrap_or(crate::MAX_LOG_PAGE as u64)
                .max(1) as usize,
            wait_s: number("wait", crate::MAX_LOG_WAIT_S)?.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn projection_keeps_the_id() {
        let v = json!({"sandboxID": "x", "state": "running", "metadata": {}});
        let fields = fields_param(&parse_query(Some("fields=state"))).unwrap();
        assert_eq!(
            project(v, fields.as_deref()),
            json!({"sandboxID": "x", "state": "running"})
        );
        assert!(fields_param(&parse_query(Some("fields=nope"))).is_err());
    }

    #[test]
    fn the_seeds_names_answer_under_the_name_asked_for() {
        let v = json!({"sandboxID": "x", "state": "paused", "metadata": {}});
        let fields = fields_param(&parse_query(Some("fields=id,status"))).unwrap();
        assert_eq!(
            project(v.clone(), fields.as_deref()),
            json!({"sandboxID": "x", "id": "x", "status": "paused"})
        );
        let fields = fields_param(&parse_query(Some("fields=status,metadata"))).unwrap();
        assert_eq!(
            project(v, fields.as_deref()),
            json!({"sandboxID": "x", "status": "paused", "metadata": {}})
        );
        let err = fields_param(&parse_query(Some("fields=ID"))).unwrap_err();
        assert!(err.to_string().contains("id, status"), "{err}");
    }

    #[test]
    fn failed_is_the_error_state() {
        let p = ListParams::parse(&parse_query(Some("state=running,failed"))).unwrap();
        assert_eq!(p.states.unwrap(), ["running", "error"]);
    }

    #[test]
    fn query_strings_decode() {
        let pairs = parse_query(Some("metadata=team%3Dblue&state=running,paused&x=a+b"));
        assert_eq!(pairs[0], ("metadata".into(), "team=blue".into()));
        assert_eq!(pairs[2], ("x".into(), "a b".into()));
    }

    #[test]
    fn list_params_are_checked() {
        let p =
            ListParams::parse(&parse_query(Some("state=running&metadata=a%3Db&limit=5"))).unwrap();
        assert_eq!(p.limit, 5);
        assert_eq!(p.metadata["a"], "b");
        for bad in [
            "limit=0",
            "state=active",
            "metadata=x",
            "bogus=1",
            "fields=x",
        ] {
            assert!(ListParams::parse(&parse_query(Some(bad))).is_err(), "{bad}");
        }
    }
}
