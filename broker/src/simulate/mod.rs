//! `ferryctl simulate`: replays a scenario file (SPEC section 7) through the
//! delivery-group engine on a virtual clock: no network, no disk besides the
//! scenario itself, no wall clock.
//!
//! The replay follows SPEC 5.5 at every instant: provider completions and engine
//! deadlines due first (one evaluation), then each event in file order, each
//! followed by its evaluation.

mod compare;
mod picture;
mod replay;
mod report;
mod scenario;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

pub use compare::{counts, difference, Counts};
pub use picture::{timeline, Side, CHART_HEIGHT, CHART_WIDTH, SERIES};
pub use replay::{replay, Happening, Outcome, Row};
pub use report::{render_json, render_table};
pub use scenario::{
    parse, Event, EventKind, Provider, Scenario, MAX_SCENARIO_BYTES, MAX_SCENARIO_EVENTS,
    MAX_SCENARIO_PERIOD,
};

/// One problem in a scenario file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line the problem is on.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Why a scenario could not be simulated. Display names the file, and the line
/// wherever there is one.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{}: cannot read the scenario: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: the file is larger than the limit of {max} bytes for a scenario", file.display())]
    TooLarge { file: PathBuf, max: u64 },
    /// Every problem found while checking the file, sorted by line.
    #[error("{}", InvalidDisplay { file, problems })]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
    /// An event that cannot happen in the state the replay reached.
    #[error("{}:{line}: {message}", file.display())]
    Replay {
        file: PathBuf,
        line: usize,
        message: String,
    },
    /// `--compare` of scenarios whose events (or period, provider,
    /// currency) differ: they are not two policies over the same events.
    #[error(
        "{} and {} cannot be compared: {message}; --compare replays two policies over the same \
         events: only [group], the [pricing] prices and [policy] may differ",
        a.display(),
        b.display()
    )]
    NotComparable {
        a: PathBuf,
        b: PathBuf,
        message: String,
    },
    #[error("{}: cannot render JSON: {source}", file.display())]
    Json {
        file: PathBuf,
        source: serde_json::Error,
    },
}

struct InvalidDisplay<'a> {
    file: &'a Path,
    problems: &'a [Problem],
}

impl fmt::Display for InvalidDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}:{}: {}", self.file.display(), p.line, p.message)?;
        }
        Ok(())
    }
}

/// Reads the scenario file at `path`, at most [`MAX_SCENARIO_BYTES`].
pub fn load(path: &Path) -> Result<Scenario, SimError> {
    let read_err = |source| SimError::Read {
        file: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_SCENARIO_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_SCENARIO_BYTES {
        return Err(SimError::TooLarge {
            file: path.to_owned(),
            max: MAX_SCENARIO_BYTES,
        });
    }
    let text = String::from_utf8(bytes).map_err(|e| SimError::Invalid {
        file: path.to_owned(),
        problems: vec![Problem {
            line: scenario::line_of(
                &String::from_utf8_lossy(e.as_bytes()),
                e.utf8_error().valid_up_to(),
            ),
            message: "the file is not UTF-8".into(),
        }],
    })?;
    parse(path, &text)
}

/// Runs the scenario in `path` and returns what `ferryctl simulate` prints: the
/// readable table, or with `json` the JSON object of SPEC section 7. No trailing
/// newline.
pub fn run_cli(path: &Path, json: bool) -> Result<String, SimError> {
    let scenario = load(path)?;
    let outcome = replay(path, &scenario)?;
    if json {
        render_json(&scenario, &outcome).map_err(|source| SimError::Json {
            file: path.to_owned(),
            source,
        })
    } else {
        Ok(render_table(&scenario, &outcome))
    }
}

/// Which pictures to make besides the usual output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pictures {
    /// A self-contained HTML page (`--html`).
    pub html: bool,
    /// An SVG document (`--svg`).
    pub svg: bool,
}

/// What `ferryctl simulate` makes: what it prints, and the pictures asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// What is printed: exactly [`run_cli`]'s output (or the comparison).
    pub output: String,
    /// The HTML page, when asked for.
    pub html: Option<String>,
    /// The SVG document, when asked for.
    pub svg: Option<String>,
}

fn json_err(path: &Path) -> impl FnOnce(serde_json::Error) -> SimError + '_ {
    move |source| SimError::Json {
        file: path.to_owned(),
        source,
    }
}

/// [`run_cli`] with the pictures asked for: the scenario's timeline as SVG
/// and as an HTML page. What is printed is unchanged.
pub fn run_with_pictures(path: &Path, json: bool, pictures: Pictures) -> Result<Run, SimError> {
    let scenario = load(path)?;
    let outcome = replay(path, &scenario)?;
    let output = if json {
        render_json(&scenario, &outcome).map_err(json_err(path))?
    } else {
        render_table(&scenario, &outcome)
    };
    let file = path.display().to_string();
    Ok(Run {
        output,
        html: pictures
            .html
            .then(|| picture::html(&scenario, &outcome, &file)),
        svg: pictures
            .svg
            .then(|| picture::svg(&scenario, &outcome, &file)),
    })
}

/// `ferryctl simulate A --compare B`: both replayed, compared as a table
/// (or JSON), with the pictures asked for. Refused, naming the first
/// difference, unless both have the same period, provider, currency and
/// events.
pub fn compare_cli(a: &Path, b: &Path, json: bool, pictures: Pictures) -> Result<Run, SimError> {
    let (sa, sb) = (load(a)?, load(b)?);
    let (fa, fb) = (a.display().to_string(), b.display().to_string());
    if let Some(message) = compare::difference(&sa, &fa, &sb, &fb) {
        return Err(SimError::NotComparable {
            a: a.to_owned(),
            b: b.to_owned(),
            message,
        });
    }
    let (oa, ob) = (replay(a, &sa)?, replay(b, &sb)?);
    let text = compare::render_text((&fa, &sa, &oa), (&fb, &sb, &ob));
    let output = if json {
        compare::render_json((&fa, &sa, &oa), (&fb, &sb, &ob)).map_err(json_err(a))?
    } else {
        text.clone()
    };
    let side_a = Side {
        file: &fa,
        scenario: &sa,
        outcome: &oa,
    };
    let side_b = Side {
        file: &fb,
        scenario: &sb,
        outcome: &ob,
    };
    Ok(Run {
        output,
        html: pictures
            .html
            .then(|| picture::compare_html(&side_a, &side_b, &text)),
        svg: pictures.svg.then(|| picture::compare_svg(&side_a, &side_b)),
    })
}

#[cfg(test)]
mod tests;
