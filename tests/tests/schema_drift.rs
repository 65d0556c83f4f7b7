//! The D1 and Postgres migrations must describe the same schema: same migration numbers,
//! same tables, same columns in the same order, same nullability and primary keys, and
//! column types that correspond (TEXT ↔ text/timestamptz/jsonb, INTEGER ↔
//! bigint/integer/boolean, REAL ↔ double precision). Both sides are built for real: the
//! D1 files in SQLite, the Postgres files in a fresh database on the real server.

// A failed expectation in a test is a test failure: panicking is the point.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use cmb_tests::pg;

/// (column, type, not null, part of the primary key), in column order, per table.
type Schema = BTreeMap<String, Vec<(String, String, bool, bool)>>;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn sqlite_schema() -> Schema {
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    for file in pg::migration_files(&root().join("migrations/d1")).unwrap() {
        conn.execute_batch(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    let mut tables = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_cf_%' AND name != 'd1_migrations' ORDER BY name")
        .unwrap();
    let names: Vec<String> = tables
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut schema = Schema::new();
    for t in names {
        let mut cols = conn.prepare(&format!("PRAGMA table_info({t})")).unwrap();
        let rows = cols
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?.to_uppercase(),
                    r.get::<_, i64>(3)? == 1,
                    r.get::<_, i64>(5)? > 0,
                ))
            })
            .unwrap()
            .map(Result::unwrap)
            // SQLite lets a PRIMARY KEY column be NULL unless declared NOT NULL; compare
            // key-ness, not that quirk.
            .map(|(c, ty, nn, pk)| (c, ty, nn || pk, pk))
            .collect();
        schema.insert(t, rows);
    }
    schema
}

fn postgres_schema() -> Schema {
    let db = pg::fresh_database("drift").unwrap();
    let out = db
        .query(
            "SELECT c.table_name, c.column_name, c.data_type, c.is_nullable = 'NO', \
             EXISTS (SELECT 1 FROM information_schema.key_column_usage k \
                     JOIN information_schema.table_constraints tc ON tc.constraint_name = k.constraint_name AND tc.table_name = k.table_name \
                     WHERE tc.constraint_type = 'PRIMARY KEY' AND k.table_name = c.table_name AND k.column_name = c.column_name) \
             FROM information_schema.columns c WHERE c.table_schema = 'public' \
             ORDER BY c.table_name, c.ordinal_position",
        )
        .unwrap();
    let mut schema = Schema::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('|').collect();
        schema.entry(f[0].to_string()).or_default().push((
            f[1].to_string(),
            f[2].to_string(),
            f[3] == "t",
            f[4] == "t",
        ));
    }
    schema
}

fn types_correspond(sqlite: &str, postgres: &str) -> bool {
    match sqlite {
        "TEXT" => matches!(
            postgres,
            "text" | "timestamp with time zone" | "date" | "jsonb" | "character varying"
        ),
        "INTEGER" => matches!(postgres, "bigint" | "integer" | "smallint" | "boolean"),
        "REAL" => matches!(postgres, "double precision" | "real"),
        _ => false,
    }
}

/// Both migration sets have the same numbered files.
#[test]
fn migration_numbers_match() {
    let numbers = |dir: &str| -> Vec<String> {
        pg::migration_files(&root().join(dir))
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy()[..4].to_string())
            .collect()
    };
    assert_eq!(numbers("migrations/d1"), numbers("migrations/postgres"));
}

/// The schemas the two sets produce agree table by table, column by column.
#[test]
fn d1_and_postgres_schemas_agree() {
    let lite = sqlite_schema();
    let pg = postgres_schema();
    assert_eq!(
        lite.keys().collect::<Vec<_>>(),
        pg.keys().collect::<Vec<_>>(),
        "tables differ"
    );
    for (table, lcols) in &lite {
        let pcols = &pg[table];
        let lnames: Vec<&str> = lcols.iter().map(|c| c.0.as_str()).collect();
        let pnames: Vec<&str> = pcols.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(lnames, pnames, "columns of {table} differ");
        for (l, p) in lcols.iter().zip(pcols) {
            assert!(
                types_correspond(&l.1, &p.1),
                "{table}.{}: SQLite {} vs Postgres {}",
                l.0,
                l.1,
                p.1
            );
            assert_eq!(l.2, p.2, "{table}.{}: NOT NULL differs", l.0);
            assert_eq!(l.3, p.3, "{table}.{}: primary key differs", l.0);
        }
    }
}
