//! Live migration, QEMU's side: a running VM's disk and RAM copied to a VM another
//! host started for it, while the guest runs.
//!
//! The sequence (QEMU's non-shared-storage migration):
//! 1. The destination starts QEMU stopped (`-S`) and waiting (`-incoming defer`), with
//!    fresh memory and a disk overlay on its own copy of the image set's root
//!    filesystem ([`QemuVmm::prepare_incoming`]), and exports that disk over NBD.
//! 2. The source makes its disk chain overlay → root filesystem ([`QemuVm::flatten_disk`]:
//!    a snapshot layer in between, such as a template's, is streamed into the overlay),
//!    then mirrors the overlay onto the export ([`QemuVm::mirror_disk`]) until the
//!    mirror is in step (it goes on copying what the guest writes). Each attached
//!    volume is mirrored whole the same way ([`QemuVm::mirror_volume`]) onto an image
//!    the destination made for it, exported by the same NBD server.
//! 3. RAM by pre-copy with auto-converge ([`QemuVm::migrate_out`]); QEMU stops the
//!    source for the last pass (the downtime starts) and waits before the switch-over
//!    (`pause-before-switchover`) with its block devices still active.
//! 4. The source ends the mirror once in step ([`QemuVm::end_mirror`]: the guest is
//!    stopped, so its last writes are copied), sends the device state
//!    ([`QemuVm::switch_over`]); the owner hands the sandbox over; the destination runs
//!    ([`QemuVm::finish_incoming`]). Before the hand-over the source can still run on
//!    ([`QemuVm::abort_outgoing`]).
//!
//! Post-copy: when the pre-copy has not converged by [`LiveOptions::postcopy_after`],
//! the source switches to post-copy (`migrate-start-postcopy`): the guest stops, its
//! device state goes, the destination runs it, and the pages not yet sent are sent in
//! the background or fetched as the guest touches them (userfaultfd on the destination,
//! whose QEMU alone gets the group that opens `/dev/userfaultfd`). From the hand-over
//! on, the guest's memory is split between two hosts until the copy completes: losing
//! the source or the stream then loses the guest ([`QemuVm::incoming_completion`]
//! says so), the documented risk of post-copy.
//!
//! QEMU runs in a network namespace with no route out, so it never talks to another
//! host: both streams go to unix sockets in the VM directories, and the daemons carry
//! them between hosts.

use super::*;

/// The block job mirroring the disk to the destination.
const MIRROR_JOB: &str = "nullspace-mirror";
/// The block job streaming a snapshot layer into the overlay.
const STREAM_JOB: &str = "nullspace-stream";
/// The destination's NBD export of its disk (QEMU's export ID).
const DISK_EXPORT: &str = "nullspace-disk";
/// The export's NBD name.
const EXPORT_NAME: &str = "root";

/// The block job mirroring volume `lun`.
fn volume_mirror_job(lun: u8) -> String {
    format!("{MIRROR_JOB}-vol{lun}")
}

/// The NBD name (and export ID) of volume `lun`'s export on the destination.
fn volume_export(lun: u8) -> String {
    format!("vol{lun}")
}

/// The destination's writable twin of read-only volume `lun`'s node: the mirror
/// writes the image through it while the guest's own node stays read-only.
fn volume_twin(lun: u8) -> String {
    format!("vol{lun}-incoming")
}
/// How long a post-copy may stay paused (its stream broken) before its guest is
/// given up.
const POSTCOPY_STALL: Duration = Duration::from_secs(5);
/// How long a block job's QMP command may take (a mirror's opens the NBD connection).
const JOB_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// What a destination needs to start a VM a live migration fills: the shape, the root
/// filesystem (by name: its own copy of the image set's) and the machine, which must be
/// the one this host builds for the shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IncomingSpec {
    /// QEMU's version line on the source: the destination's must be the same.
    pub qemu_version: String,
    /// The source's machine arguments.
    pub machine_args: Vec<String>,
    /// The root filesystem's name in the image set.
    pub rootfs: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM, MiB.
    pub mem_mib: u32,
    /// The disk's virtual size, MiB.
    pub disk_mib: u64,
    /// Whether the VM has an egress proxy.
    pub egress: bool,
    /// Whether the source may switch to post-copy (the destination takes it if it
    /// can: [`QemuVm::incoming_postcopy`]).
    #[serde(default)]
    pub postcopy: bool,
    /// The attached volumes: the destination makes an image of each (its size, empty)
    /// for the source's mirror to fill.
    #[serde(default)]
    pub volumes: Vec<IncomingVolume>,
}

