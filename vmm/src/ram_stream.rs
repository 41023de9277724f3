//! Guest RAM out of a QEMU migration stream, into a positional memory image.
//!
//! A VM restored copy-on-write from a snapshot's memory file maps it private
//! (`share=off`), so `x-ignore-shared` cannot leave its RAM out of the stream: QEMU sends
//! every page inside the migration stream, in an order that shifts from one snapshot to
//! the next. Stored as is, one shifted page makes every later chunk new, and a fork
//! family shares almost nothing. [`split`] reads such a stream (taken with
//! `x-ignore-shared` on, so its RAM setup records each block's address) and writes:
//!
//! - the pages of one RAM block (the guest's memory backend) at their offsets into a
//!   sparse memory image, zero pages left as holes;
//! - everything else, byte for byte, into a new stream without those page records.
//!
//! The new stream is exactly what QEMU writes for a VM whose memory backend is shared:
//! it restores with the memory image mapped and `x-ignore-shared` on, like any memory
//! file snapshot. The format is QEMU's (`migration/savevm.c`, `migration/ram.c`); what
//! this does not know (compressed or XBZRLE pages, another iterable section) is an error,
//! and the caller keeps the stream whole.

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::FileExt;

/// `QEVM`: the stream's magic.
const MAGIC: u32 = 0x5145_564d;
/// The stream version QEMU has written since 2.x.
const VERSION: u32 = 3;

const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
/// A command to the destination (`MIG_CMD_*`: `cmd: u16`, `len: u16`, `len` bytes).
/// QEMU 10 sends `switchover-start` between the RAM section's iterations and its end.
const COMMAND: u8 = 0x08;
const SECTION_FOOTER: u8 = 0x7e;

/// Page record flags (the low bits of a page's offset).
const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAG_MASK: u64 = 0xfff;
/// Flags this reader knows; any other (XBZRLE, compressed pages, RDMA hooks) stops it.
const KNOWN_FLAGS: u64 = FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE;

/// Guest pages are 4 KiB on x86.
pub const PAGE_SIZE: u64 = 4096;

/// The RAM section's header after its type and ID: `ram`, instance 0, version 4.
const RAM_SECTION: &[u8] = b"\x03ram\x00\x00\x00\x00\x00\x00\x00\x04";
/// Where the RAM section must begin: after the header and the configuration section.
const HEAD_LIMIT: usize = 64 << 10;

/// Why a stream could not be split.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error("reading or writing: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a migration stream this build reads: {0}")]
    Format(String),
}

fn format(what: impl Into<String>) -> SplitError {
    SplitError::Format(what.into())
}

/// What a split moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplitStats {
    /// Pages written into the memory image.
    pub pages: u64,
    /// Zero pages left as holes.
    pub zero_pages: u64,
    /// The block's size: the memory image's length.
    pub block_bytes: u64,
    /// Bytes of the new stream.
    pub state_bytes: u64,
}

/// Counts what it writes.
struct Counted<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Counted<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.n += bytes.len() as u64;
        self.inner.write_all(bytes)
    }
}

fn read_array<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn be64(r: &mut impl Read) -> std::io::Result<u64> {
    Ok(u64::from_be_bytes(read_array(r)?))
}

fn be32(r: &mut impl Read) -> std::io::Result<u32> {
    Ok(u32::from_be_bytes(read_array(r)?))
}

/// A length-prefixed ID string (`len: u8`, bytes).
fn idstr(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let [len] = read_array::<1>(r)?;
    let mut s = vec![0u8; len as usize];
    r.read_exact(&mut s)?;
    Ok(s)
}

