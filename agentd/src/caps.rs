//! Linux capabilities by name, for the `process.capabilities` key of profiles and the
//! launcher's capability drop.

/// Capability names in number order (capability.h); the index is the number.
pub const NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Highest capability number agentd knows. Capabilities above it that a newer kernel has
/// are always dropped from the bounding set too (the launcher walks up to 63).
pub const LAST: u32 = NAMES.len() as u32 - 1;

/// Parses a capability name (`CAP_NET_RAW` or `net_raw`), or `ALL`.
pub fn parse(name: &str) -> Result<Vec<u32>, String> {
    if name.eq_ignore_ascii_case("all") {
        return Ok((0..=LAST).collect());
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    NAMES
        .iter()
        .position(|n| *n == full)
        .map(|i| vec![i as u32])
        .ok_or_else(|| format!("`{name}` is not a capability (like CAP_NET_BIND_SERVICE, or ALL)"))
}

/// The calling process's permitted capability set (bit n = capability n), from
/// /proc/self/status.
pub fn permitted() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapPrm:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The name of capability `n`.
pub fn name(n: u32) -> String {
    NAMES
        .get(n as usize)
        .map_or_else(|| format!("CAP_{n}"), |s| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse("CAP_NET_BIND_SERVICE").unwrap(), vec![10]);
        assert_eq!(parse("sys_admin").unwrap(), vec![21]);
        assert_eq!(parse("ALL").unwrap().len(), 41);
        assert_eq!(name(39), "CAP_BPF");
        assert!(parse("CAP_FLY").is_err());
    }
}
