//! Errors in the files users write (job files, proxy configs): the line,
//! the field and what is wrong, from TOML parsing, from serde and from
//! the checks that follow.

use std::fmt;
use std::ops::Range;

use serde::de::DeserializeOwned;

/// A file that cannot be used, with where and why.
#[derive(Clone, Debug, PartialEq)]
pub struct FileError {
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}, field `{}`: {}", self.field, self.message),
            None => write!(f, "field `{}`: {}", self.field, self.message),
        }
    }
}

impl std::error::Error for FileError {}

impl FileError {
    /// An error at `span` of `text` (the line is counted from it).
    pub fn at(
        text: &str,
        span: Option<Range<usize>>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> FileError {
        FileError { line: span.map(|s| line_of(text, s.start)), field: field.into(), message: message.into() }
    }
}

/// Parses TOML `text` into `T`; an error names the line and the field's
/// path (`services[0].retry.attempts`), or `(file)` for the file as a whole.
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, FileError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| from_toml(text, "", e))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        from_toml(text, &field, e.into_inner())
    })
}

fn from_toml(text: &str, field: &str, error: toml::de::Error) -> FileError {
    // Spanned values add a private segment to the path that means nothing to a user.
    let field = field.replace(".$__serde_spanned_private_value", "");
    let field = if field.is_empty() || field == "." { "(file)".to_owned() } else { field };
    FileError::at(text, error.span(), field, error.message().trim())
}

/// The 1-based line of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct File {
        name: toml::Spanned<String>,
        limits: Option<Limits>,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Limits {
        max: u32,
    }

    #[test]
    fn errors_name_line_and_field() {
        // (file, line, field, words of the message)
        let cases = [
            ("name = \"a\"\n[limits]\nmax = -1\n", Some(3), "limits.max", "invalid value"),
            ("name = \"a\"\nnmae = 1\n", Some(2), "nmae", "unknown field `nmae`"),
            ("name = 1\n", Some(1), "name", "invalid type"),
            ("name = \"a\n", Some(1), "(file)", "string"),
        ];
        for (text, line, field, words) in cases {
            let error = parse_toml::<File>(text).unwrap_err();
            assert_eq!((error.line, error.field.as_str()), (line, field), "{text:?}: {error}");
            assert!(error.message.contains(words), "{text:?}: {error}");
        }
    }

    #[test]
    fn lines_count_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 100), 3);
    }
}
