//! Durable volumes: their wire shapes and the checks on a create's `mounts`.

use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;

/// Most volumes one sandbox mounts.
pub const MAX_MOUNTS: usize = 8;
/// Volume sizes allowed, in MiB (16 MiB to 1 TiB; the image is sparse).
pub const VOLUME_MIB_RANGE: std::ops::RangeInclusive<u64> = 16..=1024 * 1024;
/// A volume's size when a create names none.
pub const DEFAULT_VOLUME_MIB: u64 = 1024;

/// Whether `id` is a volume ID: a lower-case hyphenated UUID.
pub fn is_volume_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => matches!(c, b'0'..=b'9' | b'a'..=b'f'),
        })
}

/// `POST /volumes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeCreateRequest {
    /// A label, unique per team (1–64 of `[A-Za-z0-9._-]`).
    #[serde(default)]
    pub name: Option<String>,
    /// Capacity in MiB (default 1024).
    #[serde(default, rename = "sizeMiB")]
    pub size_mib: Option<u64>,
}

impl VolumeCreateRequest {
    /// The name (if any) and size, checked.
    pub fn validate(&self) -> Result<(Option<String>, u64), ApiError> {
        if let Some(name) = &self.name {
            let ok = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                && !is_volume_id(name);
            if !ok {
                return Err(ApiError::bad_request(
                    "name must be 1 to 64 of A-Z a-z 0-9 . _ - and not look like a volume ID; send e.g. \"workspace\"",
                )
                .with_details(json!({ "field": "name" })));
            }
        }
        let size = self.size_mib.unwrap_or(DEFAULT_VOLUME_MIB);
        if !VOLUME_MIB_RANGE.contains(&size) {
            return Err(ApiError::bad_request(format!(
                "sizeMiB {size} is out of range; send {} to {}",
                VOLUME_MIB_RANGE.start(),
                VOLUME_MIB_RANGE.end()
            ))
            .with_details(json!({ "field": "sizeMiB" })));
        }
        Ok((self.name.clone(), size))
    }
}

/// How a sandbox holds a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MountMode {
    /// Read-write: one holder at a time.
    #[default]
    Rw,
    /// Read-only: any number of holders; they see the volume as its writer last saved it.
    Ro,
}

impl MountMode {
    /// `rw` or `ro`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rw => "rw",
            Self::Ro => "ro",
        }
    }
}

/// One value of a create's `mounts` map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    /// The volume's ID (or name).
    pub id: String,
    /// `rw` (default) or `ro`.
    #[serde(default, rename = "type")]
    pub mode: MountMode,
    /// Reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
}

/// A checked mount: where, what, how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    /// Absolute path in the guest.
    pub path: String,
    /// Volume ID or name as sent (the pool manager resolves names).
    #[serde(rename = "volumeID")]
    pub volume: String,
    /// `rw` or `ro`.
    #[serde(rename = "type")]
    pub mode: MountMode,
    /// For a fork child or a restored copy: the mount it inherited, and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inherited: Option<Inherited>,
}

/// What a fork child or a restored copy does with its parent's read-write volumes
/// (`volumes` of a fork or restore). Read-only mounts stay read-only either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InheritVolumes {
    /// The same volume, mounted read-only: the parent keeps the write lock, and a write
    /// in the child fails with EROFS (never silently discarded).
    #[default]
    Readonly,
    /// A new volume of the parent's content at the fork (or snapshot), mounted
    /// read-write and saved like any other: both sides' writes are kept, apart.
    Copy,
}

impl InheritVolumes {
    /// `readonly` or `copy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Readonly => "readonly",
            Self::Copy => "copy",
        }
    }
}

/// How a child's mount came from its parent's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inherited {
    /// The sandbox it came from.
    #[serde(rename = "fromSandboxID")]
    pub from_sandbox: String,
    /// The parent's volume (for a copy, the one it was copied from).
    #[serde(rename = "fromVolumeID")]
    pub from_volume: String,
    /// `readonly` or `copy`.
    pub how: InheritVolumes,
}

/// Paths a volume may not cover: the guest needs them as they are.
const RESERVED_PATHS: &[&str] = &[
    "/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys",
    "/usr", "/var", "/tmp",
];

