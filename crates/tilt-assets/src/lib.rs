//! # tilt-assets: the default model files
#![deny(missing_docs)]
