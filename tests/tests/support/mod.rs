//! Helpers shared by end-to-end test files (`mod support;`).
#![allow(dead_code)]

pub mod linearizability;
