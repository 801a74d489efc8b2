//! Reading corpora: directories of `.txt`, `.json` and `.jsonl` files, as
//! MedicalGPT and LLaMA-Factory read them. Every error names the file and line.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// How text is taken out of files.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// `.txt`: keep each line's trailing `\n` (HF `keep_linebreaks`).
    pub keep_linebreaks: bool,
    /// `.json`/`.jsonl`: the field holding the text.
    pub text_field: String,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            keep_linebreaks: true,
            text_field: "text".into(),
        }
    }
}

/// One document: a non-empty line of a `.txt` file or one JSON record.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// 1-based line of the record in its file.
    pub line: u32,
    pub text: String,
}

/// A corpus file and what was read from it.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub bytes: u64,
    /// sha256 of the contents, for the dataset cache key.
    pub digest: String,
    pub documents: Vec<Document>,
}

const EXTENSIONS: [&str; 3] = ["txt", "json", "jsonl"];

/// The corpus files under `dir`, recursively, sorted by path (or `dir`
/// itself when it is a corpus file). Symbolic links to directories are
/// followed once; a loop is not followed twice.
pub fn discover(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.is_file() && has_corpus_extension(dir) {
        return Ok(vec![dir.to_path_buf()]);
    }
    if !dir.is_dir() {
        bail!(
            "{}: no such directory (give a directory of .txt, .json or .jsonl files, or one such file)",
            dir.display()
        );
    }
    let mut files = Vec::new();
    let mut visited = HashSet::new();
    walk(dir, &mut files, &mut visited)?;
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no .txt, .json or .jsonl files found (searched recursively)",
            dir.display()
        );
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, visited: &mut HashSet<PathBuf>) -> Result<()> {
    let canonical = dir
        .canonicalize()
        .with_context(|| format!("{}: cannot resolve directory", dir.display()))?;
    if !visited.insert(canonical) {
        return Ok(());
    }
    let entries =
        fs::read_dir(dir).with_context(|| format!("{}: cannot list directory", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("{}: cannot list directory", dir.display()))?
            .path();
        if path.is_dir() {
            walk(&path, files, visited)?;
        } else if has_corpus_extension(&path) {
            files.push(path);
        }
    }
    Ok(())
}

fn has_corpus_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e))
}

/// Reads one corpus file into documents.
pub fn read_file(path: &Path, options: &ReadOptions) -> Result<SourceFile> {
    use sha2::{Digest, Sha256};
    let bytes = fs::read(path).with_context(|| format!("{}: cannot read file", path.display()))?;
    let digest = hex::encode(Sha256::digest(&bytes));
    let text = decode_utf8(path, &bytes)?;
    let documents = match path.extension().and_then(|e| e.to_str()) {
        Some("txt") => read_txt(text, options.keep_linebreaks),
        Some("json") if text.trim_start().starts_with('[') => {
            read_json_array(path, text, &options.text_field)?
        }
        _ => read_json_lines(path, text, &options.text_field)?,
    };
    Ok(SourceFile {
        path: path.to_path_buf(),
        bytes: bytes.len() as u64,
        digest,
        documents,
    })
}

/// The file as UTF-8 without a byte-order mark; invalid bytes are an error that
/// names the line.
fn decode_utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow::anyhow!(
            "{}:{line}: invalid UTF-8 at byte {}; convert the file to UTF-8 (e.g. `iconv -f GB18030 -t UTF-8`)",
            path.display(),
            e.valid_up_to()
        )
    })
}

/// Each non-empty line is a document; CRLF and CR line ends become `\n`.
fn read_txt(text: &str, keep_linebreaks: bool) -> Vec<Document> {
    let mut documents = Vec::new();
    for (index, raw) in text.split_inclusive('\n').enumerate() {
        let ended = raw.ends_with('\n');
        let body = raw.trim_end_matches('\n').trim_end_matches('\r');
        if body.is_empty() {
            continue;
        }
        let mut text = body.replace('\r', "\n");
        if ended && keep_linebreaks {
            text.push('\n');
        }
        documents.push(Document {
            line: index as u32 + 1,
            text,
        });
    }
    documents
}

fn text_of(path: &Path, line: usize, value: serde_json::Value, field: &str) -> Result<String> {
    match value {
        serde_json::Value::Object(mut map) => match map.remove(field) {
            Some(serde_json::Value::String(text)) => Ok(text),
            Some(other) => bail!(
                "{}:{line}: field `{field}` is not a string but {other}",
                path.display()
            ),
            None => {
                let keys: Vec<_> = map.keys().map(String::as_str).collect();
                bail!(
                    "{}:{line}: record has no `{field}` field (it has: {}); pass --text_field to choose another",
                    path.display(),
                    keys.join(", ")
                )
            }
        },
        other => bail!(
            "{}:{line}: expected a JSON object, found {other}",
            path.display()
        ),
    }
}

