//! Reported figures: each beside its baseline, printed as a table and written as JSON.

use serde_json::json;

/// One reported figure.
pub(crate) struct Figure {
    pub(crate) section: &'static str,
    pub(crate) name: String,
    pub(crate) value: f64,
    pub(crate) unit: &'static str,
    /// (baseline name, baseline value) measured in the same run.
    pub(crate) baseline: Option<(String, f64)>,
    pub(crate) target: Option<String>,
}

pub(crate) fn figure(
    section: &'static str,
    name: impl Into<String>,
    value: f64,
    unit: &'static str,
) -> Figure {
    Figure {
        section,
        name: name.into(),
        value,
        unit,
        baseline: None,
        target: None,
    }
}

impl Figure {
    pub(crate) fn vs(mut self, name: impl Into<String>, value: f64) -> Self {
        self.baseline = Some((name.into(), value));
        self
    }
    pub(crate) fn target(mut self, t: impl Into<String>) -> Self {
        self.target = Some(t.into());
        self
    }
}

pub(crate) fn print_table(figures: &[Figure]) {
    println!();
    let header = [
        "SECTION", "FIGURE", "VALUE", "UNIT", "BASELINE", "RATIO", "TARGET",
    ];
    println!(
        "{:<14} {:<58} {:>12} {:<11} {:>26} {:>7}  {}",
        header[0], header[1], header[2], header[3], header[4], header[5], header[6]
    );
    for f in figures {
        let (base, ratio) = match &f.baseline {
            Some((name, v)) => (format!("{name} {v:.1}"), format!("{:.2}x", f.value / v)),
            None => (String::new(), String::new()),
        };
        println!(
            "{:<14} {:<58} {:>12.2} {:<11} {:>26} {:>7}  {}",
            f.section,
            f.name,
            f.value,
            f.unit,
            base,
            ratio,
            f.target.as_deref().unwrap_or("")
        );
    }
}

pub(crate) fn write_json(figures: &[Figure]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let doc = json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "figures": figures.iter().map(|f| json!({
            "section": f.section, "name": f.name, "value": f.value, "unit": f.unit,
            "baseline": f.baseline.as_ref().map(|(n, v)| json!({"name": n, "value": v})),
            "ratio": f.baseline.as_ref().map(|(_, v)| f.value / v),
            "target": f.target,
        })).collect::<Vec<_>>(),
    });
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("\nresults written to {}", path.display());
}
