//! `cargo xtask migrate` against the machine's PostgreSQL (started if it is down): a
//! fresh database migrated twice gets nothing the second time and ends with the schema
//! the migration files build; a failing file is named and leaves nothing of itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use xtask::pg::{empty_database, fresh_database, migrate, migration_files, PgDatabase};

fn migrations_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/postgres")
}

/// `cargo xtask migrate --database-url URL`, as an operator runs it: its stdout.
fn xtask_migrate(db: &PgDatabase) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["migrate", "--database-url", &db.url()])
        .output()
        .expect("run xtask");
    assert!(
        out.status.success(),
        "xtask migrate failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The schema as `pg_dump` writes it, without the tracking table (and without the
/// per-dump random `\restrict` key of newer pg_dump versions).
fn schema(db: &PgDatabase) -> String {
    let out = Command::new("pg_dump")
        .args([
            "--schema-only",
            "--no-owner",
            "--exclude-table=_cmb_migrations",
            "-d",
        ])
        .arg(db.url())
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn migrating_twice_applies_nothing_the_second_time_and_builds_the_fresh_schema() {
    let dir = migrations_dir();
    let names: Vec<String> = migration_files(&dir)
        .expect("migrations")
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert!(names.len() >= 9, "{names:?}");
    let db = empty_database("migrate").expect("database");

    let first = xtask_migrate(&db);
    let expected: String = names
        .iter()
        .map(|n| format!("migrate: applied {n}\n"))
        .collect();
    assert_eq!(first, expected);

    let second = xtask_migrate(&db);
    assert_eq!(second, "migrate: up to date (nothing to apply)\n");

    let tracked = db
        .query("SELECT name FROM _cmb_migrations ORDER BY name")
        .expect("tracking rows");
    assert_eq!(tracked.lines().collect::<Vec<_>>(), names);

    let reference = fresh_database("migrate_ref", &dir).expect("reference database");
    let (migrated, fresh) = (schema(&db), schema(&reference));
    assert!(fresh.contains("CREATE TABLE public.users"), "{fresh}");
    assert_eq!(migrated, fresh);
}

#[test]
fn a_failing_migration_is_named_and_leaves_nothing_of_itself() {
    let dir = std::env::temp_dir().join(format!("cmb-migrate-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("0001_first.sql"), "CREATE TABLE first (id INT);\n").expect("write");
    std::fs::write(
        dir.join("0002_broken.sql"),
        "CREATE TABLE second (id INT);\nSELECT no_such_column FROM first;\n",
    )
    .expect("write");
    let db = empty_database("migrate_fail").expect("database");

    let err = migrate(&db.url(), &dir).expect_err("the second file fails");
    let shown = format!("{err:#}");
    assert!(shown.contains("0002_broken.sql"), "{shown}");
    assert!(shown.contains("no_such_column"), "{shown}");
    assert!(
        !shown.contains(":cmb@"),
        "the password is redacted: {shown}"
    );
    let tables = db
        .query("SELECT to_regclass('first') IS NOT NULL, to_regclass('second') IS NOT NULL")
        .expect("query");
    assert_eq!(
        tables.trim(),
        "t|f",
        "the broken file's table was rolled back"
    );
    let tracked = db
        .query("SELECT name FROM _cmb_migrations")
        .expect("tracking");
    assert_eq!(tracked.trim(), "0001_first.sql");

    // Fixed, the rerun applies just that file.
    std::fs::write(
        dir.join("0002_broken.sql"),
        "CREATE TABLE second (id INT);\n",
    )
    .expect("write");
    assert_eq!(
        migrate(&db.url(), &dir).expect("rerun"),
        vec!["0002_broken.sql".to_owned()]
    );
    std::fs::remove_dir_all(&dir).ok();
}
