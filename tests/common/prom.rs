//! A small, strict reader of the Prometheus text exposition format (version 0.0.4), for asserting on
//! `GET /metrics` answers: it rejects what a Prometheus server would reject (bad names, bad label
//! escapes, unparseable values, a `TYPE` after its samples or twice, a family split into several
//! groups, duplicate series) and gives sample values back summed over labels.

use std::collections::HashSet;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A metric family: its `TYPE` (`untyped` without one), its `HELP`, and its samples in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

/// A parsed exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Exposition {
    pub families: Vec<Family>,
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse::<f64>().map_err(|_| format!("bad sample value {text:?}")).and_then(|v| {
            // Rust accepts "inf", "infinity" and "nan" in any case; Prometheus spells them as above.
            if v.is_finite() { Ok(v) } else { Err(format!("bad sample value {text:?}")) }
        }),
    }
}

/// The family a sample name belongs to, given the `TYPE`s declared so far.
fn family_of<'a>(sample: &'a str, families: &[Family]) -> &'a str {
    for (suffix, kinds) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"]),
        ("_count", &["histogram", "summary"]),
    ] {
        if let Some(base) = sample.strip_suffix(suffix)
            && families.iter().any(|f| f.name == base && kinds.contains(&f.kind.as_str()))
        {
            return base;
        }
    }
    sample
}

/// Splits `name{labels} value [timestamp]` into its parts.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ', '\t']).ok_or_else(|| format!("no value in {line:?}"))?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?} in {line:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels: Vec<(String, String)> = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let mut chars = after_brace.char_indices().peekable();
        let consumed = loop {
            while chars.peek().is_some_and(|(_, c)| *c == ' ' || *c == '\t') {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => break i + 1,
                Some(_) => {}
                None => return Err(format!("unterminated labels in {line:?}")),
            }
            let mut label = String::new();
            while let Some((_, c)) = chars.peek().copied() {
                if c == '=' || c == ' ' || c == '\t' {
                    break;
                }
                label.push(c);
                chars.next();
            }
            if !is_label_name(&label) {
                return Err(format!("bad label name {label:?} in {line:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('=') || chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("expected =\" after label {label:?} in {line:?}"));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("bad escape \\{other:?} in {line:?}")),
                    },
                    Some('\n') | None => return Err(format!("unterminated label value in {line:?}")),
                    Some(c) => value.push(c),
                }
            }
            if labels.iter().any(|(n, _)| *n == label) {
                return Err(format!("label {label:?} repeated in {line:?}"));
            }
            labels.push((label, value));
            match chars.next() {
                Some((_, ',')) => continue,
                Some((i, '}')) => break i + 1,
                _ => return Err(format!("expected , or }} in {line:?}")),
            }
        };
        rest = &after_brace[consumed..];
    }
    let mut fields = rest.split([' ', '\t']).filter(|f| !f.is_empty());
    let value = parse_value(fields.next().ok_or_else(|| format!("no value in {line:?}"))?)?;
    if let Some(timestamp) = fields.next() {
        timestamp.parse::<i64>().map_err(|_| format!("bad timestamp in {line:?}"))?;
    }
    if fields.next().is_some() {
        return Err(format!("trailing fields in {line:?}"));
    }
    if !rest.starts_with([' ', '\t']) {
        return Err(format!("no space before the value in {line:?}"));
    }
    Ok(Sample { name: name.to_string(), labels, value })
}

