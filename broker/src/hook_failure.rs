//! What the broker keeps of a host's text: every text field bounded and
//! cleaned as it enters ([`bounded`]), and of a failure message the tail of
//! a hook's output with its exit status, on one line ([`brief`]).
//!
//! An agent reports a failed hook as `<name> hook <program> failed
//! (<status>): <output>` (`agent/src/commands.rs`), where the output is
//! whatever the hook printed: many lines, terminal escapes, kilobytes. Group
//! events, `ota history` and `group show` are tables read by people, so
//! every failure text an agent sends goes through [`brief`] before it is
//! recorded: the last [`TAIL_LINES`] non-empty lines (usually where the
//! reason is), at most [`TAIL_BYTES`] bytes, control characters removed,
//! with the exit status kept apart. The full text is only in the host's own
//! log (the agent logs every failed command).

/// Lines of a hook's output that are kept.
pub const TAIL_LINES: usize = 3;

/// Most bytes of a hook's output that are kept (the end of the tail).
pub const TAIL_BYTES: usize = 300;

/// Most bytes kept of an exit status text (`exit status 3`, `killed by
/// signal 9 (SIGKILL)`).
const MAX_STATUS_LEN: usize = 64;

/// Marks text that was cut.
const CUT: &str = "…";

/// The failure as the broker records it: for a hook failure `<name> hook
/// failed (<status>): <tail of its output>`, anything else reduced to its
/// tail the same way. Always one line.
pub fn brief(text: &str) -> String {
    match split_hook_failure(text) {
        Some((hook, status, output)) => {
            let status = status_text(status);
            let tail = tail(output);
            if tail.is_empty() {
                format!("{hook} hook failed ({status})")
            } else {
                format!("{hook} hook failed ({status}): {tail}")
            }
        }
        None => tail(text),
    }
}

/// Agent-supplied text as the broker keeps it: the one cleaning applied to
/// every text field of a host's message where it enters (`crate::link`),
/// before anything is stored, shown or handed to a group's actor. Terminal
/// escape sequences, control characters and bidirectional-text overrides
/// are removed; with `multiline` line breaks are kept (as `\n`; a hook's
/// output, which [`brief`] cuts to its last lines), otherwise they and tabs
/// become spaces. At most `max` bytes: a one-line text keeps its start, a
/// multi-line one its start (where a hook failure names the hook and its
/// status) and its end (where the reason usually is), `…` marking the cut.
pub fn bounded(text: &str, max: usize, multiline: bool) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in strip_escapes(text).chars() {
        let c = match c {
            '\r' | '\n' if multiline => '\n',
            '\t' | '\n' | '\r' => ' ',
            c => c,
        };
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if (c.is_control() && c != '\n') || bidi {
            continue;
        }
        out.push(c);
    }
    if out.len() <= max {
        return out;
    }
    let start = |mut end: usize| {
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        end
    };
    let Some(budget) = max.checked_sub(CUT.len()) else {
        return out[..start(max)].to_owned();
    };
    let head_len = if multiline { budget / 4 } else { budget };
    let head = start(head_len);
    let mut tail = out.len() - (budget - head_len);
    while !out.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}{CUT}{}", &out[..head], &out[tail..])
}

/// `(hook name, status, output)` of an agent's hook failure message.
fn split_hook_failure(text: &str) -> Option<(&str, &str, &str)> {
    let (hook, rest) = text.split_once(" hook ")?;
    if hook.is_empty() || !hook.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return None;
    }
    let (_program, rest) = rest.split_once(" failed (")?;
    // The status may hold parentheses itself (`signal: 9 (SIGKILL)`); the
    // first `): ` closes it.
    match rest.split_once("): ") {
        Some((status, output)) => Some((hook, status, output)),
        None => rest.strip_suffix(')').map(|status| (hook, status, "")),
    }
}

/// `exit status: 3` -> `exit status 3`, `signal: 9 (SIGKILL)` -> `killed
/// by signal 9 (SIGKILL)`; anything else cleaned and bounded.
fn status_text(status: &str) -> String {
    let status = one_line(status);
    let out = if let Some(code) = status.strip_prefix("exit status: ") {
        format!("exit status {code}")
    } else if let Some(signal) = status.strip_prefix("signal: ") {
        format!("killed by signal {signal}")
    } else {
        status
    };
    keep_end(&out, MAX_STATUS_LEN)
}

/// The last [`TAIL_LINES`] non-empty lines of `text`, cleaned, joined with
/// ` | `, at most [`TAIL_BYTES`] bytes (the end is kept); `…` in front when
/// something was left out.
pub fn tail(text: &str) -> String {
    let lines: Vec<String> = strip_escapes(text)
        .split(['\n', '\r'])
        .map(one_line)
        .filter(|l| !l.is_empty())
        .collect();
    let skip = lines.len().saturating_sub(TAIL_LINES);
    let joined = lines[skip..].join(" | ");
    let kept = keep_end(&joined, TAIL_BYTES);
    if skip > 0 && !kept.starts_with(CUT) {
        format!("{CUT}{kept}")
    } else {
        kept
    }
}