fn read_json_lines(path: &Path, text: &str, field: &str) -> Result<Vec<Document>> {
    let mut documents = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!("{}:{}: malformed JSON: {e}", path.display(), index + 1)
        })?;
        let text = text_of(path, index + 1, value, field)?;
        if !text.is_empty() {
            documents.push(Document {
                line: index as u32 + 1,
                text,
            });
        }
    }
    Ok(documents)
}

/// A `.json` file holding one array of records; a record's line is where it starts.
fn read_json_array(path: &Path, text: &str, field: &str) -> Result<Vec<Document>> {
    let line_at = |offset: usize| text[..offset].matches('\n').count() + 1;
    let values: Vec<serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| anyhow::anyhow!("{}:{}: malformed JSON: {e}", path.display(), e.line()))?;
    // serde_json does not report offsets of array items; find each record's
    // opening brace by scanning, which is exact for arrays of objects.
    let mut starts = Vec::with_capacity(values.len());
    let mut depth = 0i32;
    let (mut in_string, mut escaped) = (false, false);
    for (offset, c) in text.char_indices() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (true, false, _) => {}
            (false, _, '"') => in_string = true,
            (false, _, '{' | '[') => {
                if depth == 1 {
                    starts.push(offset);
                }
                depth += 1;
            }
            (false, _, '}' | ']') => depth -= 1,
            _ => {}
        }
    }
    let mut documents = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        let line = starts.get(i).map_or(1, |&o| line_at(o));
        let text = text_of(path, line, value, field)?;
        if !text.is_empty() {
            documents.push(Document {
                line: line as u32,
                text,
            });
        }
    }
    Ok(documents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn txt_lines_keep_newlines_and_crlf_is_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a.txt",
            b"\xEF\xBB\xBFfirst\r\n\r\n  \nsecond\nlast",
        );
        let file = read_file(&path, &ReadOptions::default()).unwrap();
        let docs: Vec<_> = file
            .documents
            .iter()
            .map(|d| (d.line, d.text.as_str()))
            .collect();
        assert_eq!(
            docs,
            [(1, "first\n"), (3, "  \n"), (4, "second\n"), (5, "last")]
        );
        let no_breaks = ReadOptions {
            keep_linebreaks: false,
            ..ReadOptions::default()
        };
        assert_eq!(
            read_file(&path, &no_breaks).unwrap().documents[0].text,
            "first"
        );
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a.jsonl",
            b"{\"text\": \"ok\"}\n\n{\"text\": oops}\n",
        );
        let err = format!(
            "{:#}",
            read_file(&path, &ReadOptions::default()).unwrap_err()
        );
        assert!(err.contains("a.jsonl:3: malformed JSON"), "{err}");
        let path = write(
            dir.path(),
            "b.jsonl",
            b"{\"text\": \"ok\"}\n{\"content\": \"x\"}\n",
        );
        let err = format!(
            "{:#}",
            read_file(&path, &ReadOptions::default()).unwrap_err()
        );
        assert!(
            err.contains("b.jsonl:2: record has no `text` field (it has: content)"),
            "{err}"
        );
    }

    #[test]
    fn json_arrays_report_each_record_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a.json",
            b"[\n {\"text\": \"one {\"},\n {\"text\": \"two\"},\n {\"text\": 3}\n]",
        );
        let err = format!(
            "{:#}",
            read_file(&path, &ReadOptions::default()).unwrap_err()
        );
        assert!(
            err.contains("a.json:4: field `text` is not a string"),
            "{err}"
        );
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "gbk.txt", b"ok\nstill ok\n\xD6\xD0\xCE\xC4\n");
        let err = format!(
            "{:#}",
            read_file(&path, &ReadOptions::default()).unwrap_err()
        );
        assert!(err.contains("gbk.txt:3: invalid UTF-8"), "{err}");
    }

    #[test]
    fn discovery_is_recursive_sorted_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "b.txt", b"x");
        write(dir.path(), "sub/a.jsonl", b"");
        write(dir.path(), "notes.md", b"x");
        write(dir.path(), "a.json", b"[]");
        let found: Vec<_> = discover(dir.path())
            .unwrap()
            .into_iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().to_owned())
            .collect();
        assert_eq!(
            found,
            [
                PathBuf::from("a.json"),
                "b.txt".into(),
                "sub/a.jsonl".into()
            ]
        );
        let err = discover(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing: no such directory"), "{err}");
    }
}
