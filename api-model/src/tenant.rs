//! Tenants' shapes: a team's limits as an operator sets them, and the bodies of the
//! team and key routes, checked the same way by the API component and the pool manager.

use crate::ApiError;
use serde::{Deserialize, Serialize};

/// A team's own limits: the fields set replace the host's defaults. Also the body of
/// `PUT /v1/teams/{team}/quota` (fields not sent keep their value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandboxes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u64>,
    #[serde(default, rename = "memoryMiB", skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, rename = "diskMiB", skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<u64>,
    #[serde(
        default,
        rename = "snapshotMiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub snapshot_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<u64>,
    #[serde(default, rename = "volumeMiB", skip_serializing_if = "Option::is_none")]
    pub volume_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creates_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_burst: Option<u64>,
}

/// The largest value any limit takes: beyond it a "limit" is a typo, not a policy.
pub const MAX_LIMIT: u64 = 1 << 40;

/// The names a patch takes, as on the wire and in `admin team quota --set NAME=VALUE`.
pub const LIMIT_NAMES: &[&str] = &[
    "sandboxes",
    "vcpus",
    "memoryMiB",
    "diskMiB",
    "snapshots",
    "snapshotMiB",
    "volumes",
    "volumeMiB",
    "templates",
    "builds",
    "createsPerMinute",
    "createBurst",
];

impl LimitsPatch {
    /// `patch`'s fields over these.
    pub fn merged(self, patch: &LimitsPatch) -> Self {
        patch.overlay(&self)
    }

    /// `base` (any shape with the limits' wire names: this patch, or the limits in
    /// force) with the fields this patch sets in place of its own. The fields are named
    /// once, by serde, not in every place that merges them.
    pub fn overlay<T: Serialize + serde::de::DeserializeOwned>(&self, base: &T) -> T {
        let mut merged = serde_json::to_value(base).expect("limits serialize");
        if let (Some(into), serde_json::Value::Object(set)) = (
            merged.as_object_mut(),
            serde_json::to_value(self).expect("limits serialize"),
        ) {
            into.extend(set);
        }
        serde_json::from_value(merged).expect("the same wire names")
    }

    /// Refuses values no operator means; an empty patch changes nothing and says so.
    pub fn validate(&self) -> Result<(), ApiError> {
        let value = serde_json::to_value(self).expect("json");
        let fields = value.as_object().expect("an object");
        if fields.is_empty() {
            return Err(ApiError::bad_request(format!(
                "send at least one limit to set, e.g. {{\"vcpus\": 16}}; the limits are {}",
                LIMIT_NAMES.join(", ")
            )));
        }
        for (name, v) in fields {
            if v.as_u64().is_some_and(|v| v > MAX_LIMIT) {
                return Err(ApiError::bad_request(format!(
                    "{name} {v} is beyond any real limit; send at most {MAX_LIMIT}"
                ))
                .with_details(serde_json::json!({ "field": name })));
            }
        }
        if self.create_burst == Some(0) && self.creates_per_minute.is_some_and(|r| r > 0) {
            return Err(ApiError::bad_request(
                "createBurst 0 would refuse every create whatever createsPerMinute says; send createBurst of at least 1 (or createsPerMinute 0 to stop creates)",
            )
            .with_details(serde_json::json!({ "field": "createBurst" })));
        }
        Ok(())
    }

    /// Parses `NAME=VALUE` (the admin command's `--set`) into this patch.
    pub fn set(&mut self, assignment: &str) -> Result<(), String> {
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("{assignment:?} is not NAME=VALUE; send e.g. vcpus=16"))?;
        if !LIMIT_NAMES.contains(&name) {
            return Err(format!(
                "no limit named {name:?}; the limits are {}",
                LIMIT_NAMES.join(", ")
            ));
        }
        let value: u64 = value
            .parse()
            .map_err(|_| format!("{name}={value:?} is not a whole number; send e.g. {name}=10"))?;
        let one: LimitsPatch = serde_json::from_value(serde_json::json!({ name: value }))
            .map_err(|e| e.to_string())?;
        *self = self.merged(&one);
        Ok(())
    }
}

/// The reserved name of the operator's own team (operator keys belong to it).
pub const OPERATOR_TEAM: &str = "operator";

/// Longest a rotated-out key may keep working: a rotation is not a second key.
pub const MAX_ROTATION_GRACE_S: u64 = 7 * 24 * 3600;
/// A rotated-out key's grace unless the request says otherwise.
pub const DEFAULT_ROTATION_GRACE_S: u64 = 3600;

/// Whether `s` may name a team (or be its ID): 1 to 64 of `[A-Za-z0-9._-]`.
pub fn is_team_ref(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Body of `POST /teams`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamCreateRequest {
    pub name: String,
    #[serde(default)]
    pub limits: Option<LimitsPatch>,
}

impl TeamCreateRequest {
    /// A name the admin command would take, never the operator's or a team ID's form;
    /// limits as [`LimitsPatch::validate`] takes them.
    pub fn validate(&self) -> Result<(), ApiError> {
        if !is_team_ref(&self.name) {
            return Err(ApiError::bad_request(
                "name must be 1-64 letters, digits, '-', '_' or '.'; send e.g. {\"name\": \"blue\"}",
            )
            .with_details(serde_json::json!({ "field": "name" })));
        }
        if self.name == OPERATOR_TEAM || self.name.starts_with("team-") {
            return Err(ApiError::bad_request(format!(
                "{:?} is reserved (the operator's team, or a team ID's form); pick another name",
                self.name
            ))
            .with_details(serde_json::json!({ "field": "name" })));
        }
        match &self.limits {
            Some(l) => l.validate(),
            None => Ok(()),
        }
    }
}

/// Body of `POST /keys` and `POST /teams/{team}/keys` (may be empty).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    #[serde(default)]
    pub role: Option<String>,
}

impl KeyRequest {
    /// Keys issued through the API are team keys.
    pub fn validate(&self) -> Result<(), ApiError> {
        match self.role.as_deref() {
            None | Some("team") => Ok(()),
            Some(_) => Err(ApiError::bad_request(
                "a team's keys have role \"team\"; operator keys are made on the host (`nullspace-pool-manager admin key create --operator`)",
            )
            .with_details(serde_json::json!({ "field": "role" }))),
        }
    }
}

/// Body of `POST /keys/{id}/rotate` (may be empty: an hour's grace).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateRequest {
    #[serde(default)]
    pub grace_seconds: Option<u64>,
}

impl RotateRequest {
    /// The grace in seconds, within [`MAX_ROTATION_GRACE_S`].
    pub fn grace_s(&self) -> Result<u64, ApiError> {
        match self.grace_seconds.unwrap_or(DEFAULT_ROTATION_GRACE_S) {
            g if g > MAX_ROTATION_GRACE_S => Err(ApiError::bad_request(format!(
                "graceSeconds {g} is longer than a rotation may overlap; send at most {MAX_ROTATION_GRACE_S} (0 ends the old key now)"
            ))
            .with_details(serde_json::json!({ "field": "graceSeconds" }))),
            g => Ok(g),
        }
    }
}
