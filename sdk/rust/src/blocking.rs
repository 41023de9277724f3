//! The same calls without async: each blocks on a small runtime the handle owns.

use crate::models::{
    CommandResult, FileInfo, ListQuery, ProcessInfo, RestoreOptions, SandboxInfo, SandboxPage,
    SnapshotInfo,
};
use crate::{
    BuildLogLine, BuildLogPage, ConnectionConfig, CreateOptions, Error, FieldsPage, Metric,
    MetricsTime, Result, RunOptions, Template, TemplateBuild, WarmPool, WarmPoolSettings,
};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

fn runtime() -> Result<Arc<tokio::runtime::Runtime>> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(Arc::new)
        .map_err(Error::Io)
}

/// A connected sandbox (blocking). See [`crate::Sandbox`].
#[derive(Debug, Clone)]
pub struct Sandbox {
    inner: crate::Sandbox,
    rt: Arc<tokio::runtime::Runtime>,
}

impl Sandbox {
    /// Creates a sandbox (see [`crate::Sandbox::create`]; with
    /// [`CreateOptions::wait_ready`]`(false)` it returns while `starting`: call
    /// [`Sandbox::wait_ready`]).
    ///
    /// ```no_run
    /// # fn demo(config: &nullspace::ConnectionConfig) -> nullspace::Result<()> {
    /// use nullspace::{blocking::Sandbox, CreateOptions};
    /// let mut sbx = Sandbox::create(config, &CreateOptions::new("base").allow_internet_access(false).wait_ready(false))?;
    /// sbx.wait_ready(std::time::Duration::from_secs(60))?;
    /// assert_eq!(sbx.run("echo hi")?.stdout, "hi\n");
    /// # Ok(()) }
    /// ```
    pub fn create(config: &ConnectionConfig, options: &CreateOptions) -> Result<Sandbox> {
        let rt = runtime()?;
        let inner = rt.block_on(crate::Sandbox::create(config, options))?;
        Ok(Self { inner, rt })
    }

    /// Connects to an existing sandbox (resuming it if paused).
    pub fn connect(
        config: &ConnectionConfig,
        sandbox_id: &str,
        timeout: Option<u64>,
    ) -> Result<Sandbox> {
        let rt = runtime()?;
        let inner = rt.block_on(crate::Sandbox::connect(config, sandbox_id, timeout))?;
        Ok(Self { inner, rt })
    }

    /// One page of the team's sandboxes.
    pub fn list(config: &ConnectionConfig, query: &ListQuery) -> Result<SandboxPage> {
        runtime()?.block_on(crate::Sandbox::list(config, query))
    }

    /// A sandbox's description without connecting.
    pub fn get_info_by_id(config: &ConnectionConfig, sandbox_id: &str) -> Result<SandboxInfo> {
        runtime()?.block_on(crate::Sandbox::get_info_by_id(config, sandbox_id))
    }

    /// One page of the team's sandboxes as compact raw maps with exactly `fields`. See
    /// [`crate::Sandbox::list_fields`].
    pub fn list_fields(
        config: &ConnectionConfig,
        query: &ListQuery,
        fields: &[&str],
    ) -> Result<FieldsPage> {
        runtime()?.block_on(crate::Sandbox::list_fields(config, query, fields))
    }

    /// A sandbox's description as a compact raw map with exactly `fields`. See
    /// [`crate::Sandbox::get_info_by_id_fields`].
    pub fn get_info_by_id_fields(
        config: &ConnectionConfig,
        sandbox_id: &str,
        fields: &[&str],
    ) -> Result<Map<String, Value>> {
        runtime()?.block_on(crate::Sandbox::get_info_by_id_fields(
            config, sandbox_id, fields,
        ))
    }

    /// A handle on a sandbox by ID, without a call. See [`crate::Sandbox::from_id`].
    pub fn from_id(config: &ConnectionConfig, sandbox_id: &str) -> Result<Sandbox> {
        Ok(Self {
            inner: crate::Sandbox::from_id(config, sandbox_id)?,
            rt: runtime()?,
        })
    }

