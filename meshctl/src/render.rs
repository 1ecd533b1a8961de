//! Listings as tables or JSON. A table keeps each row's columns in order
//! and cuts long texts; `-o json` is an array of objects with every field
//! whole.

use std::time::SystemTime;

use serde_json::{json, Value};

use crate::cli::Output;

/// Rows of a listing; each keeps its columns in the order shown.
pub type Rows = Vec<Vec<(&'static str, Value)>>;

pub fn print_rows(output: Output, rows: &Rows) {
    // A closed pipe (`meshctl get instances | head`) ends the output quietly.
    let _ = write_rows(&mut std::io::stdout().lock(), output, rows);
}

/// The widest a table cell gets, in characters.
const MAX_CELL: usize = 40;

pub fn write_rows(out: &mut impl std::io::Write, output: Output, rows: &Rows) -> std::io::Result<()> {
    if output == Output::Json {
        let objects: Vec<serde_json::Map<String, Value>> =
            rows.iter().map(|r| r.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()).collect();
        return writeln!(out, "{}", serde_json::to_string_pretty(&objects).unwrap_or_else(|_| "[]".into()));
    }
    let Some(first) = rows.first() else {
        return writeln!(out, "(none)");
    };
    let columns: Vec<&str> = first.iter().map(|(k, _)| *k).collect();
    // A long text is cut in tables (`-o json` has it whole).
    let cell = |value: &Value| match value {
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) if s.chars().count() > MAX_CELL => {
            format!("{}…", s.chars().take(MAX_CELL - 1).collect::<String>())
        }
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| rows.iter().map(|r| cell(&r[i].1).chars().count()).max().unwrap_or(0).max(c.len()))
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(columns.iter().map(|c| c.to_uppercase()).collect()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(|(_, v)| cell(v)).collect()))?;
    }
    Ok(())
}

/// Milliseconds from `unix_ms` until now.
pub fn ago(unix_ms: u64) -> Value {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    json!(now.saturating_sub(unix_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(output: Output, rows: &Rows) -> String {
        let mut out = Vec::new();
        write_rows(&mut out, output, rows).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn tables_align_columns_and_mark_what_is_missing() {
        let long = "x".repeat(50);
        let rows: Rows = vec![
            vec![("name", json!("web")), ("ready", json!(true)), ("note", json!(""))],
            vec![("name", json!("checkout")), ("ready", json!(false)), ("note", json!(null))],
            vec![("name", json!(long)), ("ready", json!(true)), ("note", json!("a reason"))],
        ];
        let cut = format!("{}…", "x".repeat(MAX_CELL - 1));
        let expected = [
            format!("{:w$}  READY  NOTE", "NAME", w = MAX_CELL),
            format!("{:w$}  true   -", "web", w = MAX_CELL),
            format!("{:w$}  false  -", "checkout", w = MAX_CELL),
            format!("{cut}  true   a reason"),
        ];
        assert_eq!(render(Output::Table, &rows), expected.join("\n") + "\n");
    }

    #[test]
    fn an_empty_listing_says_so() {
        assert_eq!(render(Output::Table, &Vec::new()), "(none)\n");
        assert_eq!(render(Output::Json, &Vec::new()), "[]\n");
    }

    #[test]
    fn json_keeps_every_field_whole() {
        let long = "y".repeat(80);
        let rows: Rows = vec![vec![("name", json!(long)), ("endpoints", json!(2)), ("note", json!(""))]];
        let text = render(Output::Json, &rows);
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, json!([{"name": long, "endpoints": 2, "note": ""}]));
    }
}
