//! Every unknown key and wrong type of a TOML config file at once.
//!
//! serde stops at the first unknown key (`deny_unknown_fields`) or value of
//! the wrong type, so an operator would fix a config one mistake per run.
//! [`parse_all`] finds all of them without a second copy of the config
//! structs: it probes the raw config type with one key of the file at a
//! time (every field has a serde default, so a table of one key
//! deserializes when that key is known and well typed), descends into
//! tables whose own keys are at fault, names each problem by its dotted key
//! and line, then deserializes what is left so the caller's validation can
//! report the other fields' problems in the same message.

use serde::de::DeserializeOwned;

/// One key of the file that the config type refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyProblem {
    /// Its dotted path (`hooks.timeout`).
    pub key: String,
    /// Its line in the file (1-based), when known.
    pub line: Option<usize>,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} (line {line}): {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// A config file read as far as it could be.
#[derive(Debug)]
pub struct Parsed<T> {
    /// The config without the keys at fault (`None` only if even that
    /// cannot be read, e.g. a required field of a table is missing).
    pub value: Option<T>,
    /// Every key the config type refused, in file order.
    pub problems: Vec<KeyProblem>,
}

impl<T> Parsed<T> {
    /// Whether `field` (a dotted key, or the part of a validation message
    /// before its `:`) was already reported.
    pub fn reported(&self, field: &str) -> bool {
        self.problems.iter().any(|p| p.key == field)
    }
}

/// Most keys probed one by one: a config file is small; a huge one is cut
/// short rather than probed for ever.
const MAX_PROBES: usize = 10_000;

/// Parses `text` into `T` (a struct with container-level `#[serde(default)]`
/// and `deny_unknown_fields`), collecting every unknown key and every value
/// of the wrong type. A TOML syntax error is returned as is: past it
/// nothing can be read.
pub fn parse_all<T: DeserializeOwned>(text: &str) -> Result<Parsed<T>, toml::de::Error> {
    let table: toml::Table = toml::from_str(text)?;
    if let Ok(value) = deserialize::<T>(table.clone()) {
        return Ok(Parsed {
            value: Some(value),
            problems: Vec::new(),
        });
    }
    let mut found = Vec::new();
    let mut probes = 0;
    probe::<T>(&[], &table, &mut found, &mut probes);
    let mut rest = table;
    for (path, _) in &found {
        remove(&mut rest, path);
    }
    let doc = toml_edit::ImDocument::parse(text).ok();
    let mut problems: Vec<KeyProblem> = found
        .into_iter()
        .map(|(path, message)| KeyProblem {
            line: doc.as_ref().and_then(|d| line_of(d, text, &path)),
            key: path.join("."),
            message: readable(&message),
        })
        .collect();
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    Ok(Parsed {
        value: deserialize::<T>(rest).ok(),
        problems,
    })
}

fn deserialize<T: DeserializeOwned>(table: toml::Table) -> Result<T, toml::de::Error> {
    toml::Value::Table(table).try_into()
}

/// `value` at `path` inside otherwise empty tables.
fn wrap(path: &[String], value: toml::Value) -> toml::Table {
    let mut value = value;
    for key in path.iter().rev() {
        let mut t = toml::Table::new();
        t.insert(key.clone(), value);
        value = toml::Value::Table(t);
    }
    match value {
        toml::Value::Table(t) => t,
        // An empty path is only ever given with a table.
        _ => toml::Table::new(),
    }
}

/// Tries each key of `table` (found at `path`) alone; records the keys `T`
/// refuses, descending into tables that are known but hold bad keys.
fn probe<T: DeserializeOwned>(
    path: &[String],
    table: &toml::Table,
    found: &mut Vec<(Vec<String>, String)>,
    probes: &mut usize,
) {
    for (key, value) in table {
        *probes += 1;
        if *probes > MAX_PROBES {
            return;
        }
        let mut here = path.to_vec();
        here.push(key.clone());
        let Err(e) = deserialize::<T>(wrap(&here, value.clone())) else {
            continue;
        };
        if let toml::Value::Table(inner) = value {
            let empty = toml::Value::Table(toml::Table::new());
            if deserialize::<T>(wrap(&here, empty)).is_ok() {
                let before = found.len();
                probe::<T>(&here, inner, found, probes);
                if found.len() > before {
                    continue;
                }
            }
        }
        found.push((here, e.message().to_owned()));
    }
}

/// Removes the key at `path` from `table`.
fn remove(table: &mut toml::Table, path: &[String]) {
    match path {
        [] => {}
        [key] => {
            table.remove(key);
        }
        [key, rest @ ..] => {
            if let Some(toml::Value::Table(inner)) = table.get_mut(key) {
                remove(inner, rest);
            }
        }
    }
}

/// The line of the key at `path` in the parsed file.
fn line_of(doc: &toml_edit::ImDocument<&str>, text: &str, path: &[String]) -> Option<usize> {
    let (first, rest) = path.split_first()?;
    let (mut key, mut item) = doc.as_table().get_key_value(first)?;
    for segment in rest {
        (key, item) = item.as_table_like()?.get_key_value(segment)?;
    }
    let start = key.span()?.start;
    Some(text.get(..start)?.matches('\n').count() + 1)
}

/// serde's message for an unknown field, in the words of a config file.
fn readable(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    match rest.split_once("`, expected ") {
        Some((_, known)) => {
            let known = known.strip_prefix("one of ").unwrap_or(known);
            format!(
                "unknown key (known keys here: {})",
                known.replace(" or ", ", ").replace('`', "")
            )
        }
        None => "unknown key (no keys are known here)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Hooks {
        timeout: Option<String>,
        argv: Option<Vec<String>>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Price {
        month: String,
        hourly: String,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Raw {
        name: Option<String>,
        count: i64,
        hooks: Hooks,
        prices: std::collections::BTreeMap<String, Price>,
    }

    #[test]
    fn a_good_file_has_no_problems() {
        let p = parse_all::<Raw>("name = \"a\"\ncount = 2\n[hooks]\ntimeout = \"5s\"\n")
            .expect("parses");
        assert!(p.problems.is_empty());
        assert_eq!(p.value.expect("value").count, 2);
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_reported_with_its_line() {
        let text = "\
name = 5
nmae = \"typo\"
count = \"two\"

[hooks]
timeout = 30
argv = [\"ok\", 3]
extra = true

[prices.a]
month = \"1\"
hourly = \"2\"
[prices.b]
month = \"1\"
";
        let p = parse_all::<Raw>(text).expect("parses");
        let shown: Vec<String> = p.problems.iter().map(ToString::to_string).collect();
        let keys: Vec<(&str, Option<usize>)> = p
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            keys,
            [
                ("name", Some(1)),
                ("nmae", Some(2)),
                ("count", Some(3)),
                ("hooks.timeout", Some(6)),
                ("hooks.argv", Some(7)),
                ("hooks.extra", Some(8)),
                ("prices.b", Some(13)),
            ],
            "{shown:#?}"
        );
        assert!(shown[0].contains("invalid type: integer `5`"), "{shown:?}");
        assert!(
            shown[1].contains("unknown key (known keys here: name, count, hooks, prices)"),
            "{shown:?}"
        );
        assert!(
            shown[5].contains("known keys here: timeout, argv"),
            "{shown:?}"
        );
        assert!(shown[6].contains("missing field `hourly`"), "{shown:?}");
        // What was left is read: the caller validates it in the same pass.
        assert!(p.reported("hooks.timeout") && !p.reported("hooks"));
        let rest = p.value.expect("the rest parses");
        assert_eq!(rest.prices.len(), 1);
    }

    #[test]
    fn a_syntax_error_is_returned_as_is() {
        let err = parse_all::<Raw>("name = ").expect_err("syntax");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn a_whole_table_of_the_wrong_type_is_one_problem() {
        let p = parse_all::<Raw>("hooks = 3\ncount = 1\n").expect("parses");
        assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
        assert_eq!(p.problems[0].key, "hooks");
        assert_eq!(p.value.expect("rest").count, 1);
    }
}