    /// Starts a new sandbox from a snapshot of `sandbox_id`.
    pub fn restore(
        config: &ConnectionConfig,
        sandbox_id: &str,
        options: &RestoreOptions,
    ) -> Result<Sandbox> {
        let rt = runtime()?;
        let inner = rt.block_on(crate::Sandbox::restore(config, sandbox_id, options))?;
        Ok(Self { inner, rt })
    }

    /// Its ID.
    pub fn id(&self) -> &str {
        self.inner.id()
    }

    /// Hibernates it.
    pub fn hibernate(&self) -> Result<()> {
        self.rt.block_on(self.inner.hibernate())
    }

    /// Takes a manual snapshot.
    pub fn create_snapshot(&self) -> Result<SnapshotInfo> {
        self.rt.block_on(self.inner.create_snapshot())
    }

    /// Seed 001's `snapshot()`: a manual snapshot as a [`Snapshot`] that can restore and
    /// delete itself.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let inner = self.rt.block_on(self.inner.snapshot())?;
        Ok(Snapshot {
            inner,
            rt: self.rt.clone(),
        })
    }

    /// A manual snapshot named `name` (see [`crate::Sandbox::snapshot_named`]).
    pub fn snapshot_named(&self, name: &str) -> Result<Snapshot> {
        let inner = self.rt.block_on(self.inner.snapshot_named(name))?;
        Ok(Snapshot {
            inner,
            rt: self.rt.clone(),
        })
    }

    /// A presigned URL for `path` (see [`crate::Files::presign`]).
    pub fn presign(&self, path: &str, method: &str, expires_s: u64) -> Result<crate::Presigned> {
        self.rt
            .block_on(self.inner.files().presign(path, method, expires_s))
    }

    /// A page of its logs (see [`crate::Sandbox::logs_page`]).
    pub fn logs_page(
        &self,
        offset: usize,
        limit: Option<usize>,
    ) -> Result<(Vec<crate::LogLine>, Option<usize>)> {
        self.rt.block_on(self.inner.logs_page(offset, limit))
    }

    /// Replaces its security policy. See [`crate::Sandbox::set_security_policy`].
    pub fn set_security_policy(&self, policy: &crate::SecurityPolicy) -> Result<SandboxInfo> {
        self.rt.block_on(self.inner.set_security_policy(policy))
    }

    /// One page of its audit. See [`crate::Sandbox::audit_page`].
    ///
    /// ```no_run
    /// # fn demo(sbx: &nullspace::blocking::Sandbox) -> nullspace::Result<()> {
    /// let page = sbx.audit_page(0, Some(100))?;
    /// for r in &page.records {
    ///     println!("{} {} {}{} {}", r.time, r.method, r.host, r.path, r.action);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn audit_page(&self, after: u64, limit: Option<u32>) -> Result<crate::AuditPage> {
        self.rt.block_on(self.inner.audit_page(after, limit))
    }

    /// Every audit record after `after`. See [`crate::Sandbox::audit_all`].
    pub fn audit_all(&self, after: u64) -> Result<Vec<crate::AuditRecord>> {
        self.rt.block_on(self.inner.audit_all(after))
    }

    /// Waits until it is `running`. See [`crate::Sandbox::wait_ready`].
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.rt.block_on(self.inner.wait_ready(timeout))
    }

    /// The host name `port` is served under. See [`crate::Sandbox::get_host`].
    pub fn get_host(&self, port: u16) -> Result<String> {
        self.rt.block_on(self.inner.get_host(port))
    }

    /// Resource samples from `start` to `end` (Unix seconds or [`SystemTime`]; default
    /// its whole life). See [`crate::Sandbox::get_metrics`].
    ///
    /// ```no_run
    /// # fn demo(sbx: &nullspace::blocking::Sandbox) -> nullspace::Result<()> {
    /// use std::time::{Duration, SystemTime};
    /// let recent = sbx.get_metrics(Some((SystemTime::now() - Duration::from_secs(60)).into()), None)?;
    /// # Ok(()) }
    /// ```
    pub fn get_metrics(
        &self,
        start: Option<MetricsTime>,
        end: Option<MetricsTime>,
    ) -> Result<Vec<Metric>> {
        self.rt.block_on(self.inner.get_metrics(start, end))
    }

    /// Its snapshots, newest first.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.rt.block_on(self.inner.list_snapshots())
    }

    /// Branches it into `count` children.
    pub fn fork(&self, count: u32) -> Result<Vec<Sandbox>> {
        self.fork_with(count, crate::InheritVolumes::Readonly)
    }

    /// Forks, saying what the children do with its read-write volumes. See
    /// [`crate::Sandbox::fork_with`].
    pub fn fork_with(&self, count: u32, volumes: crate::InheritVolumes) -> Result<Vec<Sandbox>> {
        let children = self.rt.block_on(self.inner.fork_with(count, volumes))?;
        Ok(children
            .into_iter()
            .map(|inner| Self {
                inner,
                rt: self.rt.clone(),
            })
            .collect())
    }

    /// The async handle.
    pub fn as_async(&self) -> &crate::Sandbox {
        &self.inner
    }

    /// Its current description.
    pub fn get_info(&self) -> Result<SandboxInfo> {
        self.rt.block_on(self.inner.get_info())
    }

    /// Whether it runs.
    pub fn is_running(&self) -> Result<bool> {
        self.rt.block_on(self.inner.is_running())
    }

    /// Ends it; `false` if it was already gone.
    pub fn kill(&self) -> Result<bool> {
        self.rt.block_on(self.inner.kill())
    }

    /// Sets its timeout, seconds from now.
    pub fn set_timeout(&self, seconds: u64) -> Result<()> {
        self.rt.block_on(self.inner.set_timeout(seconds))
    }

    /// Extends its life by `duration` seconds from now (default: its timeout).
    pub fn refresh(&self, duration: Option<u64>) -> Result<()> {
        self.rt.block_on(self.inner.refresh(duration))
    }

    /// Whether a path exists.
    pub fn exists(&self, path: &str) -> Result<bool> {
        self.rt.block_on(self.inner.files().exists(path))
    }

    /// Pauses it.
    pub fn pause(&self) -> Result<()> {
        self.rt.block_on(self.inner.pause())
    }

    /// Resumes it.
    pub fn resume(&mut self) -> Result<()> {
        self.rt.block_on(self.inner.resume())
    }

    /// Runs a command and waits for it.
    pub fn run(&self, cmd: &str) -> Result<CommandResult> {
        self.rt.block_on(self.inner.commands().run(cmd))
    }

    /// Runs a command with options and waits for it.
    pub fn run_with(&self, cmd: &str, options: RunOptions) -> Result<CommandResult> {
        self.rt
            .block_on(self.inner.commands().run_with(cmd, options))
    }

    /// Starts a command in the background; returns its pid.
    pub fn spawn(&self, cmd: &str, options: RunOptions) -> Result<u32> {
        Ok(self
            .rt
            .block_on(self.inner.commands().spawn(cmd, options))?
            .pid)
    }

    /// Waits for a background command.
    pub fn wait(&self, pid: u32) -> Result<CommandResult> {
        self.rt.block_on(self.inner.commands().connect(pid).wait())
    }

    /// Processes the sandbox started.
    pub fn processes(&self) -> Result<Vec<ProcessInfo>> {
        self.rt.block_on(self.inner.commands().list())
    }

    /// Kills a process group; `false` if there was none.
    pub fn kill_process(&self, pid: u32) -> Result<bool> {
        self.rt.block_on(self.inner.commands().kill(pid))
    }

    /// Reads a file.
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.rt.block_on(self.inner.files().read(path))
    }

    /// Writes a file.
    pub fn write(&self, path: &str, data: impl Into<Vec<u8>>) -> Result<()> {
        self.rt.block_on(self.inner.files().write(path, data))
    }

    /// Uploads a local file.
    pub fn upload(&self, local: &std::path::Path, path: &str) -> Result<u64> {
        self.rt.block_on(self.inner.files().upload(local, path))
    }

    /// Downloads to a local file.
    pub fn download(&self, path: &str, local: &std::path::Path) -> Result<u64> {
        self.rt.block_on(self.inner.files().download(path, local))
    }

    /// Lists a directory.
    pub fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        self.rt.block_on(self.inner.files().list(path))
    }

    /// Describes a path.
    pub fn stat(&self, path: &str) -> Result<FileInfo> {
        self.rt.block_on(self.inner.files().stat(path))
    }

    /// Creates a directory.
    pub fn mkdir(&self, path: &str) -> Result<()> {
        self.rt.block_on(self.inner.files().mkdir(path))
    }

    /// Removes a path.
    pub fn remove(&self, path: &str) -> Result<()> {
        self.rt.block_on(self.inner.files().remove(path))
    }

    /// Renames a path.
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.rt.block_on(self.inner.files().rename(from, to))
    }
}

