//! Where things are in the file: an index from key paths (`routes[1].header`)
//! to byte spans, built from `toml_edit`'s span-preserving parse, plus byte
//! offset → line/column.
//!
//! Validation works on plain serde structs and asks this index where a key
//! was written, so the structs need no `Spanned` wrappers and `${VAR}`
//! expansion cannot lose a value's position.

use std::ops::Range;
use toml_edit::{ImDocument, Item, Table, Value};

#[derive(Debug, Clone)]
struct Entry {
    path: String,
    /// The key as written (`credential` in `credential = "x"`); none for
    /// array elements.
    key: Option<Range<usize>>,
    /// The value, or a table's `[header]`.
    value: Option<Range<usize>>,
    /// What to blank to drop this entry from the text (see `mask`).
    blank: Vec<Range<usize>>,
}

/// Key path → location, for one parsed document.
#[derive(Debug, Default)]
pub struct Index {
    entries: Vec<Entry>,
}

impl Index {
    pub fn build(doc: &ImDocument<&str>) -> Index {
        let mut index = Index::default();
        index.table(doc.as_table(), "");
        index
    }

    /// Where to point for `path`: the value, else the key, else the nearest
    /// ancestor that has a position (a missing key points at its table).
    pub fn offset_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(e) = self.entries.iter().find(|e| e.path == p) {
                if let Some(r) = e.value.as_ref().or(e.key.as_ref()) {
                    return Some(r.start);
                }
            }
            p = parent(p)?;
        }
    }

    /// The key path of the innermost entry written at `offset` (for serde's
    /// errors, which carry a span but no path).
    pub fn path_at(&self, offset: usize) -> Option<&str> {
        self.entries
            .iter()
            .filter(|e| {
                e.key.as_ref().is_some_and(|r| r.contains(&offset))
                    || e.value.as_ref().is_some_and(|r| r.contains(&offset))
            })
            .max_by_key(|e| e.path.len())
            .map(|e| e.path.as_str())
    }

    /// The byte ranges that, blanked, remove the entry at `path`.
    pub fn blank_of(&self, path: &str) -> Vec<Range<usize>> {
        self.entries
            .iter()
            .find(|e| e.path == path)
            .map(|e| e.blank.clone())
            .unwrap_or_default()
    }

    /// The byte ranges that, blanked, remove the innermost line-level entry
    /// containing `offset`. Empty when there is none.
    pub fn blank_at(&self, offset: usize) -> Vec<Range<usize>> {
        self.entries
            .iter()
            .filter(|e| !e.blank.is_empty() && e.blank.iter().any(|r| r.contains(&offset)))
            .max_by_key(|e| e.path.len())
            .map(|e| e.blank.clone())
            .unwrap_or_default()
    }

    fn table(&mut self, t: &Table, prefix: &str) {
        for (k, item) in t.iter() {
            let path = join(prefix, k);
            let key_span = t.key(k).and_then(|k| k.span());
            self.item(item, path, key_span);
        }
    }

    fn item(&mut self, item: &Item, path: String, key: Option<Range<usize>>) {
        match item {
            Item::None => {}
            Item::Value(v) => {
                let value = v.span();
                // A `key = value` line: blank from the key to the value's end.
                let blank = match (&key, &value) {
                    (Some(k), Some(v)) => std::iter::once(k.start..v.end).collect(),
                    _ => Vec::new(),
                };
                self.entries.push(Entry {
                    path: path.clone(),
                    key,
                    value,
                    blank,
                });
                self.value_children(v, &path);
            }
            Item::Table(t) => {
                let blank = table_blank(t);
                self.entries.push(Entry {
                    path: path.clone(),
                    key,
                    value: t.span(),
                    blank,
                });
                self.table(t, &path);
            }
            Item::ArrayOfTables(a) => {
                let mut all = Vec::new();
                for (i, t) in a.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    let blank = table_blank(t);
                    all.extend(blank.iter().cloned());
                    self.entries.push(Entry {
                        path: p.clone(),
                        key: None,
                        value: t.span(),
                        blank,
                    });
                    self.table(t, &p);
                }
                self.entries.push(Entry {
                    path,
                    key,
                    value: a.iter().next().and_then(|t| t.span()),
                    blank: all,
                });
            }
        }
    }

    /// Elements of arrays and keys of inline tables: located, never blanked
    /// on their own (that could leave `[1, , 2]` behind).
    fn value_children(&mut self, v: &Value, path: &str) {
        match v {
            Value::Array(a) => {
                for (i, el) in a.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    self.entries.push(Entry {
                        path: p.clone(),
                        key: None,
                        value: el.span(),
                        blank: Vec::new(),
                    });
                    self.value_children(el, &p);
                }
            }
            Value::InlineTable(t) => {
                for (k, el) in t.iter() {
                    let p = join(path, k);
                    self.entries.push(Entry {
                        path: p.clone(),
                        key: t.key(k).and_then(|k| k.span()),
                        value: el.span(),
                        blank: Vec::new(),
                    });
                    self.value_children(el, &p);
                }
            }
            _ => {}
        }
    }
}

