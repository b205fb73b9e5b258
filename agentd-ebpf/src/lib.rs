//! agentd's kernel programs live in the `agentd-ebpf` binary target (src/main.rs); this
//! empty library only exists so that agentd can depend on the crate (see agentd/build.rs).
#![no_std]