/// Splits `stream`: pages of the RAM block `block`, which must be `block_bytes` long,
/// go into `memory` (truncated to that size first: a sparse file), the rest into
/// `state`. See the module docs.
pub fn split(
    stream: impl Read,
    block: &str,
    block_bytes: u64,
    state: impl Write,
    memory: &std::fs::File,
) -> Result<SplitStats, SplitError> {
    let mut r = std::io::BufReader::with_capacity(1 << 20, stream);
    let mut out = Counted {
        inner: std::io::BufWriter::with_capacity(1 << 20, state),
        n: 0,
    };
    let mut stats = SplitStats::default();

    // The header and the configuration section (whose layout depends on QEMU's
    // version and capabilities) go through untouched, up to the RAM section's start.
    let head = read_until_ram_section(&mut r)?;
    out.put(&head)?;
    let section_id = u32::from_be_bytes(
        head[head.len() - 4 - RAM_SECTION.len()..][..4]
            .try_into()
            .unwrap(),
    );

    let mut ram = RamReader {
        block: block.as_bytes().to_vec(),
        expected_bytes: block_bytes,
        last_block: None,
        block_bytes: None,
        written: Vec::new(),
        memory,
        page: vec![0u8; PAGE_SIZE as usize],
    };
    ram.section(&mut r, &mut out, &mut stats, section_id)?;
    // Iterations (PART) and the completion (END) of the RAM section, then the devices'
    // full sections, which go through untouched.
    loop {
        let [kind] = read_array::<1>(&mut r)?;
        match kind {
            SECTION_PART | SECTION_END => {
                let id = be32(&mut r)?;
                if id != section_id {
                    return Err(format(format!(
                        "an iterable section ({id}) besides RAM ({section_id})"
                    )));
                }
                out.put(&[kind])?;
                out.put(&id.to_be_bytes())?;
                ram.section(&mut r, &mut out, &mut stats, section_id)?;
                if kind == SECTION_END {
                    break;
                }
            }
            // Commands carry no RAM: they go through as they are, in place.
            COMMAND => {
                let cmd: [u8; 2] = read_array(&mut r)?;
                let len: [u8; 2] = read_array(&mut r)?;
                let mut data = vec![0u8; u16::from_be_bytes(len) as usize];
                r.read_exact(&mut data)?;
                out.put(&[kind])?;
                out.put(&cmd)?;
                out.put(&len)?;
                out.put(&data)?;
            }
            other => {
                return Err(format(format!(
                    "section type {other:#x} before the RAM section ended"
                )))
            }
        }
    }
    let rest = std::io::copy(&mut r, &mut out.inner)?;
    out.n += rest;
    out.inner.flush()?;
    stats.block_bytes = ram
        .block_bytes
        .ok_or_else(|| format(format!("no RAM block {block}")))?;
    stats.state_bytes = out.n;
    Ok(stats)
}

/// Reads the stream's head through the RAM section's header (type, ID, name,
/// instance, version), checking the magic and version.
fn read_until_ram_section(r: &mut impl BufRead) -> Result<Vec<u8>, SplitError> {
    let mut head = Vec::new();
    let magic = be32(r)?;
    let version = be32(r)?;
    if magic != MAGIC || version != VERSION {
        return Err(format(format!(
            "magic {magic:#x} version {version} (QEMU's is {MAGIC:#x} version {VERSION})"
        )));
    }
    head.extend_from_slice(&magic.to_be_bytes());
    head.extend_from_slice(&version.to_be_bytes());
    let header_len = 1 + 4 + RAM_SECTION.len();
    loop {
        let [b] = read_array::<1>(r)?;
        head.push(b);
        let n = head.len();
        if n >= 8 + header_len
            && head[n - RAM_SECTION.len()..] == *RAM_SECTION
            && head[n - header_len] == SECTION_START
        {
            return Ok(head);
        }
        if n > HEAD_LIMIT {
            return Err(format(format!(
                "no RAM section within the first {HEAD_LIMIT} bytes"
            )));
        }
    }
}

struct RamReader<'a> {
    block: Vec<u8>,
    /// The size the block must have (the guest's RAM).
    expected_bytes: u64,
    /// The block the previous record named (what `CONTINUE` refers to).
    last_block: Option<Vec<u8>>,
    block_bytes: Option<u64>,
    /// One bit per page of the block: written with data. A zero record for such a page
    /// (sent again after it was cleared) must clear it in the image too.
    written: Vec<u64>,
    memory: &'a std::fs::File,
    page: Vec<u8>,
}

