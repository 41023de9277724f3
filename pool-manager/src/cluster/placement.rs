//! Where a new sandbox goes: best-of-K over the ready hosts that can run it, scored by
//! free capacity with a bonus for a ready warm VM of its template and shape; capacity
//! reserved on the chosen host in the catalog before the create is forwarded there, and
//! a host that refuses excluded before the next try.

use super::forward::{forward, HostHeader, FORWARDED_BY};
use crate::catalog::{Allocation, HostRecord};
use crate::error::ApiError;
use crate::model::Resources;
use crate::sandboxes::Manager;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::Response;
use rand::seq::SliceRandom;
use std::collections::HashSet;

/// Set on a create forwarded by placement: the reservation the receiving host ends once
/// its record of the sandbox counts instead.
pub const RESERVATION: &str = "x-nullspace-reservation";

/// Hosts compared per decision (the "K" of best-of-K): enough to find a good one, few
/// enough that concurrent placements spread instead of all picking the one best host.
pub const BEST_OF: usize = 3;

/// A warm VM's place in a host's heartbeat (`template/vcpus/memMiB/diskMiB`).
pub fn warm_key(template: &str, r: Resources) -> String {
    format!("{template}/{}/{}/{}", r.vcpus, r.mem_mib, r.disk_mib)
}

/// How good `h` is for a sandbox needing `need`: the shares of its vCPUs and memory
/// left free afterwards, plus 1 with a ready warm VM of `warm` there. `None` when it
/// cannot take it (not ready, too full).
pub fn score(h: &HostRecord, need: Allocation, warm: &str) -> Option<f64> {
    let free = h.free();
    if !h.is_ready()
        || free.vcpus < need.vcpus
        || free.mem_mib < need.mem_mib
        || free.disk_mib < need.disk_mib
    {
        return None;
    }
    let share = |left: u64, of: u64| {
        if of == 0 {
            0.0
        } else {
            left as f64 / of as f64
        }
    };
    let after = share(free.vcpus - need.vcpus, h.info.vcpus)
        + share(free.mem_mib - need.mem_mib, h.info.mem_mib);
    let warm_bonus = if h.warm.get(warm).and_then(|v| v.as_u64()).unwrap_or(0) > 0 {
        1.0
    } else {
        0.0
    };
    Some(after + warm_bonus)
}

/// The host to try: of up to [`BEST_OF`] hosts drawn at random from those that can
/// take it (`compatible`, not `excluded`, and with a warm VM when `warm_only`), the best
/// scored.
pub fn choose<'a>(
    hosts: &'a [HostRecord],
    need: Allocation,
    warm: &str,
    warm_only: bool,
    compatible: impl Fn(&HostRecord) -> bool,
    excluded: &HashSet<String>,
) -> Option<&'a HostRecord> {
    let mut fit: Vec<(&HostRecord, f64)> = hosts
        .iter()
        .filter(|h| !excluded.contains(&h.info.id) && compatible(h))
        .filter(|h| !warm_only || h.warm.get(warm).and_then(|v| v.as_u64()).unwrap_or(0) > 0)
        .filter_map(|h| Some((h, score(h, need, warm)?)))
        .collect();
    fit.shuffle(&mut rand::thread_rng());
    fit.truncate(BEST_OF);
    fit.into_iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(h, _)| h)
}

