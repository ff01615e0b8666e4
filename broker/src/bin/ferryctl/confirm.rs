//! Asking an operator before a change that cannot be undone.

use anyhow::Context;

use crate::Usage;

/// Asks `question` on the terminal and goes on only on `y` or `yes`. Without
/// a terminal on standard input it refuses (a usage error) and says to add
/// `--yes`: a script must say so.
pub(crate) fn confirm(question: &str, command: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(Usage(format!(
            "{command} asks for confirmation and standard input is not a terminal: add --yes \
             to go ahead ({question})"
        ))
        .into());
    }
    let stdin = std::io::stdin();
    let yes =
        ask(question, &mut stdin.lock(), &mut std::io::stderr()).context("read the answer")?;
    if yes {
        Ok(())
    } else {
        anyhow::bail!("{command}: not confirmed; nothing was changed")
    }
}

/// Writes `question [y/N] ` to `out`, reads one line from `input`: true on
/// `y` or `yes` (any case), false on anything else or end of input.
fn ask(
    question: &str,
    input: &mut impl std::io::BufRead,
    out: &mut impl std::io::Write,
) -> std::io::Result<bool> {
    write!(out, "{question} [y/N] ")?;
    out.flush()?;
    let mut line = String::new();
    input.read_line(&mut line)?;
    Ok(matches!(
        line.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ask_goes_on_only_on_y_or_yes() {
        for (answer, want) in [
            ("y\n", true),
            ("YES\n", true),
            (" yes \r\n", true),
            ("n\n", false),
            ("\n", false),
            ("", false),
            ("yess\n", false),
        ] {
            let mut out = Vec::new();
            let got = ask("purge group g?", &mut answer.as_bytes(), &mut out).expect("ask");
            assert_eq!(got, want, "{answer:?}");
            assert_eq!(String::from_utf8_lossy(&out), "purge group g? [y/N] ");
        }
    }
}
