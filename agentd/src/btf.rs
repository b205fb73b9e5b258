//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! Rust eBPF objects carry no CO-RE relocations, so the kernel programs read struct fields
//! at offsets that the loader takes from the running kernel's BTF and hands over as a
//! read-only global ([`KernelOffsets`]). This module finds those offsets. It also answers
//! whether a kernel function exists (doctor uses `bpf_lsm_file_open` to tell whether BPF
//! LSM is compiled in).
//!
//! Format: Documentation/bpf/btf.rst in the kernel tree. Only what agentd needs is decoded;
//! every kind is sized correctly so the walk over the type section stays in step.

use std::{fs, path::Path};

use agentd_common::files::KernelOffsets;
use thiserror::Error;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u8 = 1;
const KIND_PTR: u8 = 2;
const KIND_ARRAY: u8 = 3;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_ENUM: u8 = 6;
const KIND_FWD: u8 = 7;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_FUNC: u8 = 12;
const KIND_FUNC_PROTO: u8 = 13;
const KIND_VAR: u8 = 14;
const KIND_DATASEC: u8 = 15;
const KIND_FLOAT: u8 = 16;
const KIND_DECL_TAG: u8 = 17;
const KIND_TYPE_TAG: u8 = 18;
const KIND_ENUM64: u8 = 19;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not BTF data: {0}")]
    Format(String),
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("kernel BTF has no member `{member}` in struct `{strukt}`")]
    NoMember { strukt: String, member: String },
    #[error("member `{member}` of struct `{strukt}` is a bitfield, not at a byte offset")]
    Bitfield { strukt: String, member: String },
}

#[derive(Debug, Clone)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Offset in bits from the start of the struct.
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u8,
    /// The referenced type for modifiers, typedefs, pointers, functions.
    type_id: u32,
    members: Vec<Member>,
}

