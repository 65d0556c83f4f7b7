//! Reading what other programs print.

/// `text` without its terminal colour and cursor sequences (CSI: `ESC [` parameters and
/// a final letter), as wrangler and `cargo xtask dev` colour their output.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_removed_text_kept() {
        assert_eq!(strip_ansi("\u{1b}[2mfoo\u{1b}[0m bar"), "foo bar");
        assert_eq!(strip_ansi("\u{1b}[43;30mWARNING\u{1b}[0m"), "WARNING");
        assert_eq!(strip_ansi("plain"), "plain");
    }
}
