//! Three hosts, each pool manager in a network namespace of its own with its own
//! address, started by deploy/cluster.sh (PostgreSQL catalog, one SeaweedFS bucket, the
//! public API in front of host 1): creates through the public API spread over the
//! hosts, a sandbox is used through a host that does not own it, and a partition (one
//! host's link down) never has two hosts run one sandbox.

use nullspace_tests::http::Runtime;
use nullspace_tests::netns_cluster::{eventually, NetCluster};
use nullspace_tests::qemus_in;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn tiny() -> Value {
    json!({ "templateID": "minimal", "resources": { "vcpus": 1, "memMiB": 256, "diskSizeMiB": 1024 }, "timeout": 600 })
}

fn id_of(view: &Value) -> String {
    view["sandboxID"].as_str().unwrap().to_string()
}

/// QEMU processes in the run directories of hosts `hosts`.
fn vms_on(cluster: &NetCluster, hosts: &[usize]) -> usize {
    hosts
        .iter()
        .map(|&i| qemus_in(&cluster.host(i).run_dir).len())
        .sum()
}

#[tokio::test]
async fn namespaced_hosts_spread_forward_and_never_run_one_sandbox_twice_across_a_partition() {
    nullspace_tests::init_logging();
    let cluster = NetCluster::up(3);
    let public = cluster.public();
    // Registered at the addresses of their namespaces.
    let listed = cluster.listed_hosts();
    assert_eq!(listed.len(), 3, "{listed:?}");
    for h in &cluster.hosts {
        assert_eq!(listed[&h.id]["state"], "ready", "{listed:?}");
        assert_eq!(listed[&h.id]["controlUrl"], json!(h.control), "{listed:?}");
        assert_eq!(listed[&h.id]["edgeUrl"], json!(h.edge), "{listed:?}");
    }

    // a. Three creates through the public API: one on each host (placement prefers the
    // emptiest, and each host offers this machine's CPUs).
    let mut on: BTreeMap<usize, Value> = BTreeMap::new();
    for _ in 0..3 {
        let sbx = public.create(tiny()).await;
        let host = cluster.owner_of(&sbx);
        assert!(on.insert(host, sbx).is_none(), "two creates on host-{host}");
    }
    let s1 = id_of(&on[&1]);
    let s2 = id_of(&on[&2]);
    let h = id_of(&on[&3]);

    // Host 1's sandbox used through host 2 only: its control API and its edge.
    let via2 = cluster.control(2);
    let (status, connected) = via2
        .post(&format!("/v1/sandboxes/{s1}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{connected}");
    assert_eq!(cluster.owner_of(&connected), 1, "{connected}");
    let through2 = Runtime {
        http: reqwest::Client::new(),
        base: format!("{}/v1/sandboxes/{s1}", cluster.host(2).edge),
        token: connected["runtime"]["token"].as_str().unwrap().to_string(),
    };
    through2
        .put_file("/workspace/note.txt", b"through host-2")
        .await;
    let (out, err, code) = through2.run("cat /workspace/note.txt").await;
    assert_eq!((out.as_str(), code), ("through host-2", 0), "{err}");
    assert_eq!(
        through2.read_file("/workspace/note.txt").await.as_deref(),
        Some(&b"through host-2"[..])
    );
    let detail = via2.get(&s1).await;
    assert_eq!(detail["state"], "running", "{detail}");

    // b. On host 3: H hibernated with a file, and R running (the hibernate freed host
    // 3's CPU: the next create lands there).
    Runtime::of(&on[&3])
        .put_file("/workspace/kept.txt", b"kept across the partition")
        .await;
    let (status, v) = public
        .post(&format!("/v1/sandboxes/{h}/hibernate"), json!({}))
        .await;
    assert_eq!(
        (status, v["state"].as_str()),
        (StatusCode::OK, Some("paused")),
        "{v}"
    );
    let r_view = public.create(tiny()).await;
    assert_eq!(cluster.owner_of(&r_view), 3, "{r_view}");
    let r = id_of(&r_view);
    // H's VM ended with its hibernate: host 3 runs R's only.
    // (A deadline, not a timing check: the hibernated VM's QEMU ends in moments, later
    // on a loaded machine.)
    eventually(30, "host-3 running R's VM only", || {
        let n = vms_on(&cluster, &[3]);
        async move {
            if n == 1 {
                Ok(())
            } else {
                Err(format!("{n} QEMU on host-3"))
            }
        }
    })
    .await;

    // The partition: host 3 reaches nothing (catalog, bucket, other hosts) and nothing
    // reaches it.
    let partitioned = Instant::now();
    cluster.partition(3);
    // Asked from inside its own namespace to bring H back meanwhile: it must not,
    // whatever it answers (its catalog calls fail, or wait and go through once the link
    // is back, after H moved).
    let stale = cluster
        .in_netns(3, "curl")
        .args(["-s", "-m", "60", "-w", "\n%{http_code}", "-X", "POST"])
        .args(["-H", &format!("X-API-Key: {}", cluster.key)])
        .args(["-H", "content-type: application/json", "-d", "{}"])
        .arg(format!(
            "{}/v1/sandboxes/{h}/connect",
            cluster.host(3).control
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl in host-3's namespace");
    let mut stale = KillOnDrop(stale);

    // The others declare it lost (heartbeat expiry) and take its sandboxes over.
    eventually(60, "host-3 declared lost", || {
        let state = cluster.host_state(3);
        async move {
            if state == "lost" {
                Ok(())
            } else {
                Err(state)
            }
        }
    })
    .await;
    eprintln!(
        "host-3 declared lost {:?} after the partition",
        partitioned.elapsed()
    );
    eventually(30, "the takeover of host-3's sandboxes", || {
        let public = public.clone();
        let (r, h) = (r.clone(), h.clone());
        async move {
            let rv = public.get(&r).await;
            let hv = public.get(&h).await;
            let moved = hv["timeline"]
                .as_array()
                .is_some_and(|t| t.iter().any(|s| s.to_string().contains("lost host")));
            if rv["diagnostic"]["code"] == "host_lost" && moved {
                Ok(())
            } else {
                Err(format!("R: {rv}\nH: {hv}"))
            }
        }
    })
    .await;
    // The running one is an error, and stays one: nobody resumes it elsewhere (its
    // memory and disk are on host 3, whose VM may still run).
    let rv = public.get(&r).await;
    assert_eq!(rv["state"], "error", "{rv}");
    let (status, v) = public
        .post(&format!("/v1/sandboxes/{r}/connect"), json!({}))
        .await;
    assert!(!status.is_success(), "R resumed elsewhere: {status} {v}");
    // The hibernated one resumes on a host that took it over, with its file.
    let (status, resumed) = public
        .post(&format!("/v1/sandboxes/{h}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    let new_owner = cluster.owner_of(&resumed);
    assert_ne!(new_owner, 3, "{resumed}");
    let rt = Runtime::of(&resumed);
    assert_eq!(
        rt.read_file("/workspace/kept.txt").await.as_deref(),
        Some(&b"kept across the partition"[..])
    );
    // S1, S2 and H run on hosts 1 and 2; host 3 runs at most R's VM.
    assert_eq!(vms_on(&cluster, &[1, 2]), 3, "VMs on hosts 1 and 2");
    assert!(
        vms_on(&cluster, &[3]) <= 1,
        "host-3 started a VM while cut off"
    );

    // The link comes back. Host 3 sees itself declared lost, ends the VMs of sandboxes
    // that are no longer its own (R's), and rejoins.
    cluster.heal(3);
    let healed = Instant::now();
    // What host 3 answered when asked to bring H back: not a runtime of its own.
    let deadline = Instant::now() + Duration::from_secs(70);
    let answer = loop {
        if let Some(status) = stale.0.try_wait().unwrap() {
            let mut out = String::new();
            std::io::Read::read_to_string(stale.0.stdout.as_mut().unwrap(), &mut out).unwrap();
            break format!("{status}: {out}");
        }
        assert!(
            Instant::now() < deadline,
            "curl in host-3's namespace hangs"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("host-3, asked while cut off to connect H, answered {answer}");
    assert!(
        !answer.contains(&format!("{}/", cluster.host(3).edge)),
        "host-3 brought H back: {answer}"
    );

    // POOL MANAGER BEHAVIOUR UNDER TEST (pool-manager/src/sandboxes/moves.rs,
    // Manager::fence): a host that was declared lost ends, when it returns, the VMs of
    // every sandbox that moved away while it was gone. If this fails, host 3 keeps
    // running R after R was declared host_lost elsewhere.
    eventually(60, "host-3 ending the VMs it no longer owns", || {
        let left = qemus_in(&cluster.host(3).run_dir);
        async move {
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("QEMU {left:?} still runs on host-3"))
            }
        }
    })
    .await;
    eventually(30, "host-3 ready again", || {
        let state = cluster.host_state(3);
        async move {
            if state == "ready" {
                Ok(())
            } else {
                Err(state)
            }
        }
    })
    .await;
    eprintln!(
        "host-3 fenced and ready {:?} after the heal",
        healed.elapsed()
    );

    // Its writes are fenced: through host 3, H stays where it runs now (connect and the
    // data plane are forwarded to its owner), and host 3 runs nothing of it.
    let via3 = cluster.control(3);
    let (status, v) = via3
        .post(&format!("/v1/sandboxes/{h}/connect"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        cluster.owner_of(&v),
        new_owner,
        "H came back to host-3: {v}"
    );
    let through3 = Runtime {
        http: reqwest::Client::new(),
        base: format!("{}/v1/sandboxes/{h}", cluster.host(3).edge),
        token: v["runtime"]["token"].as_str().unwrap().to_string(),
    };
    assert_eq!(
        through3.read_file("/workspace/kept.txt").await.as_deref(),
        Some(&b"kept across the partition"[..])
    );
    let rv = via3.get(&r).await;
    assert_eq!(rv["state"], "error", "{rv}");
    assert_eq!(vms_on(&cluster, &[3]), 0, "host-3 runs a VM again");
    assert_eq!(vms_on(&cluster, &[1, 2]), 3, "VMs on hosts 1 and 2");
    let listed = cluster.listed_hosts();
    assert!(
        listed.len() == 3 && listed.values().all(|h| h["state"] == "ready"),
        "{listed:?}"
    );

    // Deletes end everything, wherever it runs.
    for id in [&s1, &s2, &h, &r] {
        assert_eq!(public.delete(id).await, StatusCode::NO_CONTENT, "{id}");
    }
    eventually(20, "every VM ending", || {
        let left = vms_on(&cluster, &[1, 2, 3]);
        async move {
            if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} QEMU still run"))
            }
        }
    })
    .await;
}

/// A child process killed (and reaped) on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
