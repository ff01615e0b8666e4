//! Scraping a daemon's metrics the way Prometheus does: one HTTP/1.1 GET
//! over a TCP stream, and a parser of the text exposition format (`# TYPE`
//! lines, samples `name{label="value",...} value`), so tests read the
//! numbers a real scrape gives instead of trusting the daemon's own code.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    /// Metric family name -> type (`counter`, `gauge`, `histogram`, ...).
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses the text format; any line it cannot read is an error.
    pub fn parse(text: &str) -> anyhow::Result<Exposition> {
        let mut out = Exposition::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                        bail!(
                            "line {}: a TYPE line without name and type: {line:?}",
                            n + 1
                        );
                    };
                    out.types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            out.samples
                .push(parse_sample(line).with_context(|| format!("line {}: {line:?}", n + 1))?);
        }
        Ok(out)
    }

    /// The value of the sample `name` whose labels are exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// The sum of the samples `name` carrying at least `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Whether a query may name `name`: a gauge's family, or a
    /// series of one (a counter's `_total`, a histogram's `_bucket`, `_sum`,
    /// `_count`), with its family's type checked.
    pub fn knows(&self, name: &str) -> bool {
        // A family's bare name is a series only for a gauge (or an untyped
        // family): Prometheus stores a counter as `_total`, a histogram as
        // its `_bucket`, `_sum` and `_count`.
        if self
            .types
            .get(name)
            .is_some_and(|t| t == "gauge" || t == "unknown")
        {
            return true;
        }
        let series = [
            ("_total", "counter"),
            ("_bucket", "histogram"),
            ("_sum", "histogram"),
            ("_count", "histogram"),
        ];
        series.iter().any(|(suffix, kind)| {
            name.strip_suffix(suffix)
                .and_then(|family| self.types.get(family))
                .is_some_and(|t| t == kind)
        })
    }
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| anyhow!("no value"))?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        bail!("bad metric name {name:?}");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, tail) = parse_labels(after)?;
        labels = parsed;
        rest = tail;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or_else(|| anyhow!("no value"))?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `k="v",k2="v2"}` → the labels and what follows the `}`.
fn parse_labels(mut s: &str) -> anyhow::Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches(',');
        if let Some(tail) = s.strip_prefix('}') {
            return Ok((labels, tail));
        }
        let eq = s.find('=').ok_or_else(|| anyhow!("label without '='"))?;
        let key = s[..eq].trim().to_owned();
        let mut chars = s[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            bail!("label {key} is not quoted");
        }
        let mut value = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => bail!("label {key}: escape at the end"),
                },
                '"' => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| anyhow!("label {key}: no closing quote"))?;
        labels.insert(key, value);
        s = &s[end..];
    }
}

/// `GET /metrics` from `addr` over plain HTTP/1.1: the body of a 200
/// answer (length-delimited or chunked).
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    scrape_over(stream).await
}

/// `GET /metrics` over `stream` (a TCP or TLS stream): the body of a 200
/// answer.
pub async fn scrape_over<S>(mut stream: S) -> anyhow::Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).context("the answer is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of the head in {text:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        bail!("answered {status:?}:\n{text}");
    }
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    if chunked {
        dechunk(body)
    } else {
        Ok(body.to_owned())
    }
}

fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("a chunk without its size line"))?;
        let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or_else(|| anyhow!("a short chunk"))?;
        out.push_str(chunk);
        body = rest
            .get(size..)
            .and_then(|r| r.strip_prefix("\r\n"))
            .ok_or_else(|| anyhow!("a chunk not ended by CRLF"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP ferry_route_refused Route requests refused, by reason.\n\
        # TYPE ferry_route_refused counter\n\
        ferry_route_refused_total{reason=\"at-capacity\"} 2\n\
        ferry_route_refused_total{reason=\"odd \\\"one\\\", a\\\\b\"} 1\n\
        # TYPE ferry_store_commit_seconds histogram\n\
        # UNIT ferry_store_commit_seconds seconds\n\
        ferry_store_commit_seconds_sum 0.25\n\
        ferry_store_commit_seconds_count 3\n\
        ferry_store_commit_seconds_bucket{le=\"+Inf\"} 3\n\
        # TYPE ferry_agents_connected gauge\n\
        ferry_agents_connected 1\n\
        # EOF\n";

    #[test]
    fn samples_labels_and_types_are_read() {
        let e = Exposition::parse(TEXT).expect("parse");
        assert_eq!(
            e.get("ferry_route_refused_total", &[("reason", "at-capacity")]),
            Some(2.0)
        );
        assert_eq!(
            e.get(
                "ferry_route_refused_total",
                &[("reason", "odd \"one\", a\\b")]
            ),
            Some(1.0)
        );
        assert_eq!(e.sum("ferry_route_refused_total", &[]), 3.0);
        assert_eq!(e.get("ferry_agents_connected", &[]), Some(1.0));
        assert_eq!(
            e.get("ferry_store_commit_seconds_bucket", &[("le", "+Inf")]),
            Some(3.0)
        );
        assert_eq!(e.get("ferry_agents_connected", &[("x", "y")]), None);
    }

    #[test]
    fn a_query_name_is_known_by_its_family_and_type() {
        let e = Exposition::parse(TEXT).expect("parse");
        assert!(e.knows("ferry_route_refused_total"));
        assert!(e.knows("ferry_store_commit_seconds_bucket"));
        assert!(e.knows("ferry_agents_connected"));
        // A gauge has no `_total`, a counter no `_bucket`.
        assert!(!e.knows("ferry_agents_connected_total"));
        assert!(!e.knows("ferry_route_refused_bucket"));
        assert!(!e.knows("ferry_nothing"));
    }

    #[test]
    fn broken_lines_are_errors() {
        for bad in [
            "ferry_x{a=\"1\" 2\n",
            "ferry_x{a=1} 2\n",
            "ferry_x\n",
            "ferry_x one\n",
            "# TYPE ferry_x\n",
        ] {
            assert!(Exposition::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").expect("dechunk"),
            "hello world"
        );
        assert!(dechunk("5\r\nhel").is_err());
    }
}
