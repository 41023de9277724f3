//! The public API's shapes and every check that needs no state: what the API component
//! enforces before a request reaches a pool manager, and what the pool manager enforces
//! again on its own internal API. No I/O, so it builds for `wasm32-wasip1` as well.

mod egress;
mod error;
mod live;
mod query;
mod request;
mod template;
mod tenant;
mod volume;

pub use egress::{CompiledEgress, EgressPolicy, EgressRule, MAX_EGRESS_RULES};
pub use error::ApiError;
pub use live::{Event, MetricSample, Preview, ProxyTarget};
pub use query::{
    fields_param, parse_query, project, reject_unknown_params, single, AuditParams, BuildLogParams,
    EventsParams, ListParams, MetricsParams, SandboxLogParams, MAX_AUDIT_PAGE, PUBLIC_STATES,
    VIEW_FIELDS,
};
pub use request::{
    is_recording_id, is_sandbox_id, is_snapshot_id, parse_body, validate_snapshot_interval,
    validate_timeout, CreateRequest, ForkBody, LifecycleRequest, MigrateBody, Migration, OnTimeout,
    PreviewBody, RefreshBody, Resources, RestoreBody, SnapshotBody, StartSource, TimeoutBody,
    ValidCreate, WarmPoolBody, WarmPoolError, WarmPoolMode, WarmPoolStatus,
    DEFAULT_POSTCOPY_AFTER_MS, DEFAULT_TIMEOUT_S, MAX_FORK_CHILDREN, MAX_POSTCOPY_AFTER_MS,
    MAX_TIMEOUT_S, MAX_WARM_POOL_SIZE, MIN_SNAPSHOT_INTERVAL_S, STALE_FIELDS,
};
pub use template::{
    is_reserved_template_name, is_template_id, is_template_name, BuildFailure, BuildLogLine,
    BuildLogPage, BuildStep, FileSpec, StepAction, StepStatus, StepView, TemplateBuildRequest,
    TemplateStatus, TemplateView, ValidBuild, ValidStep, BUILTIN_TEMPLATES, MAX_LOG_PAGE,
    MAX_LOG_WAIT_S, WORKSPACE_TEMPLATES,
};
pub use tenant::{
    is_team_ref, KeyRequest, LimitsPatch, RotateRequest, TeamCreateRequest,
    DEFAULT_ROTATION_GRACE_S, LIMIT_NAMES, MAX_LIMIT, MAX_ROTATION_GRACE_S, OPERATOR_TEAM,
};

pub use volume::{
    is_volume_id, validate_mounts, InheritVolumes, Inherited, Mount, MountMode, MountRequest,
    VolumeAttachment, VolumeCreateRequest, VolumeView, DEFAULT_VOLUME_MIB, MAX_MOUNTS,
    VOLUME_MIB_RANGE,
};

/// Largest control-plane request body, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Whether `key` has the shape keys are issued in (`ns_` + 32 lower-case hex digits).
/// The component refuses other shapes with a 401 before any lookup, so garbage never
/// costs a round trip to a pool manager.
pub fn key_is_well_formed(key: &str) -> bool {
    key.strip_prefix("ns_").is_some_and(|hex| {
        hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The API key of a request, from `X-API-Key` or `Authorization: Bearer`, given a way to
/// read a header by lower-case name.
pub fn api_key<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Result<&'a str, ApiError> {
    let key = header("x-api-key")
        .or_else(|| {
            header("authorization").and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
        })
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized("no API key; send it as X-API-Key or Authorization: Bearer")
        })?;
    if !key_is_well_formed(key) {
        return Err(ApiError::unauthorized(
            "malformed API key; send the key exactly as `admin key create` printed it",
        ));
    }
    Ok(key)
}
