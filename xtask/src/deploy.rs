//! What `cargo xtask deploy-check` decides from a `wrangler deploy --dry-run`'s output:
//! the bundle's sizes (wrangler's `Total Upload: … KiB / gzip: … KiB` line, the figure
//! Cloudflare's size limit is about), the warnings and errors wrangler printed, and
//! whether the bundle fits the budget. Pure: the command runs elsewhere.

/// The environments of `wrangler.toml` that are deployed (README "Deploying").
pub const PRODUCTION_ENVS: &[&str] =
    &["production", "production-postgres", "production-containers"];

/// The gzip budget of the Worker's upload, in wrangler's binary units: 1152 KiB
/// (1.125 MiB, 1,179,648 bytes). It was 1 MiB until the operator console's Worker side
/// (event log, MCP server, cron) took the upload to 1050.6 KiB; docs/PERFORMANCE.md
/// ("Worker size") lists the cuts that would bring it back under 1 MiB.
pub const GZIP_BUDGET_BYTES: u64 = 1152 * 1024;

/// The bundle's size as wrangler reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UploadSize {
    pub raw_bytes: u64,
    pub gzip_bytes: u64,
}

/// What one dry run printed that matters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DryRunReport {
    pub size: Option<UploadSize>,
    /// wrangler's `▲ [WARNING]` and `✘ [ERROR]` blocks, each as its heading and items on
    /// one line, except warnings made only of [`EXPECTED_OMISSIONS`].
    pub complaints: Vec<String>,
}

/// Bindings an environment leaves out on purpose, which wrangler warns about because
/// the top level (local development) has them: `(environment, key)`. The Hyperdrive
/// binding exists only where Postgres is used, D1 only where it is.
pub const EXPECTED_OMISSIONS: &[(&str, &str)] = &[
    ("production", "hyperdrive"),
    ("production-containers", "hyperdrive"),
    ("production-postgres", "d1_databases"),
];

/// Reads wrangler's output (stdout and stderr together; colours are ignored).
pub fn parse_dry_run(output: &str) -> DryRunReport {
    let output = crate::text::strip_ansi(output);
    let mut report = DryRunReport::default();
    let mut block: Option<(bool, Vec<String>)> = None;
    let flush = |block: &mut Option<(bool, Vec<String>)>, report: &mut DryRunReport| {
        if let Some((is_warning, lines)) = block.take() {
            let items: Vec<&String> = lines[1..]
                .iter()
                .filter(|l| l.starts_with("- ") && !l.ends_with("environment configuration"))
                .collect();
            let only_expected =
                is_warning && !items.is_empty() && items.iter().all(|l| is_expected_omission(l));
            if !only_expected {
                report.complaints.push(lines.join(" "));
            }
        }
    };
    for line in output.lines() {
        let trimmed = line.trim();
        if let Some(size) = parse_total_upload(trimmed) {
            report.size = Some(size);
        }
        let warning = trimmed.contains("[WARNING]");
        if warning || trimmed.contains("[ERROR]") {
            flush(&mut block, &mut report);
            block = Some((warning, vec![trimmed.to_owned()]));
        } else if let Some((_, lines)) = block.as_mut() {
            if !line.is_empty() && !line.starts_with(char::is_whitespace) {
                flush(&mut block, &mut report);
            } else if !trimmed.is_empty() {
                lines.push(trimmed.to_owned());
            }
        }
    }
    flush(&mut block, &mut report);
    report
}

/// `- "hyperdrive" exists at the top level, but not on "env.production".` for a pair of
/// [`EXPECTED_OMISSIONS`].
fn is_expected_omission(item: &str) -> bool {
    EXPECTED_OMISSIONS.iter().any(|(env, key)| {
        item == format!("- \"{key}\" exists at the top level, but not on \"env.{env}\".")
    })
}

