//! Users and groups, read from `/etc/passwd` and `/etc/group`.
//!
//! Parsed directly rather than through libc's `getpwnam`: the agent is a static binary,
//! and static glibc cannot load NSS modules.

use agent_protocol::{AgentError, ErrorCode};

/// A resolved account.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Looks up `name` (or a numeric uid).
pub fn lookup(name: &str) -> Result<User, AgentError> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| AgentError::from_io(&e, "/etc/passwd"))?;
    let mut known = Vec::new();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        known.push(f[0]);
        if f[0] == name || f[2] == name {
            let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) else {
                continue;
            };
            return Ok(User {
                name: f[0].to_string(),
                uid,
                gid,
                home: f[5].to_string(),
                shell: f[6].to_string(),
                groups: supplementary_groups(f[0]),
            });
        }
    }
    Err(AgentError::new(
        ErrorCode::UnknownUser,
        format!(
            "user '{name}' does not exist in this sandbox; send one of: {}",
            known.join(", ")
        ),
    ))
}

fn supplementary_groups(user: &str) -> Vec<u32> {
    let Ok(group) = std::fs::read_to_string("/etc/group") else {
        return Vec::new();
    };
    group
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 4 && f[3].split(',').any(|m| m == user))
                .then(|| f[2].parse().ok())
                .flatten()
        })
        .collect()
}
