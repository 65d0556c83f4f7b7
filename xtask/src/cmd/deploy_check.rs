//! `cargo xtask deploy-check`: the deploy rehearsal. Builds the release Worker once, then
//! runs `wrangler deploy --dry-run` for every production environment of `wrangler.toml`
//! into `target/deploy-dry-run/<env>`, failing on a failed run, on any warning or error
//! wrangler prints, and on a bundle over the gzip budget; prints each bundle's raw and
//! gzip size. Nothing is uploaded and no Cloudflare login is needed.

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use xtask::deploy::{self, GZIP_BUDGET_BYTES, PRODUCTION_ENVS};
use xtask::repo::Repo;
use xtask::toolchain::Node;

use super::build;

#[derive(Args, Default)]
pub struct DeployCheckArgs {
    /// Use the Worker already in build/ (from `cargo xtask build-worker --release`)
    /// instead of building it.
    #[arg(long)]
    no_build: bool,
}

pub fn run(repo: &Repo, args: &DeployCheckArgs) -> Result<()> {
    if !args.no_build {
        build::build_worker(repo, true)?;
    }
    let node = Node::require(repo)?;
    let root = repo.root().join("target").join("deploy-dry-run");
    let mut problems = Vec::new();
    for env in PRODUCTION_ENVS {
        let started = Instant::now();
        let outdir = root.join(env);
        if outdir.exists() {
            std::fs::remove_dir_all(&outdir)
                .with_context(|| format!("removing {}", outdir.display()))?;
        }
        let out = xtask::wrangler::deploy_dry_run(repo, &node, env, &outdir)
            .output()
            .with_context(|| format!("running {}", repo.wrangler_bin().display()))?;
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let report = deploy::parse_dry_run(&text);
        let found = deploy::problems(env, out.status.success(), &report);
        match report.size {
            Some(size) => println!(
                "deploy-check: {env:<22} raw {}, gzip {} (budget {}), {:.1}s",
                deploy::human(size.raw_bytes),
                deploy::human(size.gzip_bytes),
                deploy::human(GZIP_BUDGET_BYTES),
                started.elapsed().as_secs_f64()
            ),
            None => println!("deploy-check: {env:<22} no size reported"),
        }
        print_files(&outdir);
        if !found.is_empty() {
            println!("--- wrangler's output for {env} ---\n{}", text.trim_end());
        }
        problems.extend(found);
    }
    if !problems.is_empty() {
        bail!("deploy rehearsal failed:\n  {}", problems.join("\n  "));
    }
    println!(
        "deploy-check: {} environments validated, bundles in {}",
        PRODUCTION_ENVS.len(),
        root.display()
    );
    Ok(())
}

/// The bundle's files and their raw sizes (what takes the space is the wasm).
fn print_files(outdir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(outdir) else {
        return;
    };
    let mut files: Vec<(String, u64)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let len = e.metadata().ok().filter(|m| m.is_file())?.len();
            Some((e.file_name().to_string_lossy().into_owned(), len))
        })
        .collect();
    files.sort();
    for (name, len) in files {
        println!("    {name:<48} {}", deploy::human(len));
    }
}
