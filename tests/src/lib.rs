//! Test kit: fake providers, phone simulator and the stack launcher.
