//! Parses the Prometheus text format (0.0.4) that `/metrics` serves into a map from series
//! (name + labels) to value.

use std::collections::BTreeMap;

/// One time series: a metric name and its labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Every sample of one `/metrics` page.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub series: BTreeMap<Series, f64>,
}

impl Metrics {
    /// Parses a page; `# HELP`/`# TYPE` comments and blank lines are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut series = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (s, value) =
                parse_sample(line).map_err(|e| format!("line {}: {e}: {line}", n + 1))?;
            series.insert(s, value);
        }
        Ok(Self { series })
    }

    /// The sum over all series named `name` whose labels include every pair in `labels`;
    /// `None` when no series matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for (s, v) in &self.series {
            if s.name == name
                && labels
                    .iter()
                    .all(|(k, want)| s.labels.get(*k).map(String::as_str) == Some(*want))
            {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }

    /// Like [`Metrics::get`] without label filters, panicking (with the names present) when
    /// the metric is absent.
    pub fn value(&self, name: &str) -> f64 {
        self.get(name, &[]).unwrap_or_else(|| {
            let mut names: Vec<&str> = self.series.keys().map(|s| s.name.as_str()).collect();
            names.dedup();
            panic!("metric {name} not on /metrics; present: {names:?}")
        })
    }
}

fn parse_sample(line: &str) -> Result<(Series, f64), String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, tail) = parse_labels(after)?;
        labels = parsed;
        rest = tail;
    }
    // The value, optionally followed by a timestamp.
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| format!("bad value {v:?}: {e}"))?,
    };
    Ok((Series { name, labels }, value))
}

/// Parses `k="v",k2="v2"}` (the text after `{`); returns the labels and the text after `}`.
fn parse_labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(tail) = s.strip_prefix('}') {
            return Ok((labels, tail));
        }
        let eq = s.find('=').ok_or("label without `=`")?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated escape".into()),
                },
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 3
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 4
vllm:ttft_bucket{engine="0",model_name="m",le="+Inf"} 7
weird{path="a\"b\\c",x="1"} 1.5e-3 1700000000000
no_labels NaN
"#;

    #[test]
    fn parses_names_labels_and_values() {
        let m = Metrics::parse(PAGE).unwrap();
        assert_eq!(m.value("vllm:num_requests_running"), 2.0);
        assert_eq!(m.value("vllm:request_success_total"), 7.0);
        assert_eq!(
            m.get(
                "vllm:request_success_total",
                &[("finished_reason", "length")]
            ),
            Some(4.0)
        );
        assert_eq!(m.get("vllm:ttft_bucket", &[("le", "+Inf")]), Some(7.0));
        assert_eq!(m.get("weird", &[("path", "a\"b\\c")]), Some(1.5e-3));
        assert!(m.value("no_labels").is_nan());
        assert_eq!(m.get("absent", &[]), None);
        assert_eq!(m.get("vllm:num_requests_running", &[("engine", "1")]), None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Metrics::parse("metric{a=1} 2").is_err());
        assert!(Metrics::parse("metric{a=\"1\"} two").is_err());
        assert!(Metrics::parse("metric").is_err());
    }
}
