//! Whole-image operations built on the image handle: create, info, map, convert.

pub mod convert;
pub mod create;
pub mod info;
pub mod map;
