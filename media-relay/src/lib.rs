//! The media relay library: `run(listener, config, shutdown)` is the entry point.
