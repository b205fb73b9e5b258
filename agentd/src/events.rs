//! Records from the kernel programs. Kernel twin: agentd-ebpf/src/events.rs.

use std::{fmt, mem::size_of, net::Ipv4Addr};

use agentd_common::{
    events::{
        EVENT_FILE, EVENT_NET, EVENTS_LOST_MAP, EVENTS_MAP, EventHeader, FileEvent, HOOK_CONNECT4,
        HOOK_FILE_OPEN, NetEvent, VERDICT_AUDIT, VERDICT_DENY,
    },
    files::{ACCESS_EXEC, ACCESS_READ, ACCESS_WRITE},
    network::{PROTO_TCP, PROTO_UDP},
};
use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};

/// A decoded kernel record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Net(NetEvent),
    File(FileEvent),
}

impl Event {
    pub fn header(&self) -> &EventHeader {
        match self {
            Event::Net(e) => &e.header,
            Event::File(e) => &e.header,
        }
    }
}

/// Reads a `T` from the start of `bytes` if it is long enough.
fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is a repr(C) plain-old-data record; unaligned read.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one ring buffer record; `None` for a record of unknown kind or short length.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    let header: EventHeader = read(bytes)?;
    match header.kind {
        EVENT_NET => read(bytes).map(Event::Net),
        EVENT_FILE => read(bytes).map(Event::File),
        _ => None,
    }
}

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn verdict(v: u32) -> &'static str {
    match v {
        VERDICT_DENY => "denied",
        VERDICT_AUDIT => "would be denied (audit)",
        _ => "decided",
    }
}

fn hook(h: u32) -> &'static str {
    match h {
        HOOK_CONNECT4 => "connect4",
        HOOK_FILE_OPEN => "file_open",
        _ => "unknown hook",
    }
}

pub fn access_names(access: u32) -> String {
    let mut names = Vec::new();
    for (bit, name) in [
        (ACCESS_READ, "read"),
        (ACCESS_WRITE, "write"),
        (ACCESS_EXEC, "exec"),
    ] {
        if access & bit != 0 {
            names.push(name);
        }
    }
    names.join("+")
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = self.header();
        match self {
            Event::Net(e) => {
                let proto = match e.protocol {
                    PROTO_TCP => "tcp",
                    PROTO_UDP => "udp",
                    _ => "?",
                };
                let addr = Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3]);
                write!(
                    f,
                    "connect {addr}:{}/{proto} {}",
                    e.port,
                    verdict(h.verdict)
                )?;
            }
            Event::File(e) => {
                write!(
                    f,
                    "open {} of inode {} on device {}:{} {}",
                    access_names(e.access),
                    e.ino,
                    e.dev >> 20,
                    e.dev & 0xfffff,
                    verdict(h.verdict)
                )?;
            }
        }
        write!(
            f,
            " (agent {}, pid {}, comm {}, hook {})",
            h.agent,
            h.pid,
            comm(&h.comm),
            hook(h.hook)
        )
    }
}

/// Consumes the `EVENTS` ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    /// Takes the ring buffer out of `ebpf` (only one reader can exist).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let map = ebpf
            .take_map(EVENTS_MAP)
            .context("the EVENTS ring buffer was already taken")?;
        Ok(Self {
            ring: RingBuf::try_from(map)?,
        })
    }

    /// Every record available now, decoded; records of unknown kind are skipped.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(e) = decode(&item) {
                out.push(e);
            }
        }
        out
    }
}

impl std::os::fd::AsRawFd for EventReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// Records the programs dropped because the ring buffer was full, summed over CPUs.
pub fn lost(ebpf: &Ebpf) -> Result<u64> {
    let map = ebpf
        .map(EVENTS_LOST_MAP)
        .context("the object has no EVENTS_LOST map")?;
    let counts: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
    Ok(counts.get(&0, 0)?.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a repr(C) value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_and_describes_a_denied_connect() {
        let mut comm = [0u8; 16];
        comm[..3].copy_from_slice(b"act");
        let e = NetEvent {
            header: EventHeader {
                kind: EVENT_NET,
                hook: HOOK_CONNECT4,
                agent: 42,
                pid: 7,
                tid: 7,
                comm,
                verdict: VERDICT_DENY,
                ..Default::default()
            },
            family: 2,
            port: 4444,
            protocol: PROTO_TCP,
            addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..Default::default()
        };
        let decoded = decode(&bytes_of(&e)).unwrap();
        assert_eq!(decoded, Event::Net(e));
        assert_eq!(
            decoded.to_string(),
            "connect 127.0.0.1:4444/tcp denied (agent 42, pid 7, comm act, hook connect4)"
        );
    }

    #[test]
    fn short_or_unknown_records_are_skipped() {
        let e = FileEvent {
            header: EventHeader {
                kind: EVENT_FILE,
                ..Default::default()
            },
            ..Default::default()
        };
        let b = bytes_of(&e);
        assert!(decode(&b[..b.len() - 1]).is_none());
        let unknown = EventHeader {
            kind: 99,
            ..Default::default()
        };
        assert!(decode(&bytes_of(&unknown)).is_none());
        assert!(matches!(decode(&b), Some(Event::File(_))));
    }
}
