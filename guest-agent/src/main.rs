//! The Nullspace guest agent.
//!
//! Runs inside every sandbox VM as PID 1's child (see [`init`]), reads frames from the
//! virtio-serial port named [`agent_protocol::PORT_NAME`] and serves processes and files
//! over many concurrent streams (see [`session`]).

mod entropy;
mod files;
mod init;
mod metrics;
mod port;
mod process;
mod pty;
mod rootfs;
mod session;
mod tunnel;
mod users;
mod watch;

fn main() {
    if std::process::id() == 1 {
        // Returns only in the forked child that goes on to be the agent.
        init::run_as_init();
    }
    let port_path = match port::find_port(std::time::Duration::from_secs(30)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("nullspace-agent: {e}");
            std::process::exit(1);
        }
    };
    // Off the boot path: requests are served while the filesystem grows.
    std::thread::spawn(|| {
        if let Err(e) = rootfs::grow() {
            eprintln!("nullspace-agent: {e}");
        }
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = session::serve(&port_path, runtime.handle().clone()) {
        eprintln!("nullspace-agent: {e}");
        std::process::exit(1);
    }
}