impl RamReader<'_> {
    fn mark(&mut self, offset: u64) {
        let n = (offset / PAGE_SIZE) as usize;
        self.written[n / 64] |= 1 << (n % 64);
    }

    fn was_written(&self, offset: u64) -> bool {
        let n = (offset / PAGE_SIZE) as usize;
        self.written[n / 64] & (1 << (n % 64)) != 0
    }
}

impl RamReader<'_> {
    /// One RAM section's records, through its end-of-section record and footer.
    fn section<W: Write>(
        &mut self,
        r: &mut impl Read,
        out: &mut Counted<W>,
        stats: &mut SplitStats,
        section_id: u32,
    ) -> Result<(), SplitError> {
        loop {
            let header = be64(r)?;
            let flags = header & FLAG_MASK;
            let offset = header & !FLAG_MASK;
            if flags & !KNOWN_FLAGS != 0 {
                return Err(format(format!(
                    "RAM record flags {flags:#x} (compressed, XBZRLE or RDMA pages)"
                )));
            }
            if flags & FLAG_MEM_SIZE != 0 {
                out.put(&header.to_be_bytes())?;
                self.blocks(r, out, offset)?;
                continue;
            }
            if flags & FLAG_EOS != 0 {
                out.put(&header.to_be_bytes())?;
                break;
            }
            let named = if flags & FLAG_CONTINUE == 0 {
                let id = idstr(r)?;
                self.last_block = Some(id.clone());
                Some(id)
            } else {
                None
            };
            let Some(current) = &self.last_block else {
                return Err(format("a page continues no block"));
            };
            let ours = *current == self.block;
            if ours {
                let size = self.block_bytes.unwrap_or(0);
                if offset.checked_add(PAGE_SIZE).is_none_or(|end| end > size) {
                    return Err(format(format!(
                        "a page at {offset:#x} past the block's {size} bytes"
                    )));
                }
            } else {
                out.put(&header.to_be_bytes())?;
                if let Some(id) = &named {
                    out.put(&[id.len() as u8])?;
                    out.put(id)?;
                }
            }
            if flags & FLAG_ZERO != 0 {
                let [fill] = read_array::<1>(r)?;
                if !ours {
                    out.put(&[fill])?;
                } else if fill == 0 && !self.was_written(offset) {
                    stats.zero_pages += 1;
                } else {
                    self.page.fill(fill);
                    self.memory.write_all_at(&self.page, offset)?;
                    self.mark(offset);
                    stats.pages += 1;
                }
            } else if flags & FLAG_PAGE != 0 {
                r.read_exact(&mut self.page)?;
                if ours {
                    self.memory.write_all_at(&self.page, offset)?;
                    self.mark(offset);
                    stats.pages += 1;
                } else {
                    out.put(&self.page)?;
                }
            } else {
                return Err(format(format!("a RAM record with flags {flags:#x}")));
            }
        }
        // The section's footer.
        let [kind] = read_array::<1>(r)?;
        let id = be32(r)?;
        if kind != SECTION_FOOTER || id != section_id {
            return Err(format(format!(
                "RAM section footer {kind:#x} {id} (want {SECTION_FOOTER:#x} {section_id})"
            )));
        }
        out.put(&[kind])?;
        out.put(&id.to_be_bytes())?;
        Ok(())
    }

    /// The block list of the setup record: for each, name, used length and (with
    /// `x-ignore-shared`) guest address, until the lengths add up to `total`.
    fn blocks<W: Write>(
        &mut self,
        r: &mut impl Read,
        out: &mut Counted<W>,
        total: u64,
    ) -> Result<(), SplitError> {
        let mut seen = 0u64;
        while seen < total {
            let id = idstr(r)?;
            let used = be64(r)?;
            let addr = be64(r)?;
            out.put(&[id.len() as u8])?;
            out.put(&id)?;
            out.put(&used.to_be_bytes())?;
            out.put(&addr.to_be_bytes())?;
            if id == self.block {
                if self.block_bytes.is_some() {
                    return Err(format("the RAM block is listed twice"));
                }
                if used != self.expected_bytes || used % PAGE_SIZE != 0 {
                    return Err(format(format!(
                        "the RAM block has {used} bytes, the guest {}",
                        self.expected_bytes
                    )));
                }
                self.memory.set_len(used)?;
                self.block_bytes = Some(used);
                self.written = vec![0; (used / PAGE_SIZE).div_ceil(64) as usize];
            }
            seen = seen
                .checked_add(used)
                .ok_or_else(|| format("RAM block sizes overflow"))?;
        }
        if seen != total {
            return Err(format(format!(
                "RAM blocks add up to {seen} bytes, the stream said {total}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream as QEMU 7.2 writes it for a stopped VM with `x-ignore-shared` on: a
    /// configuration section, RAM setup, one iteration, completion, a device section.
    fn stream(pages: &[(&str, u64, Option<u8>)]) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&MAGIC.to_be_bytes());
        s.extend_from_slice(&VERSION.to_be_bytes());
        s.push(0x07); // configuration
        s.extend_from_slice(&7u32.to_be_bytes());
        s.extend_from_slice(b"microvm");
        s.push(SECTION_START);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.extend_from_slice(RAM_SECTION);
        let blocks: [(&str, u64); 2] = [("mem0", 64 * PAGE_SIZE), ("/rom@etc/acpi", 2 * PAGE_SIZE)];
        let total: u64 = blocks.iter().map(|b| b.1).sum();
        s.extend_from_slice(&(total | FLAG_MEM_SIZE).to_be_bytes());
        for (name, len) in blocks {
            s.push(name.len() as u8);
            s.extend_from_slice(name.as_bytes());
            s.extend_from_slice(&len.to_be_bytes());
            s.extend_from_slice(&0u64.to_be_bytes());
        }
        s.extend_from_slice(&FLAG_EOS.to_be_bytes());
        s.push(SECTION_FOOTER);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.push(SECTION_PART);
        s.extend_from_slice(&2u32.to_be_bytes());
        let mut last = "";
        for &(name, offset, fill) in pages {
            let mut header = offset;
            header |= if fill.is_some() { FLAG_ZERO } else { FLAG_PAGE };
            if name == last {
                header |= FLAG_CONTINUE;
            }
            s.extend_from_slice(&header.to_be_bytes());
            if name != last {
                s.push(name.len() as u8);
                s.extend_from_slice(name.as_bytes());
            }
            last = name;
            match fill {
                Some(f) => s.push(f),
                None => {
                    s.extend((0..PAGE_SIZE).map(|i| (i as u8) ^ (offset / PAGE_SIZE) as u8 ^ 0x5a))
                }
            }
        }
        s.extend_from_slice(&FLAG_EOS.to_be_bytes());
        s.push(SECTION_FOOTER);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.push(SECTION_END);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.extend_from_slice(&FLAG_EOS.to_be_bytes());
        s.push(SECTION_FOOTER);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.push(0x04); // a device's full section, opaque
        s.extend_from_slice(b"\x00\x00\x00\x03device state\x00");
        s
    }

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "nullspace-ram-stream-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// A new memory image at `path`, for `split` to write.
    fn memory_file(path: &std::path::Path) -> std::fs::File {
        std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn pages_of_the_block_land_at_their_offsets_and_the_rest_passes_through() {
        let pages = [
            ("mem0", 5 * PAGE_SIZE, None),
            ("mem0", 0, Some(0)),
            ("mem0", 63 * PAGE_SIZE, Some(7)),
            ("/rom@etc/acpi", PAGE_SIZE, None),
            ("mem0", 9 * PAGE_SIZE, None),
        ];
        let with = stream(&pages);
        let path = temp("split");
        let memory = memory_file(&path);
        let mut state = Vec::new();
        let stats = split(&with[..], "mem0", 64 * PAGE_SIZE, &mut state, &memory).unwrap();
        assert_eq!(
            (stats.pages, stats.zero_pages, stats.block_bytes),
            (3, 1, 64 * PAGE_SIZE)
        );
        // The memory image: the pages at their offsets, zeros elsewhere.
        let image = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(image.len() as u64, 64 * PAGE_SIZE);
        let at = |n: u64| &image[(n * PAGE_SIZE) as usize..][..PAGE_SIZE as usize];
        assert_eq!(at(5)[1], 1 ^ 5 ^ 0x5a);
        assert_eq!(at(9)[3], 3 ^ 9 ^ 0x5a);
        assert!(at(63).iter().all(|b| *b == 7));
        assert!(at(0).iter().all(|b| *b == 0) && at(10).iter().all(|b| *b == 0));
        // The state: the same stream without the block's pages (the ROM page stays,
        // naming its block, since the record before it was dropped).
        let without = stream(&[("/rom@etc/acpi", PAGE_SIZE, None)]);
        assert_eq!(state, without);
        assert_eq!(stats.state_bytes, without.len() as u64);
    }

    /// `s` with QEMU 10's `switchover-start` command (9, no data) before the RAM
    /// section's end.
    fn with_switchover_start(mut s: Vec<u8>) -> Vec<u8> {
        let end = s
            .windows(5)
            .rposition(|w| w == [SECTION_END, 0, 0, 0, 2])
            .unwrap();
        s.splice(end..end, [COMMAND, 0, 9, 0, 0]);
        s
    }

    #[test]
    fn commands_between_iterations_pass_through_in_place() {
        let path = temp("command");
        let memory = memory_file(&path);
        let with = with_switchover_start(stream(&[("mem0", 2 * PAGE_SIZE, None)]));
        let mut state = Vec::new();
        let stats = split(&with[..], "mem0", 64 * PAGE_SIZE, &mut state, &memory).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(stats.pages, 1);
        assert_eq!(state, with_switchover_start(stream(&[])));
    }

    #[test]
    fn a_page_sent_again_as_zeros_is_cleared() {
        let path = temp("again");
        let memory = memory_file(&path);
        let twice = stream(&[
            ("mem0", 3 * PAGE_SIZE, None),
            ("mem0", 3 * PAGE_SIZE, Some(0)),
        ]);
        split(&twice[..], "mem0", 64 * PAGE_SIZE, std::io::sink(), &memory).unwrap();
        let image = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(image.iter().all(|b| *b == 0));
    }

    #[test]
    fn streams_it_does_not_know_are_refused() {
        let path = temp("refused");
        let memory = std::fs::File::create(&path).unwrap();
        let mut good = stream(&[("mem0", 0, None)]);
        let refused = |bytes: &[u8]| {
            split(bytes, "mem0", 64 * PAGE_SIZE, std::io::sink(), &memory).unwrap_err()
        };
        assert!(matches!(refused(b"not a stream"), SplitError::Format(_)));
        // An XBZRLE page.
        let mut xbzrle = good.clone();
        let at = xbzrle
            .windows(8)
            .position(|w| w == (FLAG_PAGE).to_be_bytes())
            .unwrap();
        xbzrle[at + 7] = 0x40;
        assert!(matches!(refused(&xbzrle), SplitError::Format(_)));
        // Cut short.
        good.truncate(good.len() - 40);
        assert!(matches!(refused(&good), SplitError::Io(_)));
        // A page past the block.
        let past = stream(&[("mem0", 64 * PAGE_SIZE, None)]);
        assert!(matches!(refused(&past), SplitError::Format(_)));
        // A block of another size than the guest's RAM.
        let other = stream(&[("mem0", 0, None)]);
        assert!(matches!(
            split(&other[..], "mem0", 32 * PAGE_SIZE, std::io::sink(), &memory).unwrap_err(),
            SplitError::Format(_)
        ));
        std::fs::remove_file(&path).unwrap();
    }
}