/// A volume of an incoming VM: its slot and image size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IncomingVolume {
    /// Its LUN (0 to 7).
    pub lun: u8,
    /// Whether the guest sees it write-protected.
    pub read_only: bool,
    /// The image's size in bytes.
    pub size_bytes: u64,
}

/// Which of an incoming VM's sockets a stream goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncomingSocket {
    /// The migration stream (RAM and device state).
    Migration,
    /// The NBD export of its disk (the source's mirror writes there).
    Disk,
    /// The NBD export of the volume at this LUN (on the same NBD server as the disk's).
    Volume(u8),
}

impl IncomingSocket {
    fn file(self) -> &'static str {
        match self {
            IncomingSocket::Migration => "incoming.sock",
            IncomingSocket::Disk | IncomingSocket::Volume(_) => "nbd.sock",
        }
    }
}

/// How an outgoing migration runs.
#[derive(Debug, Clone, Copy)]
pub struct LiveOptions {
    /// The longest the guest may be stopped for the last pass (QEMU's downtime limit).
    pub max_downtime: Duration,
    /// The whole migration (disk and RAM) gives up after this.
    pub deadline: Instant,
    /// Switch to post-copy if the pre-copy has not converged this long after it
    /// started; `None`: pre-copy only (the destination must have taken post-copy).
    pub postcopy_after: Option<Duration>,
}

/// How the switch-over went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switchover {
    /// All RAM was sent before the switch-over.
    PreCopy,
    /// The device state was sent with RAM left to copy: the source must stay until
    /// [`QemuVm::wait_outgoing`] says all of it went.
    PostCopy,
}

/// What a migration moved and how long the guest stood still, as QEMU reports it.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStats {
    /// The guest stopped on the source for this long (QEMU's figure: the last pass).
    pub qemu_downtime_ms: u64,
    /// Bytes of the migration stream.
    pub ram_bytes: u64,
    /// Dirty-page syncs: passes over RAM.
    pub passes: u64,
    /// Bytes the disk mirror copied.
    pub disk_bytes: u64,
    /// Whether it switched to post-copy.
    pub postcopy: bool,
}

impl QemuVmm {
    /// Starts a VM for an incoming live migration: stopped, waiting for the migration
    /// stream on its `incoming.sock`, with a fresh overlay on this host's root
    /// filesystem exported writable over NBD on its `nbd.sock` for the source's mirror,
    /// and each of `spec`'s volumes on its image in `volumes` (by LUN: made by the
    /// caller, of the spec's size), exported there too.
    pub async fn prepare_incoming(
        &self,
        spec: &IncomingSpec,
        volumes: &BTreeMap<u8, PathBuf>,
    ) -> Result<QemuVm, VmmError> {
        if spec.qemu_version != self.qemu_version {
            return Err(VmmError::SnapshotMismatch(format!(
                "the source runs {:?} and this host {:?}: migrate to a host with the same QEMU",
                spec.qemu_version, self.qemu_version
            )));
        }
        // The peer's arguments never reach QEMU: this host's for the shape, which must
        // be the same machine.
        let machine_args = self.machine_args(spec.vcpus, spec.mem_mib);
        if machine_args != spec.machine_args {
            return Err(VmmError::SnapshotMismatch(format!(
                "the source's machine ({}) is not the one this host builds for {} vCPUs and {} MiB ({}): migrate to a host with the same accelerator and kernel",
                spec.machine_args.join(" "),
                spec.vcpus,
                spec.mem_mib,
                machine_args.join(" ")
            )));
        }
        let rootfs_image = self.images.rootfs(&spec.rootfs)?;
        let mut drives = Vec::with_capacity(spec.volumes.len());
        for v in &spec.volumes {
            let path = volumes.get(&v.lun).filter(|_| v.lun < 8).ok_or_else(|| {
                VmmError::InvalidSpec(format!(
                    "the incoming VM has a volume at LUN {} and no image was made for it",
                    v.lun
                ))
            })?;
            if drives.iter().any(|d: &VolumeDrive| d.lun == v.lun) {
                return Err(VmmError::InvalidSpec(format!(
                    "the incoming VM names LUN {} twice",
                    v.lun
                )));
            }
            drives.push(VolumeDrive {
                lun: v.lun,
                path: path.clone(),
                read_only: v.read_only,
            });
        }
        let postcopy = spec.postcopy && self.postcopy_available();
        let id = new_vm_id();
        let span = tracing::info_span!("vm", id = %id, incoming = true);
        let launch = Launch {
            id,
            machine_args,
            memory: Memory::Owned,
            memory_base: None,
            disk_backing: rootfs_image.clone(),
            disk_backing_format: "raw".into(),
            rootfs_image,
            disk_mib: spec.disk_mib,
            egress: spec.egress,
            isolated_network: self.config.isolated_network,
            volumes: drives,
            incoming: true,
            start_paused: true,
            postcopy,
            boot_timeout: Duration::from_secs(60),
            rootfs: spec.rootfs.clone(),
            vcpus: spec.vcpus,
            mem_mib: spec.mem_mib,
        };
        async {
            let vm = self.launch(launch, |_| async { Ok(()) }).await?;
            match vm.listen_incoming().await {
                Ok(()) => Ok(vm),
                Err(e) => Err(vm.boot_failure(e).await),
            }
        }
        .instrument(span)
        .await
    }
}

