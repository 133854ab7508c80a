//! # tilt-decode: inference-time alignment strategies
#![deny(missing_docs)]
