//! CSV as spreadsheets write it (RFC 4180): fields separated by commas,
//! records by CRLF or LF; a field in double quotes may hold commas, line
//! ends and doubled quotes (`""` is one `"`). A UTF-8 byte order mark at the
//! start (spreadsheets' "CSV UTF-8") is skipped, and so are empty lines
//! (a file's trailing blank lines, for one).
//!
//! A malformed record (a quote in the middle of an unquoted field, text
//! after a closing quote, a quote never closed) is an error naming its line
//! and column (both from 1, columns in characters), since the records after
//! it cannot be read reliably.

/// One record: its fields, and the line it starts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Line of the file the record starts on (from 1).
    pub line: usize,
    pub fields: Vec<String>,
}

/// A malformed record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct CsvError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// The byte order mark spreadsheets put at the start of UTF-8 CSV.
const BOM: char = '\u{feff}';

/// Where the reader is in a field.
#[derive(Clone, Copy)]
enum State {
    /// Nothing of the field read yet.
    FieldStart,
    /// In a field without quotes.
    Unquoted,
    /// In a quoted field opened at (line, column).
    Quoted(usize, usize),
    /// Just after a quote in the quoted field opened at (line, column): its
    /// end, or the first of `""`.
    AfterQuote(usize, usize),
}

/// Reads every record of `text`.
pub fn parse(text: &str) -> Result<Vec<Record>, CsvError> {
    let text = text.strip_prefix(BOM).unwrap_or(text);
    let err = |line, column, message: &str| CsvError {
        line,
        column,
        message: message.to_owned(),
    };
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut state = State::FieldStart;
    let (mut line, mut column, mut record_line) = (1usize, 0usize, 1usize);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        column += 1;
        let line_end = c == '\n' || c == '\r';
        let crlf = c == '\r' && chars.peek() == Some(&'\n');
        if crlf {
            chars.next();
        }
        state = match (state, c) {
            (State::Quoted(l, col), '"') => State::AfterQuote(l, col),
            (State::Quoted(l, col), c) => {
                field.push(c);
                if crlf {
                    // A CRLF inside quotes was read as one: keep both.
                    field.push('\n');
                }
                if line_end {
                    line += 1;
                    column = 0;
                }
                State::Quoted(l, col)
            }
            (State::AfterQuote(l, col), '"') => {
                field.push('"');
                State::Quoted(l, col)
            }
            (State::FieldStart, '"') => State::Quoted(line, column),
            (State::Unquoted, '"') => {
                return Err(err(
                    line,
                    column,
                    "a quote inside an unquoted field; put the whole field in quotes and \
                     write the quote twice (\"\")",
                ))
            }
            (_, ',') => {
                fields.push(std::mem::take(&mut field));
                State::FieldStart
            }
            (state, _) if line_end => {
                // A blank line (nothing read in the record) is skipped.
                if !(matches!(state, State::FieldStart) && fields.is_empty()) {
                    fields.push(std::mem::take(&mut field));
                    records.push(Record {
                        line: record_line,
                        fields: std::mem::take(&mut fields),
                    });
                }
                line += 1;
                column = 0;
                record_line = line;
                State::FieldStart
            }
            (State::AfterQuote(..), _) => {
                return Err(err(
                    line,
                    column,
                    "text after a closing quote; a quote inside a quoted field is written \
                     twice (\"\")",
                ))
            }
            (State::FieldStart | State::Unquoted, c) => {
                field.push(c);
                State::Unquoted
            }
        };
    }
    match state {
        State::Quoted(l, col) => {
            return Err(err(
                l,
                col,
                "this quote is never closed (a quoted field ends with a quote; a quote \
                 inside it is written twice: \"\")",
            ))
        }
        State::FieldStart if fields.is_empty() => {}
        _ => {
            fields.push(field);
            records.push(Record {
                line: record_line,
                fields,
            });
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Vec<Vec<String>> {
        parse(text)
            .expect("valid CSV")
            .into_iter()
            .map(|r| r.fields)
            .collect()
    }

    fn row(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn plain_records_with_lf_or_crlf_and_blank_lines() {
        let want = vec![row(&["id", "email"]), row(&["a", "a@x.cn"])];
        assert_eq!(fields("id,email\na,a@x.cn\n"), want);
        assert_eq!(fields("id,email\r\na,a@x.cn\r\n"), want);
        assert_eq!(fields("id,email\r\na,a@x.cn"), want);
        assert_eq!(fields("id,email\n\na,a@x.cn\n\n\r\n"), want);
        assert_eq!(fields(""), Vec::<Vec<String>>::new());
        assert_eq!(
            fields("a,,\n,b"),
            vec![row(&["a", "", ""]), row(&["", "b"])]
        );
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        assert_eq!(fields("\u{feff}id,email\r\n"), vec![row(&["id", "email"])]);
    }

    #[test]
    fn quoted_fields_hold_commas_quotes_and_line_ends() {
        let records = parse("id,name\n\"a\",\"Li, \"\"Bo\"\"\"\n\"b\",\"two\r\nlines\"\n\"\",x\n")
            .expect("valid");
        assert_eq!(records[1].fields, row(&["a", "Li, \"Bo\""]));
        assert_eq!(records[2].fields, row(&["b", "two\r\nlines"]));
        assert_eq!(records[2].line, 3);
        assert_eq!(records[3].fields, row(&["", "x"]));
        assert_eq!(records[3].line, 5, "after a line end inside quotes");
    }

    #[test]
    fn malformed_records_name_their_line_and_column() {
        let e = parse("id,email\nab\"c,d\n").expect_err("quote in a plain field");
        assert_eq!((e.line, e.column), (2, 3), "{e}");
        let e = parse("id,email\n\"ab\"c,d\n").expect_err("text after a quote");
        assert_eq!((e.line, e.column), (2, 5), "{e}");
        assert!(e
            .to_string()
            .starts_with("line 2, column 5: text after a closing quote"));
        let e = parse("id,email\nx,\"never closed\n").expect_err("unterminated");
        assert_eq!((e.line, e.column), (2, 3), "{e}");
        assert!(e.message.contains("never closed"), "{e}");
    }
}
