//! Platform-free domain logic shared by the Worker (`cmb-api`) and the media relay.
//!
//! Nothing here performs I/O or reads a clock: time is always an argument, so every
//! function runs the same on wasm32 and native and is unit-tested natively.