/// A standard table's header and every line written under it.
fn table_blank(t: &Table) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = t.span().into_iter().collect();
    for (k, item) in t.iter() {
        match item {
            Item::Value(v) => {
                if let (Some(ks), Some(vs)) = (t.key(k).and_then(|k| k.span()), v.span()) {
                    out.push(ks.start..vs.end);
                }
            }
            // Dotted keys (`a.b = 1`) are implicit tables without a header.
            Item::Table(sub) if sub.is_dotted() => out.extend(table_blank(sub)),
            _ => {}
        }
    }
    out
}

fn join(prefix: &str, key: &str) -> String {
    let key = if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}.{key}")
    }
}

/// `a.b[2].c` → `a.b[2]` → `a.b` → `a` → none.
fn parent(path: &str) -> Option<&str> {
    if path.ends_with(']') {
        return path.rfind('[').map(|i| &path[..i]);
    }
    path.rfind('.').map(|i| &path[..i])
}

/// The key path as `validate` spells it (shared with `Index`).
pub fn key_path(prefix: &str, key: &str) -> String {
    join(prefix, key)
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// `text` with `ranges` overwritten by spaces (newlines kept), so every other
/// byte keeps its offset and line.
pub fn mask(text: &str, ranges: &[Range<usize>]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for r in ranges {
        let end = r.end.min(bytes.len());
        for b in bytes.iter_mut().take(end).skip(r.start) {
            if *b != b'\n' {
                *b = b' ';
            }
        }
    }
    // Whole UTF-8 sequences are overwritten (spans fall on char boundaries),
    // so this cannot fail; fall back to the original to stay panic-free.
    String::from_utf8(bytes).unwrap_or_else(|_| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[server]\nlisten = [\"a\", \"b\"]\n\n[[routes]]\npath_prefix = \"/x\"\n\n[[routes]]\nheader = { a = 1 }\n";

    #[test]
    fn finds_paths_and_offsets() {
        let doc = ImDocument::parse(DOC).unwrap();
        let idx = Index::build(&doc);
        assert_eq!(
            line_col(DOC, idx.offset_of("server.listen[1]").unwrap()),
            (2, 16)
        );
        assert_eq!(
            line_col(DOC, idx.offset_of("routes[0].path_prefix").unwrap()),
            (5, 15)
        );
        // Missing key: points at its table header.
        assert_eq!(
            line_col(DOC, idx.offset_of("routes[1].upstream").unwrap()),
            (7, 1)
        );
        assert_eq!(
            idx.path_at(DOC.find("a = 1").unwrap()),
            Some("routes[1].header.a")
        );
        assert_eq!(
            idx.path_at(DOC.find("\"/x\"").unwrap()),
            Some("routes[0].path_prefix")
        );
    }

    #[test]
    fn masking_keeps_offsets() {
        let doc = ImDocument::parse(DOC).unwrap();
        let idx = Index::build(&doc);
        let ranges = idx.blank_at(DOC.find("a = 1").unwrap());
        let masked = mask(DOC, &ranges);
        assert_eq!(masked.len(), DOC.len());
        assert!(!masked.contains("header"));
        assert!(ImDocument::parse(masked.as_str()).is_ok());
    }

    #[test]
    fn line_col_counts_chars() {
        assert_eq!(line_col("ab\ncdé f", 8), (2, 5));
        assert_eq!(line_col("x", 0), (1, 1));
    }
}
