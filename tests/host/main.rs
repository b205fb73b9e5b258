//! Host integration tests: agentd's real programs in the running kernel, as root.
//! Run with `cargo xtask test --stage host` (one test at a time: they count the kernel's
//! programs and cgroups).

mod audit;
mod budgets;
mod bypass;
mod doctor;
mod egress;
mod feedback;
mod files;
mod hardening;
mod install;
mod kill;
mod network;
mod reload;
mod run;
