//! docs/observability.md and the committed Grafana dashboard agree with the catalog.
use std::collections::BTreeSet;
use std::path::PathBuf;

use phalanx_telemetry::catalog::{self, METRICS};

fn repo_file(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every `phalanx_...` name in a PromQL expression.
fn names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("phalanx_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

#[test]
fn the_grafana_dashboard_refers_only_to_metric_names_that_exist_and_shows_them_all() {
    let dash: serde_json::Value =
        serde_json::from_str(&repo_file("docs/grafana/phalanx.json")).expect("valid JSON");
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(!all.is_empty(), "no PromQL expression in the dashboard");
    let mut used = BTreeSet::new();
    for e in &all {
        for n in names_in(e) {
            let fam = catalog::family_of(&n)
                .unwrap_or_else(|| panic!("`{n}` in `{e}` is not a Phalanx metric"));
            used.insert(fam.name);
        }
    }
    let unused: Vec<_> = METRICS
        .iter()
        .map(|m| m.name)
        .filter(|n| !used.contains(n))
        .collect();
    assert!(unused.is_empty(), "metrics no panel shows: {unused:?}");
}

#[test]
fn the_docs_metric_table_is_the_catalogs() {
    let doc = repo_file("docs/observability.md");
    let table = catalog::markdown_table();
    assert!(
        doc.contains(&table),
        "docs/observability.md must hold the catalog's table exactly:\n\n{table}"
    );
}

#[test]
fn the_docs_scrape_configuration_names_the_grafana_file_and_the_flag() {
    let doc = repo_file("docs/observability.md");
    for s in [
        "scrape_configs:",
        "credentials_file:",
        "--metrics-listen",
        "docs/grafana/phalanx.json",
    ] {
        assert!(doc.contains(s), "docs/observability.md lacks `{s}`");
    }
}

#[test]
fn names_are_found_in_promql() {
    assert_eq!(
        names_in("histogram_quantile(0.5, sum by (le) (rate(phalanx_a_bucket[5m]))) / phalanx_b"),
        vec!["phalanx_a_bucket", "phalanx_b"]
    );
}
