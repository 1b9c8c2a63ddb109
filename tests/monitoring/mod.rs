//! The PromQL in the shipped alerts (`deploy/grafana/prometheusrule.yaml`) and dashboard
//! (`deploy/grafana/unidler-dashboard.json`): every expression, and the metric names each uses.

use std::path::PathBuf;

use promql_parser::{
    label::{MatchOp, Matchers},
    parser::{self, Expr},
};

/// `deploy/grafana/`.
pub fn grafana_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana")
}

/// Every alert's name and expression.
pub fn alert_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(grafana_dir().join("prometheusrule.yaml")).unwrap();
    let mut alerts = Vec::new();
    let mut name = None;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if let Some(alert) = trimmed.strip_prefix("- alert:") {
            name = Some(alert.trim().to_owned());
        } else if let Some(expr) = trimmed.strip_prefix("expr:") {
            let alert = name.take().expect("an expr: line after its alert: line");
            let mut expr = expr.trim().to_owned();
            if [">-", ">", "|", "|-"].contains(&expr.as_str()) {
                // A block: the lines indented deeper than `expr:`, folded into one.
                let indent = line.len() - trimmed.len();
                let mut folded = Vec::new();
                while let Some(next) = lines.next_if(|l| l.len() - l.trim_start().len() > indent) {
                    folded.push(next.trim());
                }
                expr = folded.join(" ");
            }
            alerts.push((alert, expr));
        }
    }
    let declared = text.matches("- alert:").count();
    assert_eq!(alerts.len(), declared, "every alert has one expr");
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

/// A series a query selects: its metric name, and the label values it asks for (`=`, and each
/// word of a `=~` alternation of plain words).
pub type Selected = (String, Vec<(String, String)>);

/// The series `expr` selects; an error if it does not parse.
pub fn selected(expr: &str) -> Result<Vec<Selected>, String> {
    /// Every combination of the label values the matchers ask for (one per word of a `=~`
    /// alternation).
    fn label_sets(matchers: &Matchers) -> Vec<Vec<(String, String)>> {
        let mut sets = vec![Vec::new()];
        for m in &matchers.matchers {
            let values: Vec<&str> = match &m.op {
                MatchOp::Equal => vec![m.value.as_str()],
                MatchOp::Re(_)
                    if m.value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '|') =>
                {
                    m.value.split('|').collect()
                }
                _ => continue,
            };
            sets = sets
                .into_iter()
                .flat_map(|set| {
                    values.iter().map(move |v| {
                        let mut set = set.clone();
                        set.push((m.name.clone(), (*v).to_owned()));
                        set
                    })
                })
                .collect();
        }
        sets
    }
    fn each(name: &Option<String>, matchers: &Matchers, names: &mut Vec<Selected>) {
        if let Some(name) = name {
            names.extend(
                label_sets(matchers)
                    .into_iter()
                    .map(|labels| (name.clone(), labels)),
            );
        }
    }
    fn walk(expr: &Expr, names: &mut Vec<Selected>) {
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
            Expr::VectorSelector(vs) => each(&vs.name, &vs.matchers, names),
            Expr::MatrixSelector(ms) => each(&ms.vs.name, &ms.vs.matchers, names),
            Expr::Call(call) => {
                for arg in &call.args.args {
                    walk(arg, names);
                }
            }
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }
    let parsed = parser::parse(expr)?;
    let mut names = Vec::new();
    walk(&parsed, &mut names);
    Ok(names)
}

/// Metrics Prometheus makes itself, not the agent.
pub const SYNTHETIC: [&str; 1] = ["up"];

/// Every series the alerts and the dashboard select, each with where it is used (Prometheus'
/// own metrics left out).
pub fn series_used() -> Vec<(String, Selected)> {
    let mut used = Vec::new();
    for (source, exprs) in [
        ("alert", alert_expressions()),
        ("dashboard panel", dashboard_expressions()),
    ] {
        for (name, expr) in exprs {
            let series = selected(&expr)
                .unwrap_or_else(|e| panic!("{source} {name:?}: {expr:?} does not parse: {e}"));
            assert!(!series.is_empty(), "{source} {name:?} selects no metric");
            used.extend(
                series
                    .into_iter()
                    .filter(|(metric, _)| !SYNTHETIC.contains(&metric.as_str()))
                    .map(|s| (format!("{source} {name:?}"), s)),
            );
        }
    }
    used
}