/// The end of `s` in at most `max` bytes (plus the cut mark), on a
/// character boundary.
fn keep_end(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("{CUT}{}", s[start..].trim_start())
}

/// One line: tabs become spaces, other control characters go, runs of
/// spaces become one, ends trimmed.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let c = if c == '\t' || c == '\n' || c == '\r' {
            ' '
        } else {
            c
        };
        if c.is_control() {
            continue;
        }
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        out.push(c);
    }
    out.truncate(out.trim_end().len());
    out
}

/// Removes terminal escape sequences (`ESC [ ... final`, `ESC ] ... BEL`,
/// and two-character ones), which would leave their parameters behind once
/// the escape character itself is dropped.
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            // CSI: parameters and intermediates, then one final byte.
            Some('[') => {
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            // OSC: up to BEL or ESC \.
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                        chars.next();
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_failure_keeps_the_last_lines_and_the_exit_status() {
        let output: String = (1..=200)
            .map(|i| format!("step {i}: \u{1b}[31mfailed\u{1b}[0m\tdetail\n"))
            .collect();
        let text = format!("update hook /etc/ferry/hooks/update failed (exit status: 3): {output}");
        let b = brief(&text);
        assert_eq!(
            b,
            "update hook failed (exit status 3): …step 198: failed detail | \
             step 199: failed detail | step 200: failed detail"
        );
        assert!(b.len() <= TAIL_BYTES + 64, "{}", b.len());
        assert!(!b.chars().any(char::is_control), "{b:?}");
    }

    #[test]
    fn signals_empty_output_and_parentheses_in_the_status() {
        assert_eq!(
            brief("image hook /bin/img failed (signal: 9 (SIGKILL)): "),
            "image hook failed (killed by signal 9 (SIGKILL))"
        );
        assert_eq!(
            brief("policy hook /bin/sh failed (exit status: 5): streaming server refused it"),
            "policy hook failed (exit status 5): streaming server refused it"
        );
        // The output may hold the same words.
        assert_eq!(
            brief("warn hook w failed (exit status: 1): x failed (y): z"),
            "warn hook failed (exit status 1): x failed (y): z"
        );
    }

    #[test]
    fn other_texts_are_reduced_to_their_tail_on_one_line() {
        assert_eq!(
            brief("update hook /u did not finish within 1800s; it was killed"),
            "update hook /u did not finish within 1800s; it was killed"
        );
        assert_eq!(brief("a\n\nb\r\nc\nd\u{7}"), "…b | c | d");
        let long = "é".repeat(400);
        let b = brief(&long);
        assert!(
            b.starts_with(CUT) && b.len() <= TAIL_BYTES + CUT.len(),
            "{b}"
        );
        assert_eq!(brief(""), "");
    }

    #[test]
    fn agent_text_is_bounded_and_loses_escapes_and_control_characters() {
        let hostile = "\u{1b}[2J\u{1b}]0;owned\u{7}web\u{9b}31m-1\u{202e}\r\n\u{0}x\ty";
        assert_eq!(bounded(hostile, 255, false), "web31m-1  x y");
        assert_eq!(bounded(hostile, 255, true), "web31m-1\n\nx y");

        // One line keeps its start; many lines their start and their end.
        let long = format!("{}\u{1b}[1m{}", "a".repeat(100 * 1024), "z".repeat(10));
        let line = bounded(&long, 255, false);
        assert!(line.len() <= 255 && line.starts_with("aaa") && line.ends_with(CUT));
        let text = format!("update hook /x failed (exit status: 1): {long}\nthe reason");
        let lines = bounded(&text, 1024, true);
        assert!(lines.len() <= 1024, "{}", lines.len());
        assert!(lines.starts_with("update hook /x failed (exit status: 1): aaa"));
        assert!(lines.ends_with("zzzzzzzzzz\nthe reason"), "{lines}");
        let b = brief(&lines);
        assert!(
            b.starts_with("update hook failed (exit status 1): …"),
            "{b}"
        );
        assert!(b.ends_with("zzzzzzzzzz | the reason"), "{b}");

        // Multi-byte text is cut on character boundaries.
        let wide = "é".repeat(1000);
        assert!(bounded(&wide, 255, false).len() <= 255);
        assert!(bounded(&wide, 255, true).len() <= 255);
        assert_eq!(bounded("", 255, false), "");
        assert_eq!(bounded("abc", 1, false), "a");
    }
}
