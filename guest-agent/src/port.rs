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
            Err(e) => return e,
        }
    }
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
        if let Err(e) = port.write_all(&out) {
            eprintln!("nullspace-agent: port write failed: {e}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