/// `Total Upload: 3915.61 KiB / gzip: 1391.52 KiB` → bytes (1 KiB = 1024 bytes).
fn parse_total_upload(line: &str) -> Option<UploadSize> {
    let rest = line.split_once("Total Upload:")?.1;
    let (raw, gzip) = rest.split_once("/ gzip:")?;
    Some(UploadSize {
        raw_bytes: kib(raw)?,
        gzip_bytes: kib(gzip)?,
    })
}

fn kib(text: &str) -> Option<u64> {
    let number = text.trim().strip_suffix("KiB")?.trim();
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value >= 0.0).then(|| (value * 1024.0).round() as u64)
}

/// Everything wrong with one environment's dry run, empty when it passed: a failed
/// command, any warning or error wrangler printed, a missing size line, a bundle over
/// the budget.
pub fn problems(env: &str, succeeded: bool, report: &DryRunReport) -> Vec<String> {
    let mut out = Vec::new();
    if !succeeded {
        out.push(format!("{env}: wrangler deploy --dry-run failed"));
    }
    for complaint in &report.complaints {
        out.push(format!("{env}: wrangler said: {complaint}"));
    }
    match report.size {
        None if succeeded => out.push(format!(
            "{env}: wrangler printed no `Total Upload: … / gzip: …` line to measure"
        )),
        None => {}
        Some(size) if size.gzip_bytes > GZIP_BUDGET_BYTES => out.push(format!(
            "{env}: the bundle is {} gzip, over the {} budget (docs/PERFORMANCE.md, \"Worker size\")",
            human(size.gzip_bytes),
            human(GZIP_BUDGET_BYTES)
        )),
        Some(_) => {}
    }
    out
}

