//! Whole-image operations: create, info, map, convert, check/repair, bench.

pub mod bench;
pub mod check;
pub mod convert;
pub mod create;
pub mod info;
pub mod map;
