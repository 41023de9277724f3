//! Fresh randomness from the host. A guest restored from a snapshot resumes with the
//! kernel CRNG state the snapshot froze, so every sandbox restored from one template
//! would read the same bytes from `/dev/urandom` until the kernel reseeded on its own.
//! The host sends random bytes after every handshake; they are mixed into the input
//! pool (credited) and the CRNG is reseeded at once, which also rekeys every CPU's
//! generator.

use agent_protocol::{AgentError, ErrorCode, Reply, MAX_RESEED_BYTES};
use std::os::fd::AsRawFd;

/// `_IOW('R', 0x03, int[2])`: add entropy, credited.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Decodes `hex` and feeds it to the kernel; `Done` with the byte count.
pub fn reseed(hex: &str) -> Result<Reply, AgentError> {
    let bytes = decode_hex(hex)?;
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| AgentError::from_io(&e, "/dev/urandom"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(&bytes);
    // Whole u32 words, as the struct's buffer is declared.
    info.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    // SAFETY: `info` is a complete rand_pool_info whose buf_size bytes follow it.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(io_error("adding entropy"));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(io_error("reseeding the CRNG"));
    }
    Ok(Reply::Done {
        bytes: Some(bytes.len() as u64),
    })
}

fn io_error(what: &str) -> AgentError {
    AgentError::new(
        ErrorCode::Io,
        format!("{what}: {}", std::io::Error::last_os_error()),
    )
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, AgentError> {
    let invalid = |why: &str| {
        AgentError::new(
            ErrorCode::InvalidArgument,
            format!("entropy {why}; send 1 to {MAX_RESEED_BYTES} bytes as hex digits"),
        )
    };
    if hex.is_empty() || !hex.len().is_multiple_of(2) || hex.len() > MAX_RESEED_BYTES * 2 {
        return Err(invalid("has the wrong length"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| invalid("is not hex")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_decoded_and_bad_input_refused() {
        assert_eq!(decode_hex("00ff10").unwrap(), vec![0, 255, 16]);
        for bad in ["", "abc", "zz", &"00".repeat(MAX_RESEED_BYTES + 1)] {
            let e = decode_hex(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{bad:?}");
        }
    }
}