/// Parsed BTF: the types (index = type id - 1) and the string section.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u16_at(data: &[u8], at: usize) -> Result<u16, BtfError> {
    data.get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(|| BtfError::Format(format!("truncated at byte {at}")))
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| BtfError::Format(format!("truncated at byte {at}")))
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Btf {{ {} types, {} bytes of strings }}",
            self.types.len(),
            self.strings.len()
        )
    }
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_kernel() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses raw (little-endian) BTF as the kernel exports it.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if u16_at(data, 0)? != BTF_MAGIC {
            return Err(BtfError::Format(
                "bad magic (only little-endian BTF is read)".into(),
            ));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let section = |off: usize, len: usize, what: &str| {
            hdr_len
                .checked_add(off)
                .and_then(|start| Some((start, start.checked_add(len)?)))
                .and_then(|(start, end)| data.get(start..end))
                .ok_or_else(|| BtfError::Format(format!("{what} section out of bounds")))
        };
        let type_data = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?.to_vec();

        let mut types = Vec::new();
        let mut at = 0usize;
        while at < type_data.len() {
            let name_off = u32_at(type_data, at)?;
            let info = u32_at(type_data, at + 4)?;
            let size_or_type = u32_at(type_data, at + 8)?;
            at += 12;
            let kind = ((info >> 24) & 0x1f) as u8;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(type_data, m + 8)?;
                        members.push(Member {
                            name_off: u32_at(type_data, m)?,
                            type_id: u32_at(type_data, m + 4)?,
                            // With kind_flag the top 8 bits hold a bitfield size.
                            bit_offset: if kind_flag {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    12 * vlen
                }
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                other => {
                    return Err(BtfError::Format(format!(
                        "unknown BTF kind {other} for type {}",
                        types.len() + 1
                    )));
                }
            };
            at += extra;
            if at > type_data.len() {
                return Err(BtfError::Format("type section truncated".into()));
            }
            types.push(Type {
                name_off,
                kind,
                type_id: size_or_type,
                members,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &str {
        let start = off as usize;
        let Some(rest) = self.strings.get(start..) else {
            return "";
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        id.checked_sub(1).and_then(|i| self.types.get(i as usize))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.type_id
                }
                _ => return Some(t),
            }
        }
        None
    }

    fn find_struct(&self, name: &str) -> Option<&Type> {
        // A full definition, not a forward declaration (which has kind FWD anyway) or an
        // empty placeholder.
        self.types
            .iter()
            .filter(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == name)
            .max_by_key(|t| t.members.len())
    }

    /// Finds `member` in `t`, looking inside anonymous struct and union members; returns
    /// the offset in bits.
    fn member_bits(&self, t: &Type, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            let name = self.name(m.name_off);
            if name == member {
                return Some(m.bit_offset);
            }
            if name.is_empty()
                && let Some(inner) = self.resolve(m.type_id)
                && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some(bits) = self.member_bits(inner, member, depth + 1)
            {
                return Some(m.bit_offset + bits);
            }
        }
        None
    }

    /// Byte offset of `member` in `struct strukt`.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let t = self
            .find_struct(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let bits = self
            .member_bits(t, member, 0)
            .ok_or_else(|| BtfError::NoMember {
                strukt: strukt.into(),
                member: member.into(),
            })?;
        if bits % 8 != 0 {
            return Err(BtfError::Bitfield {
                strukt: strukt.into(),
                member: member.into(),
            });
        }
        Ok(bits / 8)
    }

    /// True if the kernel has a function (BTF FUNC) of this name.
    pub fn has_function(&self, name: &str) -> bool {
        self.types
            .iter()
            .any(|t| t.kind == KIND_FUNC && self.name(t.name_off) == name)
    }

    /// The struct field offsets the file programs need.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        Ok(KernelOffsets {
            file_f_path: self.member_offset("file", "f_path")?,
            file_f_mode: self.member_offset("file", "f_mode")?,
            path_mnt: self.member_offset("path", "mnt")?,
            path_dentry: self.member_offset("path", "dentry")?,
            dentry_d_parent: self.member_offset("dentry", "d_parent")?,
            dentry_d_inode: self.member_offset("dentry", "d_inode")?,
            dentry_d_sb: self.member_offset("dentry", "d_sb")?,
            inode_i_ino: self.member_offset("inode", "i_ino")?,
            super_block_s_dev: self.member_offset("super_block", "s_dev")?,
            mount_mnt: self.member_offset("mount", "mnt")?,
            mount_mnt_parent: self.member_offset("mount", "mnt_parent")?,
            mount_mnt_mountpoint: self.member_offset("mount", "mnt_mountpoint")?,
            vfsmount_mnt_root: self.member_offset("vfsmount", "mnt_root")?,
            dentry_d_name: self.member_offset("dentry", "d_name")?,
            qstr_name: self.member_offset("qstr", "name")?,
            qstr_len: self.member_offset("qstr", "len")?,
            linux_binprm_file: self.member_offset("linux_binprm", "file")?,
            task_cgroups: self.member_offset("task_struct", "cgroups")?,
            css_set_dfl_cgrp: self.member_offset("css_set", "dfl_cgrp")?,
            cgroup_kn: self.member_offset("cgroup", "kn")?,
            cgroup_level: self.member_offset("cgroup", "level")?,
            cgroup_self: self.member_offset("cgroup", "self")?,
            css_parent: self.member_offset("cgroup_subsys_state", "parent")?,
            css_cgroup: self.member_offset("cgroup_subsys_state", "cgroup")?,
            kernfs_node_id: self.member_offset("kernfs_node", "id")?,
            task_tgid: self.member_offset("task_struct", "tgid")?,
            task_ti_status: self.member_offset("task_struct", "thread_info")?
                + self.member_offset("thread_info", "status")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob from (name, info, size_or_type, extra words) entries.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn word(&mut self, w: u32) {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
        fn ty(&mut self, name: &str, kind: u8, vlen: u32, kind_flag: bool, size_or_type: u32) {
            let n = self.s(name);
            self.word(n);
            self.word((kind as u32) << 24 | vlen | if kind_flag { 1 << 31 } else { 0 });
            self.word(size_or_type);
        }
        fn member(&mut self, name: &str, type_id: u32, offset: u32) {
            let n = self.s(name);
            self.word(n);
            self.word(type_id);
            self.word(offset);
        }
        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.push(1);
            out.push(0);
            out.extend_from_slice(&24u32.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// 1: int, 2: anonymous union { int a; int b_in_union } at 0, 3: struct file {
    /// int f_mode @ 32 bits; anon union @ 64 bits; int late @ 128 bits }, 4: FUNC, 5: a
    /// struct with a bitfield member.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        b.ty("int", KIND_INT, 0, false, 4);
        b.word(32);
        b.ty("", KIND_UNION, 2, false, 8);
        b.member("a", 1, 0);
        b.member("f_path", 1, 0);
        b.ty("file", KIND_STRUCT, 3, false, 24);
        b.member("f_mode", 1, 32);
        b.member("", 2, 64);
        b.member("late", 1, 128);
        b.ty("bpf_lsm_file_open", KIND_FUNC, 0, false, 0);
        b.ty("bits", KIND_STRUCT, 1, true, 4);
        b.member("flag", 1, (1 << 24) | 3);
        b.build()
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("file", "f_mode").unwrap(), 4);
        assert_eq!(btf.member_offset("file", "f_path").unwrap(), 8);
        assert_eq!(btf.member_offset("file", "late").unwrap(), 16);
        assert!(btf.has_function("bpf_lsm_file_open"));
        assert!(!btf.has_function("bpf_lsm_nothing"));
    }

    #[test]
    fn names_missing_struct_member_and_bitfield() {
        let btf = Btf::parse(&sample()).unwrap();
        let err = btf.member_offset("file", "f_nope").unwrap_err().to_string();
        assert_eq!(err, "kernel BTF has no member `f_nope` in struct `file`");
        let err = btf.member_offset("inode", "i_ino").unwrap_err().to_string();
        assert_eq!(err, "kernel BTF has no struct `inode`");
        assert!(matches!(
            btf.member_offset("bits", "flag"),
            Err(BtfError::Bitfield { .. })
        ));
    }

    #[test]
    fn rejects_truncated_and_foreign_data() {
        let data = sample();
        assert!(matches!(
            Btf::parse(&data[..data.len() - 40]),
            Err(BtfError::Format(_))
        ));
        assert!(matches!(
            Btf::parse(b"\x7fELF-not-btf-at-all-data"),
            Err(BtfError::Format(_))
        ));
        let mut bad_kind = sample();
        // The first type's info word: set kind 31.
        bad_kind[24 + 4 + 3] = 31;
        assert!(
            Btf::parse(&bad_kind)
                .unwrap_err()
                .to_string()
                .contains("unknown BTF kind 31")
        );
    }

    #[test]
    fn reads_the_running_kernel() {
        // Every kernel agentd supports exports BTF; the offsets must all resolve and be
        // distinct within each struct.
        let btf = Btf::from_kernel().expect("this kernel exports /sys/kernel/btf/vmlinux");
        let off = btf
            .kernel_offsets()
            .expect("all fields the file programs read exist");
        assert_ne!(off.path_mnt, off.path_dentry);
        assert_ne!(off.dentry_d_parent, off.dentry_d_inode);
        assert_ne!(off.mount_mnt_parent, off.mount_mnt_mountpoint);
        assert!(
            btf.has_function("bpf_lsm_file_open"),
            "the build host has CONFIG_BPF_LSM=y"
        );
    }
}
