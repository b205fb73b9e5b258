//! Types shared by agentd's kernel programs (agentd-ebpf) and its daemon (agentd).
//!
//! Every type here is `#[repr(C)]`, has no padding the compiler could fill with garbage
//! (padding is spelled out as `_pad` fields), and is plain old data: the kernel programs
//! read and write them in BPF maps and ring buffers, and userspace reads and writes the
//! same bytes. With the `user` feature each type implements `aya::Pod`.
//!
//! One module per enforcement area, named like its kernel and userspace twins:
//! [`agent`] (identity), [`network`], [`files`], [`process`], [`budgets`], [`events`].

#![no_std]

pub mod agent;
pub mod budgets;
pub mod events;
pub mod files;
pub mod network;
pub mod process;

/// Implements `aya::Pod` for the listed types when the `user` feature is on.
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is repr(C), Copy, has explicit padding and no pointers.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use pod;
