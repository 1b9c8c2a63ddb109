//! The PromQL in the shipped alerts (`deploy/grafana/prometheusrule.yaml`) and dashboard
//! (`deploy/grafana/unidler-dashboard.json`): every expression, and the metric names each uses.

use std::{collections::BTreeSet, path::PathBuf};

use promql_parser::parser::{self, Expr};

/// `deploy/grafana/`.
pub fn grafana_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana")
}

/// Every alert's name and expression.
pub fn alert_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(grafana_dir().join("prometheusrule.yaml")).unwrap();
    let mut alerts = Vec::new();
    let mut name = None;
    for line in text.lines().map(str::trim) {
        if let Some(alert) = line.strip_prefix("- alert:") {
            name = Some(alert.trim().to_owned());
        } else if let Some(expr) = line.strip_prefix("expr:") {
            let alert = name.take().expect("an expr: line after its alert: line");
            alerts.push((alert, expr.trim().to_owned()));
        }
    }
    let declared = text.matches("- alert:").count();
    assert_eq!(
        alerts.len(),
        declared,
        "every alert has one single-line expr"
    );
    alerts
}

/// Every dashboard panel's title and query, with Grafana's variables given values.
pub fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(grafana_dir().join("unidler-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*")
                .replace("$job", ".*");
            queries.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    queries
}

/// The metric names `expr` selects; an error if it does not parse.
pub fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    fn walk(expr: &Expr, names: &mut BTreeSet<String>) {
        match expr {
            Expr::Aggregate(e) => {
                walk(&e.expr, names);
                if let Some(param) = &e.param {
                    walk(param, names);
                }
            }
            Expr::Unary(e) => walk(&e.expr, names),
            Expr::Binary(e) => {
                walk(&e.lhs, names);
                walk(&e.rhs, names);
            }
            Expr::Paren(e) => walk(&e.expr, names),
            Expr::Subquery(e) => walk(&e.expr, names),
            Expr::VectorSelector(vs) => names.extend(vs.name.clone()),
            Expr::MatrixSelector(ms) => names.extend(ms.vs.name.clone()),
            Expr::Call(call) => {
                for arg in &call.args.args {
                    walk(arg, names);
                }
            }
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }
    let parsed = parser::parse(expr)?;
    let mut names = BTreeSet::new();
    walk(&parsed, &mut names);
    Ok(names)
}

/// Every metric name the alerts and the dashboard use, each with where it is used.
pub fn metric_names_used() -> Vec<(String, String)> {
    let mut used = Vec::new();
    for (source, exprs) in [
        ("alert", alert_expressions()),
        ("dashboard panel", dashboard_expressions()),
    ] {
        for (name, expr) in exprs {
            let names = metric_names(&expr)
                .unwrap_or_else(|e| panic!("{source} {name:?}: {expr:?} does not parse: {e}"));
            assert!(!names.is_empty(), "{source} {name:?} selects no metric");
            used.extend(names.into_iter().map(|n| (format!("{source} {name:?}"), n)));
        }
    }
    used
}
