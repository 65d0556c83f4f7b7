//! Loopback ports for local services: finding a free one for a test stack, and checking
//! that a fixed one (the dev stack's 8787/8080) is not already taken.
//!
//! Nothing here keeps a port reserved; callers start their service right away.

use std::net::{Ipv4Addr, TcpListener};

use anyhow::{bail, Context as _, Result};

/// A port that was free a moment ago: bind port 0, read what the kernel picked, release.
/// Another process could take it in between; the kernel hands ephemeral ports out in
/// sequence, so an immediate reuse is rare, and the service then fails loudly on bind.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Fails, naming `what`, if `port` on 127.0.0.1 is already in use.
pub fn ensure_port_free(port: u16, what: &str) -> Result<()> {
    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => Ok(()),
        Err(e) => bail!(
            "port {port} for {what} is not available ({e}): is another `cargo xtask dev` \
             running? Stop it, or pick other ports (see `cargo xtask dev --help`)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port in use is reported with the service it was meant for; once released it is
    /// free again. Released ports are ephemeral ones another process's outgoing connection
    /// may take at once (test stacks run beside this), so "free again" is asserted for one
    /// of a few released ports rather than for exactly the first.
    #[test]
    fn busy_port_is_reported() {
        let mut freed_ok = false;
        for _ in 0..5 {
            let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let port = held.local_addr().unwrap().port();
            let err = ensure_port_free(port, "the relay").unwrap_err().to_string();
            assert!(err.contains("the relay"), "{err}");
            drop(held);
            if ensure_port_free(port, "the relay").is_ok() {
                freed_ok = true;
                break;
            }
        }
        assert!(freed_ok, "no released port was free again");
    }

    /// A free port can be bound right after it is returned.
    #[test]
    fn free_port_is_bindable() {
        let port = free_port().unwrap();
        assert!(port > 0);
        assert!(TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok());
    }
}