impl QemuVm {
    /// What a destination needs to start a VM for this one's migration.
    pub fn incoming_spec(&self) -> IncomingSpec {
        IncomingSpec {
            qemu_version: self.qemu_version.clone(),
            machine_args: self.launch.machine_args.clone(),
            rootfs: self.launch.rootfs.clone(),
            vcpus: self.launch.vcpus,
            mem_mib: self.launch.mem_mib,
            disk_mib: self.launch.disk_mib,
            egress: self.launch.egress,
            postcopy: false,
            volumes: self
                .launch
                .volumes
                .iter()
                .map(|v| IncomingVolume {
                    lun: v.lun,
                    read_only: v.read_only,
                    size_bytes: std::fs::metadata(&v.path).map_or(0, |m| m.len()),
                })
                .collect(),
        }
    }

    /// The LUNs of the attached volumes.
    pub fn volume_luns(&self) -> Vec<u8> {
        self.launch.volumes.iter().map(|v| v.lun).collect()
    }

    /// Whether this incoming VM takes post-copy (its host allows it and the source
    /// asked).
    pub fn incoming_postcopy(&self) -> bool {
        self.launch.postcopy
    }

    /// A connection to one of an incoming VM's sockets (QEMU makes them as it starts
    /// listening), checked to be served by this VM's QEMU.
    pub async fn connect_incoming(&self, which: IncomingSocket) -> Result<UnixStream, VmmError> {
        let conn = connect_until(
            &self.dir.file(which.file()),
            Instant::now() + Duration::from_secs(10),
        )
        .await?;
        self.check_peer(&conn, "migration")?;
        Ok(conn)
    }

