//! The virtio-serial port: finding it, and the two threads that move its bytes.

use agent_protocol::{Decoded, Frame, FrameDecoder, PORT_NAME};
use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Finds `/dev/vportNpM` whose sysfs name is [`PORT_NAME`], waiting up to `wait` for
/// the driver to publish it.
pub fn find_port(wait: Duration) -> Result<PathBuf, String> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in dir.flatten() {
                let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if name.trim() == PORT_NAME {
                    return Ok(PathBuf::from("/dev").join(entry.file_name()));
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no virtio-serial port named {PORT_NAME} appeared within {wait:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens the port non-blocking. A blocking write to a virtio console port busy-waits in
/// the guest kernel until the host has taken the buffer: one host round trip per 32 KiB,
/// which under TCG capped output at a few MB/s. Non-blocking writes queue buffers and
/// only wait (in `poll`) when the queue is full.
pub fn open(path: &std::path::Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Waits until `port` is readable or writable (`events`), or `timeout_ms` passes.
fn wait(port: &File, events: libc::c_short, timeout_ms: libc::c_int) {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: port.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

/// Reads the port forever, handing each decoded item to `on_item`.
///
/// A read of 0 bytes means the host side is not connected; the port then reads EOF
/// immediately every time, so back off instead of spinning.
pub fn read_loop(mut port: File, mut on_item: impl FnMut(Decoded)) -> std::io::Error {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match port.read(&mut buf) {
            Ok(0) => std::thread::sleep(Duration::from_millis(50)),
            Ok(n) => {
                decoder.feed(&buf[..n]);
                while let Some(item) = decoder.decode_next() {
                    on_item(item);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait(&port, libc::POLLIN, -1),
            Err(e) => return e,
        }
    }
}

/// Writes all of `buf`, waiting for room in the port's queue when it is full.
fn write_all(port: &mut File, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match port.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait(port, libc::POLLOUT, 1000),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes frames from `rx` to the port in order, batching what is queued.
pub fn write_loop(mut port: File, mut rx: mpsc::Receiver<Frame>) {
    let mut out = Vec::with_capacity(256 * 1024);
    while let Some(frame) = rx.blocking_recv() {
        out.clear();
        frame.encode_into(&mut out);
        while out.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(f) => f.encode_into(&mut out),
                Err(_) => break,
            }
        }
        // A write fails only while the host is disconnected; the frames are for streams
        // that host no longer knows about, so dropping them is right.
        if let Err(e) = write_all(&mut port, &out) {
            eprintln!("nullspace-agent: port write failed: {e}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
