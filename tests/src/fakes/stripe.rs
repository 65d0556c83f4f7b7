//! Placeholder: owned by another engineer, to be replaced.