/// Checks a create's `mounts` (path → `{id, type}`).
pub fn validate_mounts(mounts: &BTreeMap<String, MountRequest>) -> Result<Vec<Mount>, ApiError> {
    if mounts.len() > MAX_MOUNTS {
        return Err(ApiError::bad_request(format!(
            "mounts has {} entries; send at most {MAX_MOUNTS}",
            mounts.len()
        ))
        .with_details(json!({ "field": "mounts" })));
    }
    let mut out: Vec<Mount> = Vec::with_capacity(mounts.len());
    for (path, m) in mounts {
        let field = format!("mounts[{path:?}]");
        let bad = |msg: String| {
            Err(ApiError::bad_request(format!("{field}: {msg}"))
                .with_details(json!({ "field": field })))
        };
        let normal = path.starts_with('/')
            && path.len() <= 255
            && !path.ends_with('/')
            && path
                .split('/')
                .skip(1)
                .all(|s| !s.is_empty() && s != "." && s != "..")
            && path.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-' | b'@' | b'+')
            });
        if !normal {
            return bad(
                "the key must be an absolute normalised path of A-Z a-z 0-9 . _ - @ +; send e.g. \"/mnt/workspace\""
                    .into(),
            );
        }
        if RESERVED_PATHS.contains(&path.as_str()) {
            return bad(format!(
                "{path} is a system directory; mount under e.g. /mnt or /home"
            ));
        }
        if m.shared == Some(true) {
            return bad("shared is reserved; omit it".into());
        }
        if m.id.is_empty() || m.id.len() > 64 {
            return bad(
                "id must be a volume ID or name; send the volumeID from POST /volumes".into(),
            );
        }
        if let Some(other) = out.iter().find(|o| {
            o.volume == m.id
                || path.starts_with(&format!("{}/", o.path))
                || o.path.starts_with(&format!("{path}/"))
        }) {
            return bad(format!(
                "overlaps mounts[{:?}] (the same volume twice, or nested paths); send each volume once at separate paths",
                other.path
            ));
        }
        out.push(Mount {
            path: path.clone(),
            volume: m.id.clone(),
            mode: m.mode,
            inherited: None,
        });
    }
    Ok(out)
}

/// A sandbox holding a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachment {
    /// The sandbox.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Where it is mounted.
    pub path: String,
    /// `rw` or `ro`.
    #[serde(rename = "type")]
    pub mode: MountMode,
}

/// A volume as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeView {
    /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    #[serde(rename = "volumeID")]
    pub volume_id: String,
    /// Its label, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Capacity.
    #[serde(rename = "sizeMiB")]
    pub size_mib: u64,
    /// ISO 8601.
    pub created_at: String,
    /// How many times its content was saved (0: never mounted read-write yet).
    pub version: u64,
    /// ISO 8601 of the last save, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saved_at: Option<String>,
    /// Who holds it now.
    pub attachments: Vec<VolumeAttachment>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts(pairs: &[(&str, &str, MountMode)]) -> BTreeMap<String, MountRequest> {
        pairs
            .iter()
            .map(|(p, id, mode)| {
                (
                    p.to_string(),
                    MountRequest {
                        id: id.to_string(),
                        mode: *mode,
                        shared: None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn mount_paths_and_volumes_are_checked() {
        let ok = validate_mounts(&mounts(&[
            ("/mnt/a", "v1", MountMode::Rw),
            ("/mnt/b", "v2", MountMode::Ro),
        ]))
        .unwrap();
        assert_eq!(ok.len(), 2);
        for (path, why) in [
            ("mnt", "absolute"),
            ("/mnt/../etc", "absolute"),
            ("/etc", "system directory"),
            ("/mnt/a/", "absolute"),
            ("/mnt/it's", "absolute"),
        ] {
            let e = validate_mounts(&mounts(&[(path, "v1", MountMode::Rw)])).unwrap_err();
            assert!(e.message.contains(why), "{path}: {}", e.message);
        }
        let e = validate_mounts(&mounts(&[
            ("/mnt/a", "v1", MountMode::Rw),
            ("/mnt/a/b", "v2", MountMode::Rw),
        ]))
        .unwrap_err();
        assert!(e.message.contains("overlaps"), "{}", e.message);
        let e = validate_mounts(&mounts(&[
            ("/mnt/a", "v1", MountMode::Rw),
            ("/mnt/b", "v1", MountMode::Ro),
        ]))
        .unwrap_err();
        assert!(e.message.contains("overlaps"), "{}", e.message);
    }

    #[test]
    fn ids_and_sizes() {
        assert!(is_volume_id("0f6b6a2e-3c1d-4c55-9a0b-2b8d5b1c9e10"));
        assert!(!is_volume_id("0F6B6A2E-3C1D-4C55-9A0B-2B8D5B1C9E10"));
        let req = VolumeCreateRequest {
            name: None,
            size_mib: Some(8),
        };
        assert!(req.validate().unwrap_err().message.contains("send 16"));
    }
}