/// A stored snapshot (blocking). See [`crate::Snapshot`].
#[derive(Debug, Clone)]
pub struct Snapshot {
    inner: crate::Snapshot,
    rt: Arc<tokio::runtime::Runtime>,
}

impl Snapshot {
    /// Its ID.
    pub fn id(&self) -> &str {
        self.inner.id()
    }

    /// `pause`, `periodic` or `manual`.
    pub fn kind(&self) -> &str {
        &self.inner.kind
    }

    /// When it was taken.
    pub fn created(&self) -> SystemTime {
        self.inner.created
    }

    /// Bytes a restore materializes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The sandbox it was taken of.
    pub fn sandbox_id(&self) -> &str {
        &self.inner.sandbox_id
    }

    /// The API's full description.
    pub fn info(&self) -> &SnapshotInfo {
        &self.inner.info
    }

    /// Starts a new sandbox from it. See [`crate::Snapshot::restore`].
    pub fn restore(&self, options: &RestoreOptions) -> Result<Sandbox> {
        let inner = self.rt.block_on(self.inner.restore(options))?;
        Ok(Sandbox {
            inner,
            rt: self.rt.clone(),
        })
    }

    /// Deletes it from the store.
    pub fn delete(&self) -> Result<()> {
        self.rt.block_on(self.inner.delete())
    }