impl Exposition {
    /// Parses a whole exposition, or says what is wrong with it (and on which line).
    pub fn parse(text: &str) -> Result<Exposition, String> {
        if !text.is_empty() && !text.ends_with('\n') {
            return Err("the exposition must end with a line feed".into());
        }
        let mut families: Vec<Family> = Vec::new();
        let mut series: HashSet<(String, Vec<(String, String)>)> = HashSet::new();
        // Families whose group of lines has ended: none of their lines may come again.
        let mut closed: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut enter = |name: &str, families: &mut Vec<Family>, line_no: usize| -> Result<usize, String> {
            if current.as_deref() != Some(name) {
                if closed.contains(name) {
                    return Err(format!("line {line_no}: family {name} is split into several groups"));
                }
                if let Some(previous) = current.replace(name.to_string()) {
                    closed.insert(previous);
                }
            }
            Ok(match families.iter().position(|f| f.name == name) {
                Some(i) => i,
                None => {
                    families.push(Family {
                        name: name.to_string(),
                        kind: "untyped".into(),
                        help: None,
                        samples: Vec::new(),
                    });
                    families.len() - 1
                }
            })
        };
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            if line.trim().is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.trim_start().splitn(3, [' ', '\t']);
                let keyword = words.next().unwrap_or("");
                if keyword != "HELP" && keyword != "TYPE" {
                    continue; // an ordinary comment
                }
                let name = words.next().unwrap_or("");
                if !is_metric_name(name) {
                    return Err(format!("line {line_no}: bad metric name {name:?} in {line:?}"));
                }
                let rest = words.next().unwrap_or("");
                let i = enter(name, &mut families, line_no)?;
                let family = &mut families[i];
                if keyword == "HELP" {
                    if family.help.replace(rest.to_string()).is_some() {
                        return Err(format!("line {line_no}: second HELP for {name}"));
                    }
                    let mut chars = rest.chars();
                    while let Some(c) = chars.next() {
                        if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
                            return Err(format!("line {line_no}: bad escape in HELP {line:?}"));
                        }
                    }
                } else {
                    let kind = rest.trim();
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(format!("line {line_no}: unknown type {kind:?}"));
                    }
                    if !family.samples.is_empty() {
                        return Err(format!("line {line_no}: TYPE of {name} after its samples"));
                    }
                    if family.kind != "untyped" || text.lines().take(index).any(|l| is_type_line(l, name)) {
                        return Err(format!("line {line_no}: second TYPE for {name}"));
                    }
                    family.kind = kind.to_string();
                }
                continue;
            }
            let sample = parse_sample(line).map_err(|e| format!("line {line_no}: {e}"))?;
            let family_name = family_of(&sample.name, &families).to_string();
            let i = enter(&family_name, &mut families, line_no)?;
            let family = &mut families[i];
            if family.kind == "counter" && (sample.value.is_nan() || sample.value < 0.0) {
                return Err(format!("line {line_no}: counter {} is {}", sample.name, sample.value));
            }
            let mut key_labels = sample.labels.clone();
            key_labels.sort();
            if !series.insert((sample.name.clone(), key_labels)) {
                return Err(format!("line {line_no}: duplicate series {line:?}"));
            }
            family.samples.push(sample);
        }
        Ok(Exposition { families })
    }

    /// Every sample named exactly `name` (for a histogram, e.g. `x_bucket`).
    pub fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.families.iter().flat_map(|f| f.samples.iter()).filter(move |s| s.name == name)
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples(name).next().is_some()
    }

    /// The sum of every sample named `name`, over all label values; 0 if there is none.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples(name).map(|s| s.value).sum()
    }

    /// The sum of the samples named `name` whose label `label` is `value`.
    pub fn sum_where(&self, name: &str, label: &str, value: &str) -> f64 {
        self.samples(name).filter(|s| s.label(label) == Some(value)).map(|s| s.value).sum()
    }

    /// The family called `name`, if declared or sampled.
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// Every sample name, for failure messages.
    pub fn sample_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> =
            self.families.iter().flat_map(|f| f.samples.iter()).map(|s| s.name.as_str()).collect();
        names.dedup();
        names
    }
}

fn is_type_line(line: &str, name: &str) -> bool {
    line.strip_prefix('#').is_some_and(|c| {
        let mut words = c.split_whitespace();
        words.next() == Some("TYPE") && words.next() == Some(name)
    })
}

/// `GET path` on a keep-alive connection: the answer must be 200 with the Prometheus text content
/// type, and must parse.
pub fn scrape(conn: &mut super::wire::HttpConn, path: &str) -> Exposition {
    let response = conn.request("GET", path, &[], b"");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("Content-Type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let text = std::str::from_utf8(&response.body).expect("the exposition is UTF-8");
    Exposition::parse(text).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{text}"))
}