/// `1,391,520 bytes (1358.91 KiB)`: bytes, and KiB as wrangler prints them.
pub fn human(bytes: u64) -> String {
    let digits = bytes.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{grouped} bytes ({:.2} KiB)", bytes as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = "\
 ⛅️ wrangler 4.164.0
───────────────────
Total Upload: 2600.50 KiB / gzip: 900.25 KiB
Your Worker has access to the following bindings:
Binding                                 Resource
env.CALL_SESSION (CallSession)          Durable Object
--dry-run: exiting now.
";

    #[test]
    fn a_clean_run_is_measured_and_passes() {
        let report = parse_dry_run(CLEAN);
        assert_eq!(
            report.size,
            Some(UploadSize {
                raw_bytes: 2_662_912,
                gzip_bytes: 921_856,
            })
        );
        assert!(report.complaints.is_empty());
        assert!(problems("production", true, &report).is_empty());
    }

    #[test]
    fn warnings_errors_failures_and_size_are_each_named() {
        let output = format!(
            "{CLEAN}\n▲ [WARNING] Processing wrangler.toml configuration:\n    - \"unsafe\" fields are experimental\n✘ [ERROR] something broke\n"
        );
        let report = parse_dry_run(&output);
        assert_eq!(report.complaints.len(), 2, "{report:?}");
        let found = problems("production", false, &report);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].contains("failed"));
        assert!(found[1].contains("[WARNING] Processing wrangler.toml"));
        assert!(found[1].contains("\"unsafe\" fields are experimental"));
        assert!(found[2].contains("[ERROR] something broke"));
    }

    /// wrangler's real layout, in colour: a warning made only of the omissions we mean is
    /// no complaint; the same warning with another item, or an error, is.
    #[test]
    fn expected_omissions_pass_and_nothing_else_does() {
        let warning = |items: &str| {
            format!(
                "\u{1b}[33m▲ \u{1b}[43;33m[\u{1b}[43;30mWARNING\u{1b}[43;33m]\u{1b}[0m \u{1b}[1mProcessing wrangler.toml configuration:\u{1b}[0m\n\n  \n    - \"env.production\" environment configuration\n{items}\n\n"
            )
        };
        let omitted = "      - \"hyperdrive\" exists at the top level, but not on \"env.production\".\n        This is not what you probably want, since \"hyperdrive\" is not inherited by environments.\n        Please add \"hyperdrive\" to \"env.production\".";
        let report = parse_dry_run(&format!("{CLEAN}{}", warning(omitted)));
        assert!(report.complaints.is_empty(), "{report:?}");

        let other =
            "      - \"kv_namespaces\" exists at the top level, but not on \"env.production\".";
        let report = parse_dry_run(&format!(
            "{CLEAN}{}",
            warning(&format!("{omitted}\n{other}"))
        ));
        assert_eq!(report.complaints.len(), 1, "{report:?}");
        assert!(report.complaints[0].contains("kv_namespaces"), "{report:?}");

        // The omission is expected of `production` only.
        let report = parse_dry_run(&warning(
            &omitted.replace("env.production", "env.production-postgres"),
        ));
        assert_eq!(report.complaints.len(), 1, "{report:?}");

        let error = "\u{1b}[31m✘ [ERROR] Processing wrangler.toml configuration:\n\n    - The image \"./media-relay/Dockerfile\" does not appear to be a valid path\n\n🪵  Logs were written\n";
        let report = parse_dry_run(&format!("{}{error}", warning(omitted)));
        assert_eq!(report.complaints.len(), 1, "{report:?}");
        assert!(report.complaints[0].contains("[ERROR]"), "{report:?}");
        assert!(report.complaints[0].contains("Dockerfile"), "{report:?}");
        assert!(
            !report.complaints[0].contains("Logs were written"),
            "{report:?}"
        );
    }

    #[test]
    fn the_budget_is_inclusive_and_enforced() {
        let at = |gzip_bytes| DryRunReport {
            size: Some(UploadSize {
                raw_bytes: 1,
                gzip_bytes,
            }),
            complaints: Vec::new(),
        };
        assert!(problems("p", true, &at(GZIP_BUDGET_BYTES)).is_empty());
        let over = problems("p", true, &at(GZIP_BUDGET_BYTES + 1));
        assert_eq!(over.len(), 1);
        assert!(over[0].contains("1,179,649 bytes"), "{over:?}");
    }

    #[test]
    fn a_run_without_a_size_line_fails() {
        let report = parse_dry_run("--dry-run: exiting now.\n");
        assert_eq!(report.size, None);
        assert_eq!(problems("p", true, &report).len(), 1);
    }

    /// The shipped `wrangler.toml`: each production env says `DEPLOY_ENV = "production"`,
    /// has no loopback address anywhere, and binds the database it uses and only that
    /// one (Hyperdrive only where Postgres is used); only the containers env has them.
    #[test]
    fn the_production_envs_of_wrangler_toml() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../wrangler.toml");
        let text = std::fs::read_to_string(path).expect("wrangler.toml");
        let config: toml::Table = toml::from_str(&text).expect("wrangler.toml parses");
        let envs = config["env"].as_table().expect("[env]");
        for name in PRODUCTION_ENVS {
            let env = envs[*name]
                .as_table()
                .unwrap_or_else(|| panic!("[env.{name}]"));
            let vars = env["vars"].as_table().expect("vars");
            assert_eq!(vars["DEPLOY_ENV"].as_str(), Some("production"), "{name}");
            let rendered = toml::to_string(env).expect("renders");
            for loopback in ["127.0.0.1", "localhost", "0.0.0.0", "[::1]"] {
                assert!(!rendered.contains(loopback), "{name} mentions {loopback}");
            }
            let postgres = vars["DB_BACKEND"].as_str() == Some("postgres");
            assert_eq!(env.contains_key("hyperdrive"), postgres, "{name}");
            assert_eq!(env.contains_key("d1_databases"), !postgres, "{name}");
            assert!(env.contains_key("kv_namespaces"), "{name}");
            assert!(env.contains_key("durable_objects"), "{name}");
            assert_eq!(
                env.contains_key("containers"),
                *name == "production-containers",
                "{name}"
            );
        }
        // The top level is local development.
        assert_eq!(config["vars"]["DEPLOY_ENV"].as_str(), Some("development"));
    }

    #[test]
    fn human_groups_digits() {
        assert_eq!(human(999), "999 bytes (0.98 KiB)");
        assert_eq!(human(1_391_520), "1,391,520 bytes (1358.91 KiB)");
    }
}