    /// The async snapshot.
    pub fn as_async(&self) -> &crate::Snapshot {
        &self.inner
    }
}

/// Calls on templates (blocking). See [`crate::Templates`].
pub struct Templates;

impl Templates {
    /// Starts a build; answers at once.
    pub fn build(config: &ConnectionConfig, request: &TemplateBuild) -> Result<Template> {
        runtime()?.block_on(crate::Templates::build(config, request))
    }

    /// Builds a template, streaming its log to `on_line`; returns it once ready.
    pub fn build_and_wait(
        config: &ConnectionConfig,
        request: &TemplateBuild,
        on_line: impl FnMut(&BuildLogLine),
    ) -> Result<Template> {
        runtime()?.block_on(crate::Templates::build_and_wait(config, request, on_line))
    }

    /// A page of a build's log.
    pub fn logs(
        config: &ConnectionConfig,
        template_id: &str,
        after: u64,
        wait_s: u64,
    ) -> Result<BuildLogPage> {
        runtime()?.block_on(crate::Templates::logs(config, template_id, after, wait_s))
    }

    /// A template.
    pub fn get(config: &ConnectionConfig, template_id: &str) -> Result<Template> {
        runtime()?.block_on(crate::Templates::get(config, template_id))
    }

    /// The built-in templates and the team's own.
    pub fn list(config: &ConnectionConfig) -> Result<Vec<Template>> {
        runtime()?.block_on(crate::Templates::list(config))
    }

    /// Deletes a template.
    pub fn delete(config: &ConnectionConfig, template_id: &str) -> Result<()> {
        runtime()?.block_on(crate::Templates::delete(config, template_id))
    }

    /// A template's warm pool.
    pub fn warm_pool(config: &ConnectionConfig, template: &str) -> Result<WarmPool> {
        runtime()?.block_on(crate::Templates::warm_pool(config, template))
    }

    /// Sets a template's warm pool.
    pub fn set_warm_pool(
        config: &ConnectionConfig,
        template: &str,
        settings: &WarmPoolSettings,
    ) -> Result<WarmPool> {
        runtime()?.block_on(crate::Templates::set_warm_pool(config, template, settings))
    }
}
