//! The control plane of the `phalanx` command: everything that links no libtorch.
//!
//! Two binaries share it: `phalanx` (the operator verbs, the controller, `cluster up`,
//! the demo and the scenario runner; it starts in milliseconds) and `phalanx-train` (the
//! verbs that train or touch tensors). `phalanx train ...` and the other training verbs
//! execute `phalanx-train` from the same directory with the same arguments, so the user
//! has one command. Nothing in this library may use `tch`, `phalanx-train` or
//! `phalanx-worker`: `ldd target/release/phalanx` shows no libtorch (tested).
pub mod ctl;
pub mod demo;
pub mod fault;
pub mod forward;
pub mod outcome;
pub mod scenario;
pub mod util;