    /// A socket in the VM directory that this VM's QEMU (its user) may connect to,
    /// for a stream the daemon carries elsewhere. Only a connection from this VM's
    /// QEMU ([`QemuVm::pid`]) is to be served.
    pub fn listen_for_qemu(
        &self,
        name: &str,
    ) -> Result<(PathBuf, tokio::net::UnixListener), VmmError> {
        let sock = self.dir.file(name);
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock)
            .map_err(|e| VmmError::Host(format!("binding {}: {e}", sock.display())))?;
        if let Some(r) = &self.run_as {
            std::os::unix::fs::chown(&sock, Some(r.uid), Some(r.gid))
                .map_err(|e| VmmError::Host(format!("chown {}: {e}", sock.display())))?;
        }
        Ok((sock, listener))
    }

    async fn listen_incoming(&self) -> Result<(), VmmError> {
        let qmp = self.qmp();
        // Every page comes in the stream: nothing is shared with the source.
        self.set_ignore_shared(false).await?;
        if self.launch.postcopy {
            // Before the stream starts: the source's advice to use it comes first.
            qmp.execute(
                "migrate-set-capabilities",
                Some(
                    json!({ "capabilities": [ { "capability": "postcopy-ram", "state": true } ] }),
                ),
            )
            .await?;
        }
        let incoming = self.dir.file(IncomingSocket::Migration.file());
        qmp.execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("unix:{}", incoming.display()) })),
        )
        .await?;
        let nbd = self.dir.file(IncomingSocket::Disk.file());
        qmp.execute(
            "nbd-server-start",
            Some(json!({ "addr": { "type": "unix", "data": { "path": nbd.display().to_string() } } })),
        )
        .await?;
        let node = self.root_node().await?;
        qmp.execute(
            "block-export-add",
            Some(json!({
                "type": "nbd",
                "id": DISK_EXPORT,
                "node-name": node,
                "name": EXPORT_NAME,
                "writable": true,
            })),
        )
        .await?;
        for v in &self.launch.volumes {
            let node = if v.read_only {
                // The guest's node stays read-only; a second one on the same file takes
                // the mirror's writes (no file lock: the first holds a shared one). The
                // guest does not run until the mirror is done and the twin is gone.
                qmp.execute(
                    "blockdev-add",
                    Some(json!({
                        "driver": "raw",
                        "node-name": volume_twin(v.lun),
                        "file": {
                            "driver": "file",
                            "filename": v.path.display().to_string(),
                            "locking": "off",
                        }
                    })),
                )
                .await?;
                volume_twin(v.lun)
            } else {
                v.node_name()
            };
            qmp.execute(
                "block-export-add",
                Some(json!({
                    "type": "nbd",
                    "id": volume_export(v.lun),
                    "node-name": node,
                    "name": volume_export(v.lun),
                    "writable": true,
                })),
            )
            .await?;
        }
        Ok(())
    }

    /// The node name of the root disk's top image.
    async fn root_node(&self) -> Result<String, VmmError> {
        let blocks = self.qmp().execute("query-block", None).await?;
        blocks
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["device"] == "root")
            .and_then(|b| b["inserted"]["node-name"].as_str())
            .map(str::to_string)
            .ok_or_else(|| VmmError::Migration("QEMU lists no root disk".into()))
    }

    /// Makes the disk's chain overlay → root filesystem: a snapshot layer in between
    /// (a template's, a restored snapshot's) is streamed into the overlay while the
    /// guest runs, so the destination needs only the image set. Nothing to do for a
    /// booted VM.
    pub async fn flatten_disk(&mut self, deadline: Instant) -> Result<(), VmmError> {
        if self.launch.disk_backing == self.launch.rootfs_image {
            return Ok(());
        }
        self.clear_job(STREAM_JOB).await?;
        let rootfs = self.launch.rootfs_image.display().to_string();
        let nodes = self
            .qmp()
            .execute("query-named-block-nodes", Some(json!({ "flat": true })))
            .await?;
        let base = nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["drv"] == "raw" && n["file"] == rootfs.as_str())
            .and_then(|n| n["node-name"].as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                VmmError::Migration(format!(
                    "the root filesystem {rootfs} is not in the disk's chain"
                ))
            })?;
        self.qmp()
            .execute_within(
                "block-stream",
                Some(json!({
                    "job-id": STREAM_JOB,
                    "device": "root",
                    "base-node": base,
                    "auto-dismiss": false,
                })),
                JOB_COMMAND_TIMEOUT,
            )
            .await?;
        self.wait_job(STREAM_JOB, false, deadline).await?;
        self.launch.disk_backing = self.launch.rootfs_image.clone();
        self.launch.disk_backing_format = "raw".into();
        self.write_launch_record()
    }

    /// Mirrors the disk overlay onto the destination's export, reached through
    /// `nbd_socket` (one of [`QemuVm::listen_for_qemu`]'s, carried to the destination),
    /// until the mirror is in step. Returns the bytes copied so far.
    pub async fn mirror_disk(&self, nbd_socket: &Path, deadline: Instant) -> Result<u64, VmmError> {
        self.clear_job(MIRROR_JOB).await?;
        self.qmp()
            .execute_within(
                "drive-mirror",
                Some(json!({
                    "job-id": MIRROR_JOB,
                    "device": "root",
                    "target": format!("nbd+unix:///{EXPORT_NAME}?socket={}", nbd_socket.display()),
                    "format": "raw",
                    "sync": "top",
                    "mode": "existing",
                    "auto-dismiss": false,
                })),
                JOB_COMMAND_TIMEOUT,
            )
            .await?;
        self.wait_job(MIRROR_JOB, true, deadline).await
    }

    /// Mirrors the whole of the volume at `lun` onto the destination's export of it
    /// (an image of its size), reached through `nbd_socket`, until in step; it goes on
    /// copying what the guest writes until [`QemuVm::end_mirror`]. Returns the bytes
    /// copied so far.
    pub async fn mirror_volume(
        &self,
        lun: u8,
        nbd_socket: &Path,
        deadline: Instant,
    ) -> Result<u64, VmmError> {
        let drive = self
            .launch
            .volumes
            .iter()
            .find(|v| v.lun == lun)
            .ok_or_else(|| VmmError::InvalidSpec(format!("no volume at LUN {lun}")))?;
        let job = volume_mirror_job(lun);
        self.clear_job(&job).await?;
        self.qmp()
            .execute_within(
                "drive-mirror",
                Some(json!({
                    "job-id": job,
                    "device": drive.node_name(),
                    "target": format!("nbd+unix:///{}?socket={}", volume_export(lun), nbd_socket.display()),
                    "format": "raw",
                    "sync": "full",
                    "mode": "existing",
                    "auto-dismiss": false,
                })),
                JOB_COMMAND_TIMEOUT,
            )
            .await?;
        self.wait_job(&job, true, deadline).await
    }

    /// Migrates RAM through `socket` (one of [`QemuVm::listen_for_qemu`]'s, carried
    /// to the destination) by pre-copy with auto-converge, switching to post-copy past
    /// [`LiveOptions::postcopy_after`], up to the switch-over: returns when QEMU has
    /// stopped the guest and waits (`pre-switchover`, its block devices still active,
    /// so the disk mirror can be ended in step: [`QemuVm::end_mirror`], then
    /// [`QemuVm::switch_over`]). On failure, or past the deadline (cancelled), the VM
    /// runs on.
    pub async fn migrate_out(
        &self,
        socket: &Path,
        options: &LiveOptions,
    ) -> Result<Switchover, VmmError> {
        let qmp = self.qmp();
        // A snapshot may have left x-ignore-shared on: a VM with memory of its own
        // would then send none of it.
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [
                { "capability": "x-ignore-shared", "state": false },
                { "capability": "auto-converge", "state": true },
                { "capability": "pause-before-switchover", "state": true },
                { "capability": "postcopy-ram", "state": options.postcopy_after.is_some() },
            ] })),
        )
        .await?;
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({
                "max-bandwidth": SNAPSHOT_BANDWIDTH,
                "downtime-limit": options.max_downtime.as_millis() as u64,
            })),
        )
        .await?;
        let started = Instant::now();
        qmp.execute(
            "migrate",
            Some(json!({ "uri": format!("unix:{}", socket.display()) })),
        )
        .await?;
        let mut mode = Switchover::PreCopy;
        loop {
            let info = qmp.execute("query-migrate", None).await?;
            match info["status"].as_str().unwrap_or("") {
                "pre-switchover" => return Ok(mode),
                "failed" | "cancelled" => {
                    return Err(VmmError::Migration(format!(
                        "the RAM migration {}: {}",
                        info["status"].as_str().unwrap_or(""),
                        info["error-desc"].as_str().unwrap_or("no reason given")
                    )))
                }
                _ if Instant::now() > options.deadline => {
                    let _ = qmp.execute("migrate_cancel", None).await;
                    return Err(VmmError::Timeout(format!(
                        "the RAM migration to converge ({} passes so far, {} bytes sent)",
                        info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
                        info["ram"]["transferred"].as_u64().unwrap_or(0)
                    )));
                }
                "active"
                    if mode == Switchover::PreCopy
                        && options
                            .postcopy_after
                            .is_some_and(|after| started.elapsed() >= after) =>
                {
                    // QEMU switches at its next step: it stops the guest, and with
                    // pause-before-switchover waits before sending the device state.
                    qmp.execute("migrate-start-postcopy", None).await?;
                    info!(vm = %self.id, after_ms = started.elapsed().as_millis() as u64, "switching the migration to post-copy");
                    mode = Switchover::PostCopy;
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }

    /// From `pre-switchover` (the guest stopped, the mirror ended): sends the device
    /// state and completes the migration, or, in post-copy, starts the copy of the RAM
    /// left ([`QemuVm::wait_outgoing`] waits for its end). The VM stays stopped here
    /// (`postmigrate`).
    pub async fn switch_over(
        &self,
        mode: Switchover,
        deadline: Instant,
    ) -> Result<MigrationStats, VmmError> {
        let qmp = self.qmp();
        qmp.execute(
            "migrate-continue",
            Some(json!({ "state": "pre-switchover" })),
        )
        .await?;
        loop {
            let info = qmp.execute("query-migrate", None).await?;
            let status = info["status"].as_str().unwrap_or("");
            let sent = status == "completed"
                || (mode == Switchover::PostCopy && status == "postcopy-active");
            match status {
                _ if sent => {
                    return Ok(MigrationStats {
                        qemu_downtime_ms: info["downtime"].as_u64().unwrap_or(0),
                        ram_bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
                        passes: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
                        disk_bytes: 0,
                        postcopy: mode == Switchover::PostCopy,
                    })
                }
                "failed" | "cancelled" => {
                    return Err(VmmError::Migration(format!(
                        "the switch-over {}: {}",
                        info["status"].as_str().unwrap_or(""),
                        info["error-desc"].as_str().unwrap_or("no reason given")
                    )))
                }
                _ if Instant::now() > deadline => {
                    let _ = qmp.execute("migrate_cancel", None).await;
                    return Err(VmmError::Timeout("the switch-over".into()));
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// After a post-copy switch-over: waits until the destination has every page.
    /// Returns the bytes of the whole stream.
    pub async fn wait_outgoing(&self, deadline: Instant) -> Result<u64, VmmError> {
        let qmp = self.qmp();
        loop {
            let info = qmp.execute("query-migrate", None).await?;
            match info["status"].as_str().unwrap_or("") {
                "completed" => return Ok(info["ram"]["transferred"].as_u64().unwrap_or(0)),
                s @ ("failed" | "cancelled" | "postcopy-paused") => {
                    return Err(VmmError::Migration(format!(
                        "the post-copy {s}: {}",
                        info["error-desc"]
                            .as_str()
                            .unwrap_or("the stream to the destination broke")
                    )))
                }
                _ if Instant::now() > deadline => {
                    return Err(VmmError::Timeout("the post-copy to complete".into()))
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// At the switch-over (the guest stopped, block devices still active): ends the
    /// disk's and the volumes' mirrors once each copy is whole. Returns the bytes they
    /// copied.
    pub async fn end_mirror(&self) -> Result<u64, VmmError> {
        let jobs: Vec<String> = std::iter::once(MIRROR_JOB.to_string())
            .chain(self.launch.volumes.iter().map(|v| volume_mirror_job(v.lun)))
            .collect();
        // All at once: each completes as soon as its last writes are copied.
        for job in &jobs {
            self.qmp()
                .execute("block-job-cancel", Some(json!({ "device": job })))
                .await?;
        }
        let mut copied = 0;
        for job in &jobs {
            copied += self
                .wait_job(job, false, Instant::now() + Duration::from_secs(30))
                .await?;
        }
        Ok(copied)
    }

    /// Undoes an outgoing migration that did not hand over: the migration and the
    /// mirror are cancelled and the VM runs on here, as before. Returns whether it
    /// runs (a post-copy switch-over may have left it unable to).
    pub async fn abort_outgoing(&self) -> bool {
        let qmp = self.qmp();
        let _ = qmp.execute("migrate_cancel", None).await;
        let settle = Instant::now() + Duration::from_secs(10);
        while Instant::now() < settle {
            match qmp.execute("query-migrate", None).await {
                Ok(info)
                    if matches!(
                        info["status"].as_str(),
                        Some(
                            "active"
                                | "setup"
                                | "device"
                                | "cancelling"
                                | "pre-switchover"
                                | "postcopy-active"
                        )
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                _ => break,
            }
        }
        if let Ok(jobs) = qmp.execute("query-jobs", None).await {
            for job in jobs.as_array().into_iter().flatten() {
                let Some(id) = job["id"].as_str() else {
                    continue;
                };
                if !id.starts_with(MIRROR_JOB) && id != STREAM_JOB {
                    continue;
                }
                if job["status"] != "concluded" {
                    let _ = qmp
                        .execute(
                            "block-job-cancel",
                            Some(json!({ "device": id, "force": true })),
                        )
                        .await;
                    let _ = self
                        .wait_job(id, false, Instant::now() + Duration::from_secs(10))
                        .await;
                }
                let _ = qmp.execute("job-dismiss", Some(json!({ "id": id }))).await;
            }
        }
        // The capabilities stay: a snapshot's migration sets its own
        // (`set_ignore_shared`), as does a later live migration.
        match qmp.execute("query-status", None).await {
            Ok(status) if status["running"] == true => true,
            _ => match qmp.execute("cont", None).await {
                Ok(_) => true,
                Err(e) => {
                    warn!(vm = %self.id, error = %e, "running the VM again after a failed migration");
                    false
                }
            },
        }
    }

    /// On the destination: waits until the whole migration stream is loaded, or in
    /// post-copy the device state (QEMU then leaves `inmigrate` for `paused`; the RAM
    /// left comes later). The VM stays stopped.
    pub async fn wait_incoming(&self, deadline: Instant) -> Result<(), VmmError> {
        loop {
            let info = self.qmp().execute("query-migrate", None).await?;
            match info["status"].as_str().unwrap_or("") {
                "completed" => break,
                "postcopy-active" => {
                    let state = self.qmp().execute("query-status", None).await?;
                    if state["status"] != "inmigrate" {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                "postcopy-paused" => {
                    return Err(VmmError::Migration(
                        "the post-copy stream from the source broke".into(),
                    ))
                }
                "failed" | "cancelled" => {
                    return Err(VmmError::Migration(format!(
                        "the incoming migration {}: {}",
                        info["status"].as_str().unwrap_or(""),
                        info["error-desc"].as_str().unwrap_or("no reason given")
                    )))
                }
                _ if Instant::now() > deadline => {
                    return Err(VmmError::Timeout("the incoming migration".into()))
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
        Ok(())
    }

    /// On the destination, after the source handed over: closes the disk export, runs
    /// the VM and connects its agent.
    pub async fn finish_incoming(&mut self, deadline: Instant) -> Result<(), VmmError> {
        self.wait_incoming(deadline).await?;
        let qmp = self.qmp();
        // The exports and twins are the copy's scaffolding: a failure to take one down
        // is logged, never a reason to lose the guest (the NBD server stops below, and
        // the VM's network namespace has no way in anyway).
        let exports = std::iter::once(DISK_EXPORT.to_string())
            .chain(self.launch.volumes.iter().map(|v| volume_export(v.lun)));
        for export in exports {
            if let Err(e) = qmp
                .execute(
                    "block-export-del",
                    Some(json!({ "id": export, "mode": "hard" })),
                )
                .await
            {
                warn!(vm = %self.id, export, error = %e, "removing an incoming VM's export failed");
            }
        }
        // An export's removal completes in the background; the twins go once it has.
        for v in self.launch.volumes.iter().filter(|v| v.read_only) {
            let settle = Instant::now() + Duration::from_secs(5);
            loop {
                match qmp
                    .execute(
                        "blockdev-del",
                        Some(json!({ "node-name": volume_twin(v.lun) })),
                    )
                    .await
                {
                    Ok(_) => break,
                    Err(_) if Instant::now() < settle => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => {
                        warn!(vm = %self.id, lun = v.lun, error = %e, "removing a read-only volume's incoming twin failed; it stays unused");
                        break;
                    }
                }
            }
        }
        let _ = qmp.execute("nbd-server-stop", None).await;
        qmp.execute("cont", None).await?;
        self.connect_agent(deadline).await
    }

    /// On the destination, once it runs: a watch that ends when every page has
    /// arrived (at once after a pre-copy), or with why not: the post-copy failed,
    /// stalled ([`POSTCOPY_STALL`] paused: its source or the stream is gone), or outlasted
    /// `deadline`. Its guest is then lost.
    pub fn incoming_completion(
        &self,
        deadline: Instant,
    ) -> impl std::future::Future<Output = Result<(), VmmError>> + Send + 'static {
        let qmp = self
            .qmp
            .clone()
            .expect("a launched VM has a QMP connection");
        async move {
            let mut paused_since: Option<Instant> = None;
            loop {
                let info = qmp.execute("query-migrate", None).await?;
                match info["status"].as_str().unwrap_or("") {
                    "completed" | "none" | "" => return Ok(()),
                    s @ ("failed" | "cancelled") => {
                        return Err(VmmError::Migration(format!(
                            "the post-copy {s}: {}",
                            info["error-desc"].as_str().unwrap_or("no reason given")
                        )))
                    }
                    "postcopy-paused" => {
                        let since = *paused_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > POSTCOPY_STALL {
                            return Err(VmmError::Migration(
                                "the source stopped sending the pages left (it or the stream between the hosts is gone)".into(),
                            ));
                        }
                    }
                    _ => paused_since = None,
                }
                if Instant::now() > deadline {
                    return Err(VmmError::Timeout("the post-copy to complete".into()));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Ends a block job `job` left from an earlier move (its owner died mid-copy, and the
    /// restarted one adopted the VM): QEMU refuses a new job under a taken ID.
    async fn clear_job(&self, job: &str) -> Result<(), VmmError> {
        let jobs = self.qmp().execute("query-jobs", None).await?;
        let Some(left) = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == job))
            .cloned()
        else {
            return Ok(());
        };
        warn!(vm = %self.id, job, status = %left["status"], "a block job of an earlier move was left: ended");
        if left["status"] != "concluded" {
            let _ = self
                .qmp()
                .execute(
                    "block-job-cancel",
                    Some(json!({ "device": job, "force": true })),
                )
                .await;
            // Concluded, then dismissed, by the wait (its error, if any, is the old
            // move's).
            let _ = self
                .wait_job(job, false, Instant::now() + Duration::from_secs(10))
                .await;
        } else {
            let _ = self
                .qmp()
                .execute("job-dismiss", Some(json!({ "id": job })))
                .await;
        }
        Ok(())
    }

    /// Waits for block job `job`: until it is ready (a mirror in step) when
    /// `until_ready`, else until it concludes; a concluded job is dismissed. Returns
    /// the bytes it has copied. Past `deadline` the job is cancelled.
    async fn wait_job(
        &self,
        job: &str,
        until_ready: bool,
        deadline: Instant,
    ) -> Result<u64, VmmError> {
        let qmp = self.qmp();
        loop {
            let jobs = qmp.execute("query-jobs", None).await?;
            let found = jobs
                .as_array()
                .and_then(|a| a.iter().find(|j| j["id"] == job))
                .cloned();
            let Some(j) = found else {
                return Err(VmmError::Migration(format!("block job {job} is gone")));
            };
            let copied = j["current-progress"].as_u64().unwrap_or(0);
            match j["status"].as_str().unwrap_or("") {
                "ready" if until_ready => return Ok(copied),
                "concluded" => {
                    let _ = qmp.execute("job-dismiss", Some(json!({ "id": job }))).await;
                    return match j["error"].as_str() {
                        Some(e) => Err(VmmError::Migration(format!("block job {job}: {e}"))),
                        None if until_ready => Err(VmmError::Migration(format!(
                            "block job {job} ended before it was in step"
                        ))),
                        None => Ok(copied),
                    };
                }
                _ if Instant::now() > deadline => {
                    let _ = qmp
                        .execute(
                            "block-job-cancel",
                            Some(json!({ "device": job, "force": true })),
                        )
                        .await;
                    return Err(VmmError::Timeout(format!(
                        "block job {job} ({copied} of {} bytes)",
                        j["total-progress"].as_u64().unwrap_or(0)
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}