/// Places a create (`body`, as the caller sent it) on the cluster: `None` when it is
/// this host's to make (one host only, or this one chosen, or no other would take it),
/// else the chosen host's answer. A host that refuses for capacity (503, 507) or cannot
/// be connected to is excluded and the next one tried; one that took the request and
/// then failed is not retried elsewhere (the sandbox may exist there).
pub async fn place_create(
    m: &Manager,
    headers: &HeaderMap,
    template: &str,
    resources: Resources,
    warm_only: bool,
    region: Option<&str>,
    body: &bytes::Bytes,
) -> Result<Option<Response>, ApiError> {
    let Some(this) = super::this_host() else {
        return Ok(None);
    };
    if headers.contains_key(FORWARDED_BY) {
        return Ok(None);
    }
    // Only a shared catalog has other hosts, so on one host only its own state
    // matters: one row, where the hosts' load below is a scan of every sandbox record,
    // which a warm checkout (a millisecond in all) must not pay for nothing.
    if !m.catalog.is_shared() {
        return match m.catalog.host_state(this)? {
            Some(state) if state != "ready" => Err(ApiError::new(
                503,
                "no_host_available",
                format!(
                    "this host ({this}) is {state} and no other host can take the sandbox now; retry later, or ask the operator to add capacity"
                ),
            )),
            _ => Ok(None),
        };
    }
    let hosts = m.catalog.hosts()?;
    let Some(me) = hosts.iter().find(|h| h.info.id == this) else {
        return Ok(None);
    };
    // A create that names a region goes to that region's hosts only.
    let in_region = |h: &HostRecord| region.is_none_or(|r| h.info.region.as_deref() == Some(r));
    // A host that is not ready (draining, drained, declared lost) makes no sandbox:
    // another host does, or the create is refused.
    let here_ok = me.is_ready() && in_region(me);
    if here_ok && hosts.iter().filter(|h| h.is_ready()).count() < 2 {
        return Ok(None);
    }
    let refused_here = || {
        ApiError::new(
            503,
            "no_host_available",
            match region {
                Some(r) if !in_region(me) => format!(
                    "no host of region {r:?} can take the sandbox now; retry later, or ask the operator to add capacity there"
                ),
                _ => format!(
                    "this host ({this}) is {} and no other host can take the sandbox now; retry later, or ask the operator to add capacity",
                    me.state
                ),
            },
        )
    };
    // Same QEMU and guest images: what a template or snapshot made on one restores on.
    let compatible = |h: &HostRecord| {
        h.info.qemu == me.info.qemu && h.info.image_set == me.info.image_set && in_region(h)
    };
    let need = Allocation {
        vcpus: u64::from(resources.vcpus),
        mem_mib: u64::from(resources.mem_mib),
        disk_mib: resources.disk_mib,
    };
    let warm = warm_key(template, resources);
    let mut excluded = HashSet::new();
    let started = std::time::Instant::now();
    loop {
        // With no host judged to have room, a create that may stay here is made here
        // (this host's own admission decides); one for a region this host is not in goes
        // to that region's least-loaded ready host instead, whose admission decides.
        let fallback = || {
            (!in_region(me))
                .then(|| {
                    hosts
                        .iter()
                        .filter(|h| h.is_ready() && compatible(h) && !excluded.contains(&h.info.id))
                        .min_by_key(|h| h.allocated.mem_mib)
                })
                .flatten()
        };
        let chosen = choose(&hosts, need, &warm, warm_only, compatible, &excluded);
        let by_fallback = chosen.is_none();
        let Some(host) = chosen.or_else(|| (!warm_only).then(fallback).flatten()) else {
            return if here_ok {
                Ok(None)
            } else {
                Err(refused_here())
            };
        };
        if host.info.id == this {
            tracing::debug!(
                elapsed_us = started.elapsed().as_micros() as u64,
                "placed here"
            );
            return Ok(None);
        }
        excluded.insert(host.info.id.clone());
        // A fallback host is one placement judged full: it gets the create without a
        // reservation, as this host would take one it may keep.
        let reservation = match m.catalog.reserve(&host.info.id, need)? {
            Some(r) => Some(r),
            None if by_fallback => None,
            None => continue,
        };
        tracing::info!(host = %host.info.id, elapsed_us = started.elapsed().as_micros() as u64, "create placed on another host");
        let mut req = Request::builder()
            .method("POST")
            .uri("/v1/sandboxes")
            .body(Body::from(body.clone()))
            .expect("a fixed request");
        for (name, value) in headers {
            if name != axum::http::header::CONTENT_LENGTH {
                req.headers_mut().append(name, value.clone());
            }
        }
        if let Some(v) = reservation.as_deref().and_then(|r| r.parse().ok()) {
            req.headers_mut().insert(RESERVATION, v);
        }
        match forward(&host.info.control_url, this, req, HostHeader::Target).await {
            Ok(resp)
                if !matches!(
                    resp.status(),
                    StatusCode::SERVICE_UNAVAILABLE | StatusCode::INSUFFICIENT_STORAGE
                ) =>
            {
                return Ok(Some(resp));
            }
            Ok(resp) => {
                tracing::warn!(host = %host.info.id, status = %resp.status(), "a placed create was refused; trying another host");
            }
            Err(e @ super::forward::ForwardError::Connect { .. }) => {
                tracing::warn!(host = %host.info.id, error = %e, "a placed create could not be sent; trying another host");
            }
            Err(e) => {
                if let Some(r) = &reservation {
                    let _ = m.catalog.release_reservation(r);
                }
                return Err(ApiError::new(
                    502,
                    "host_unreachable",
                    format!("the create placed on host {} got no answer ({e}); list your sandboxes before retrying, it may exist", host.info.id),
                ));
            }
        }
        if let Some(r) = &reservation {
            let _ = m.catalog.release_reservation(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::HostInfo;

    fn host(id: &str, free_mem: u64, warm: u64) -> HostRecord {
        HostRecord {
            info: HostInfo {
                id: id.into(),
                control_url: String::new(),
                edge_url: String::new(),
                preview_url: String::new(),
                vcpus: 8,
                mem_mib: 8192,
                disk_mib: 100_000,
                qemu: "q".into(),
                accel: "kvm".into(),
                image_set: "i".into(),
                region: None,
                store: None,
            },
            state: "ready".into(),
            warm: serde_json::json!({ "base/1/256/1024": warm }),
            allocated: Allocation {
                vcpus: 0,
                mem_mib: 8192 - free_mem,
                disk_mib: 0,
            },
            heartbeat_ms: 0,
            now_ms: 0,
        }
    }

    const NEED: Allocation = Allocation {
        vcpus: 1,
        mem_mib: 256,
        disk_mib: 1024,
    };

    #[test]
    fn the_freest_host_wins_and_a_warm_vm_outweighs_free_memory() {
        let hosts = vec![host("a", 1024, 0), host("b", 8000, 0), host("c", 300, 1)];
        let none = HashSet::new();
        let picked = choose(&hosts, NEED, "base/1/256/1024", false, |_| true, &none).unwrap();
        assert_eq!(picked.info.id, "c", "the warm VM's bonus");
        let picked = choose(&hosts, NEED, "other/1/256/1024", false, |_| true, &none).unwrap();
        assert_eq!(picked.info.id, "b", "most memory free");
        // Too full, not ready, excluded or incompatible: never chosen.
        let mut full = host("d", 100, 5);
        full.state = "ready".into();
        let mut draining = host("e", 8000, 5);
        draining.state = "draining".into();
        let hosts = vec![full, draining, host("f", 8000, 0)];
        let excluded: HashSet<String> = ["f".to_string()].into();
        assert!(choose(&hosts, NEED, "base/1/256/1024", false, |_| true, &excluded).is_none());
        assert!(choose(
            &hosts,
            NEED,
            "base/1/256/1024",
            false,
            |h| h.info.id != "f",
            &none
        )
        .is_none());
        // `require`: only hosts with a warm VM.
        let hosts = vec![host("a", 8000, 0), host("b", 500, 1)];
        let picked = choose(&hosts, NEED, "base/1/256/1024", true, |_| true, &none).unwrap();
        assert_eq!(picked.info.id, "b");
    }

    #[test]
    fn a_decision_over_a_hundred_or_a_thousand_hosts_reads_rows_only() {
        // The placement row of the README's performance table (`bench-cluster` names
        // this test): the choice over host rows already read, at 100 and 1,000 hosts.
        const DECISIONS: u32 = 1000;
        let mut per_decision = Vec::new();
        for n in [100u64, 1000] {
            let hosts: Vec<HostRecord> =
                (0..n).map(|i| host(&format!("h{i}"), 256 + i, 0)).collect();
            let none = HashSet::new();
            let t = std::time::Instant::now();
            for _ in 0..DECISIONS {
                assert!(choose(&hosts, NEED, "base/1/256/1024", false, |_| true, &none).is_some());
            }
            let each = t.elapsed() / DECISIONS;
            // Reported, not asserted (timing).
            eprintln!("placement over {n:>4} hosts: {each:?} per decision ({DECISIONS} decisions)");
            per_decision.push(each);
        }
        eprintln!(
            "ratio 1000 / 100 hosts: {:.1}x",
            per_decision[1].as_secs_f64() / per_decision[0].as_secs_f64().max(1e-9)
        );
    }
}
