//! Just enough DNS to enforce a policy on lookups: the question's name, a REFUSED
//! answer, and the IPv4/IPv6 addresses in a response.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The first question's name of a query, lower case without the trailing dot.
pub fn question_name(msg: &[u8]) -> Option<String> {
    if msg.len() < 12 || u16::from_be_bytes([msg[4], msg[5]]) == 0 {
        return None;
    }
    let (name, _) = read_name(msg, 12)?;
    Some(name)
}

/// A response refusing `query` (RCODE 5), echoing its question.
pub fn refused(query: &[u8]) -> Option<Vec<u8>> {
    let end = question_end(query)?;
    let mut out = query[..end].to_vec();
    out[2] = 0x80 | (query[2] & 0x79); // QR, opcode and RD kept
    out[3] = 0x80 | 5; // RA, REFUSED
    out[4..6].copy_from_slice(&1u16.to_be_bytes());
    out[6..12].fill(0);
    Some(out)
}

/// The A and AAAA addresses in a response's answers.
pub fn answer_addresses(msg: &[u8]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let Some(mut pos) = question_end(msg) else {
        return out;
    };
    let answers = u16::from_be_bytes([msg[6], msg[7]]);
    for _ in 0..answers {
        let Some((_, after)) = read_name(msg, pos) else {
            break;
        };
        let Some(fixed) = msg.get(after..after + 10) else {
            break;
        };
        let kind = u16::from_be_bytes([fixed[0], fixed[1]]);
        let len = u16::from_be_bytes([fixed[8], fixed[9]]) as usize;
        let Some(data) = msg.get(after + 10..after + 10 + len) else {
            break;
        };
        match (kind, len) {
            (1, 4) => out.push(IpAddr::V4(Ipv4Addr::new(
                data[0], data[1], data[2], data[3],
            ))),
            (28, 16) => {
                let b: [u8; 16] = data.try_into().expect("16 bytes");
                out.push(IpAddr::V6(Ipv6Addr::from(b)));
            }
            _ => {}
        }
        pos = after + 10 + len;
    }
    out
}

/// Offset just past the first question (the header says there is exactly one).
fn question_end(msg: &[u8]) -> Option<usize> {
    if msg.len() < 12 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let (_, after) = read_name(msg, 12)?;
    (after + 4 <= msg.len()).then_some(after + 4)
}

/// A (possibly compressed) name at `pos`, and the offset after it in the message.
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut labels: Vec<String> = Vec::new();
    let mut after = None;
    for _ in 0..128 {
        let len = *msg.get(pos)? as usize;
        match len {
            0 => {
                let name = labels.join(".").to_ascii_lowercase();
                return Some((name, after.unwrap_or(pos + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                let ptr = ((l & 0x3f) << 8) | *msg.get(pos + 1)? as usize;
                after.get_or_insert(pos + 2);
                pos = ptr;
            }
            l if l < 64 => {
                let label = msg.get(pos + 1..pos + 1 + l)?;
                labels.push(String::from_utf8_lossy(label).into_owned());
                pos += 1 + l;
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend(label.as_bytes());
        }
        q.extend([0, 0, 1, 0, 1]);
        q
    }

    #[test]
    fn reads_questions_refuses_and_finds_answers() {
        let q = query("Allowed.Test");
        assert_eq!(question_name(&q).as_deref(), Some("allowed.test"));
        let r = refused(&q).unwrap();
        assert_eq!((r[0], r[1], r[3] & 0x0f), (0x12, 0x34, 5));
        assert_eq!(question_name(&r).as_deref(), Some("allowed.test"));

        let mut resp = q.clone();
        resp[2] = 0x81;
        resp[3] = 0x80;
        resp[7] = 2; // two answers, both pointing at the question's name
        resp.extend([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
        resp.extend([0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 12]);
        assert_eq!(
            answer_addresses(&resp),
            vec!["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        // Truncated or looping messages give nothing, never a panic.
        for n in 0..resp.len() {
            let _ = answer_addresses(&resp[..n]);
            let _ = question_name(&resp[..n]);
        }
        let looping = [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12];
        assert_eq!(question_name(&looping), None);
    }
}
