//! Reading corpora: directories of `.txt`, `.json` and `.jsonl` files (also
//! gzip- or zstd-compressed: `.jsonl.gz`, `.txt.zst`, …) and Parquet files, as
//! MedicalGPT, LLaMA-Factory and HF datasets read them. Every error names the
//! file and line (a Parquet file's row).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::pipeline::ErrorPolicy;

/// How text is taken out of files.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// `.txt`: keep each line's trailing `\n` (HF `keep_linebreaks`).
    pub keep_linebreaks: bool,
    /// `.json`/`.jsonl`: the field holding the text.
    pub text_field: String,
    /// A record that cannot be read (invalid UTF-8, a NUL byte, malformed
    /// JSON, no text field, too large): stop, or skip and count it.
    pub on_bad_record: ErrorPolicy,
    /// Larger records are bad records: a whole file on one line is an
    /// export gone wrong, not a document.
    pub max_document_bytes: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            keep_linebreaks: true,
            text_field: "text".into(),
            on_bad_record: ErrorPolicy::Fail,
            max_document_bytes: 64 << 20,
        }
    }
}

/// A record skipped under `--on_bad_record skip`.
#[derive(Clone, Debug, PartialEq)]
pub struct BadRecord {
    pub line: u32,
    pub reason: String,
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
    pub documents: Vec<Document>,
    pub bad_records: Vec<BadRecord>,
}

/// What streaming a file found besides its documents.
#[derive(Clone, Debug, Default)]
pub struct FileRead {
    pub documents: u64,
    pub bad_records: Vec<BadRecord>,
}

/// Where a file's documents go as they are read.
pub type DocumentSink<'a> = dyn FnMut(Document) -> Result<()> + 'a;

/// What a [`DocumentSink`] returns to stop reading a file early, once it
/// has what it needs; its caller catches it.
#[derive(Debug, thiserror::Error)]
#[error("read enough")]
pub(crate) struct Enough;

/// The records of one file being read, and the policy for bad ones.
struct Records<'a, 'b> {
    path: &'a Path,
    options: &'a ReadOptions,
    sink: &'a mut DocumentSink<'b>,
    read: FileRead,
}

impl<'a, 'b> Records<'a, 'b> {
    /// Keeps a non-empty document, or refuses one over the size limit.
    fn document(&mut self, line: usize, text: String) -> Result<()> {
        if text.len() > self.options.max_document_bytes {
            return self.bad(line, self.too_large(text.len()));
        }
        if !text.is_empty() {
            self.read.documents += 1;
            (self.sink)(Document {
                line: line as u32,
                text,
            })?;
        }
        Ok(())
    }

    /// A bad record: an error naming file and line, or counted and skipped.
    fn bad(&mut self, line: usize, problem: RecordProblem) -> Result<()> {
        match self.options.on_bad_record {
            ErrorPolicy::Fail => Err(BadRecordError {
                path: self.path.to_path_buf(),
                line,
                problem,
            }
            .into()),
            ErrorPolicy::Skip => {
                self.read.bad_records.push(BadRecord {
                    line: line as u32,
                    reason: problem.to_string(),
                });
                Ok(())
            }
        }
    }

    /// One line as text: UTF-8, no NUL byte, within the size limit.
    /// `length` is the line's length in the file (`bytes` holds at most
    /// the limit and a little more).
    fn line<'c>(&mut self, line: usize, bytes: &'c [u8], length: usize) -> Result<Option<&'c str>> {
        let problem = if length > self.options.max_document_bytes {
            self.too_large(length)
        } else if let Some(at) = memchr::memchr(0, bytes) {
            RecordProblem::NulByte { at }
        } else {
            match std::str::from_utf8(bytes) {
                Ok(text) => return Ok(Some(text)),
                Err(e) => RecordProblem::InvalidUtf8 {
                    at: e.valid_up_to(),
                    of: "line",
                },
            }
        };
        self.bad(line, problem).map(|()| None)
    }

    fn too_large(&self, bytes: usize) -> RecordProblem {
        RecordProblem::TooLarge {
            bytes,
            limit: self.options.max_document_bytes,
        }
    }
}

/// Why a record is not a document.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RecordProblem {
    #[error("the record is {:.1} MB, more than the limit of {} MB", *bytes as f64 / MIB, limit >> 20)]
    TooLarge { bytes: usize, limit: usize },
    #[error("NUL byte at byte {at} (a binary file?)")]
    NulByte { at: usize },
    #[error(
        "invalid UTF-8 at byte {at} of the {of}; convert the file to UTF-8 (e.g. `iconv -f GB18030 -t UTF-8`)"
    )]
    InvalidUtf8 { at: usize, of: &'static str },
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("field `{field}` is not a string but {found}")]
    NotAString { field: String, found: String },
    #[error("record has no `{field}` field (it has: {})", keys.join(", "))]
    NoTextField { field: String, keys: Vec<String> },
    #[error("expected a JSON object, found {0}")]
    NotAnObject(String),
}

const MIB: f64 = (1 << 20) as f64;

/// A bad record where bad records fail the run.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {problem}", path.display())]
pub struct BadRecordError {
    pub path: PathBuf,
    pub line: usize,
    pub problem: RecordProblem,
}

/// How a corpus file's records are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// One document per non-empty line.
    Text,
    /// A JSON array of records, or JSON lines.
    Json,
    /// One record per line.
    JsonLines,
    /// A column of strings (`--text_field`), one document per row.
    Parquet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::None => "plain",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// The corpus formats, for messages.
const FORMATS: &str = ".txt, .json, .jsonl (each also .gz or .zst) or .parquet";

/// A corpus file's layout and compression, from its name (`a.jsonl.gz`).
fn format_of(path: &Path) -> Option<(Layout, Compression)> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let (stem, compression) = if let Some(stem) = name.strip_suffix(".gz") {
        (stem, Compression::Gzip)
    } else if let Some(stem) = name.strip_suffix(".zst") {
        (stem, Compression::Zstd)
    } else {
        (name.as_str(), Compression::None)
    };
    let layout = match stem.rsplit_once('.')?.1 {
        "txt" => Layout::Text,
        "json" => Layout::Json,
        "jsonl" => Layout::JsonLines,
        "parquet" if compression == Compression::None => Layout::Parquet,
        _ => return None,
    };
    Some((layout, compression))
}

/// The corpus files under `dir`, recursively, sorted by path (or `dir`
/// itself when it is a corpus file). Symbolic links to directories are
/// followed once; a loop is not followed twice.
pub fn discover(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.is_file() && format_of(dir).is_some() {
        return Ok(vec![dir.to_path_buf()]);
    }
    if !dir.is_dir() {
        bail!(
            "{}: no such directory (give a directory of {FORMATS} files, or one such file)",
            dir.display()
        );
    }
    let mut files = Vec::new();
    let mut visited = HashSet::new();
    walk(dir, &mut files, &mut visited)?;
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no {FORMATS} files found (searched recursively)",
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
        } else if format_of(&path).is_some() {
            files.push(path);
        }
    }
    Ok(())
}

/// The documents of the corpus files under `dir` in path order, up to about
/// `max_bytes` of text (the whole corpus when it is smaller), and how many
/// files they came from.
pub fn read_documents(
    dir: &Path,
    options: &ReadOptions,
    max_bytes: u64,
) -> Result<(Vec<String>, usize)> {
    let (mut documents, mut bytes, mut files) = (Vec::new(), 0u64, 0);
    for file in discover(dir)? {
        if bytes >= max_bytes {
            break;
        }
        files += 1;
        let read = read_stream(&file, options, &mut |document| {
            if bytes >= max_bytes {
                return Err(Enough.into());
            }
            bytes += document.text.len() as u64;
            documents.push(document.text);
            Ok(())
        });
        match read {
            Err(error) if error.is::<Enough>() => break,
            read => read?,
        };
    }
    if documents.is_empty() {
        bail!("{}: no documents in the corpus", dir.display());
    }
    Ok((documents, files))
}

/// The size and sha256 of a file, read in chunks.
pub fn file_digest(path: &Path) -> Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    let mut file =
        fs::File::open(path).with_context(|| format!("{}: cannot read file", path.display()))?;
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher)
        .with_context(|| format!("{}: cannot read file", path.display()))?;
    Ok((bytes, hex::encode(hasher.finalize())))
}

/// Reads one corpus file into documents.
pub fn read_file(path: &Path, options: &ReadOptions) -> Result<SourceFile> {
    let mut documents = Vec::new();
    let read = read_stream(path, options, &mut |document| {
        documents.push(document);
        Ok(())
    })?;
    Ok(SourceFile {
        path: path.to_path_buf(),
        documents,
        bad_records: read.bad_records,
    })
}

/// Streams the documents of the file `path` into `sink`, in file order
/// (its name decides the format; an unknown one is read as JSON lines).
/// Text and JSON lines are read a line at a time, Parquet a row group at a
/// time; a `.json` file is one JSON value and is read whole.
pub fn read_stream(
    path: &Path,
    options: &ReadOptions,
    sink: &mut DocumentSink<'_>,
) -> Result<FileRead> {
    let (layout, compression) = format_of(path).unwrap_or((Layout::JsonLines, Compression::None));
    let mut records = Records {
        path,
        options,
        sink,
        read: FileRead::default(),
    };
    if layout == Layout::Parquet {
        read_parquet(&mut records)?;
        return Ok(records.read);
    }
    let mut lines = Lines::open(path, compression, options.max_document_bytes)?;
    let read = match layout {
        Layout::Text => read_txt(&mut records, &mut lines),
        Layout::Json => {
            let text = lines.rest()?;
            let body = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&text);
            if body.trim_ascii_start().starts_with(b"[") {
                read_json_array(&mut records, body)
            } else {
                let mut lines = Lines::in_memory(body, options.max_document_bytes);
                read_json_lines(&mut records, &mut lines)
            }
        }
        _ => read_json_lines(&mut records, &mut lines),
    };
    // Corrupt compressed data can decode to garbage before its checksum
    // fails: a bad record met first is reported as the corruption it is.
    match read {
        Err(error) if compression != Compression::None && error.is::<BadRecordError>() => {
            return Err(lines.check_rest().err().unwrap_or(error));
        }
        read => read?,
    }
    Ok(records.read)
}

/// Counts the bytes a decoder has taken from the file.
struct Counted<R> {
    inner: R,
    taken: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buffer)?;
        self.taken.set(self.taken.get() + n as u64);
        Ok(n)
    }
}

/// A file's text, decompressed as it is read, a line at a time. Corrupt
/// data is an error naming the file, how far into it the decoder got, and
/// the line of text it had reached.
struct Lines<'a> {
    path: &'a Path,
    reader: Box<dyn std::io::BufRead + 'a>,
    compression: Compression,
    file_bytes: u64,
    /// Compressed bytes taken so far.
    taken: std::rc::Rc<std::cell::Cell<u64>>,
    /// Lines and text bytes read so far.
    number: usize,
    text_bytes: u64,
    /// A line keeps at most this many bytes (its length is still counted).
    keep: usize,
}

impl<'a> Lines<'a> {
    fn open(path: &'a Path, compression: Compression, max_document_bytes: usize) -> Result<Self> {
        use std::io::BufReader;
        let file = fs::File::open(path)
            .with_context(|| format!("{}: cannot read file", path.display()))?;
        let file_bytes = file.metadata().map_or(0, |m| m.len());
        let taken = std::rc::Rc::new(std::cell::Cell::new(0));
        let input = Counted {
            inner: file,
            taken: taken.clone(),
        };
        const BUFFER: usize = 1 << 20;
        let reader: Box<dyn std::io::BufRead> = match compression {
            Compression::None => Box::new(BufReader::with_capacity(BUFFER, input)),
            // Multi-member: `cat a.gz b.gz` and bgzip files are one stream of text.
            Compression::Gzip => Box::new(BufReader::with_capacity(
                BUFFER,
                flate2::read::MultiGzDecoder::new(input),
            )),
            Compression::Zstd => Box::new(BufReader::with_capacity(
                BUFFER,
                zstd::stream::read::Decoder::new(input)
                    .with_context(|| format!("{}: cannot read file", path.display()))?,
            )),
        };
        Ok(Self {
            path,
            reader,
            compression,
            file_bytes,
            taken,
            number: 0,
            text_bytes: 0,
            keep: max_document_bytes.saturating_add(2),
        })
    }

    /// Lines of text already in memory.
    fn in_memory(text: &'a [u8], max_document_bytes: usize) -> Self {
        Self {
            path: Path::new(""),
            reader: Box::new(text),
            compression: Compression::None,
            file_bytes: text.len() as u64,
            taken: Default::default(),
            number: 0,
            text_bytes: 0,
            keep: max_document_bytes.saturating_add(2),
        }
    }

    /// The next line into `line`, with its `\n` if it had one: its 1-based
    /// number and its whole length (`line` holds at most `keep` bytes of it).
    fn next(&mut self, line: &mut Vec<u8>) -> Result<Option<(usize, usize)>> {
        line.clear();
        let mut length = 0;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(available) => available,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.failed(e)),
            };
            if available.is_empty() {
                break;
            }
            let (used, ended) = match memchr::memchr(b'\n', available) {
                Some(at) => (at + 1, true),
                None => (available.len(), false),
            };
            let room = self.keep.saturating_sub(line.len());
            line.extend_from_slice(&available[..used.min(room)]);
            self.reader.consume(used);
            length += used;
            if ended {
                break;
            }
        }
        if length == 0 {
            return Ok(None);
        }
        if self.number == 0 && line.starts_with(b"\xEF\xBB\xBF") {
            line.drain(..3);
            length -= 3;
        }
        self.number += 1;
        self.text_bytes += length as u64;
        Ok(Some((self.number, length)))
    }

    /// The rest of the text, whole.
    fn rest(&mut self) -> Result<Vec<u8>> {
        let mut text = Vec::new();
        if let Err(e) = self.reader.read_to_end(&mut text) {
            self.number = text.iter().filter(|&&b| b == b'\n').count();
            self.text_bytes = text.len() as u64;
            return Err(self.failed(e));
        }
        Ok(text)
    }

    /// Decompresses what is left, to find corruption.
    fn check_rest(&mut self) -> Result<()> {
        match std::io::copy(&mut self.reader, &mut std::io::sink()) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.failed(e)),
        }
    }

    fn failed(&self, error: std::io::Error) -> anyhow::Error {
        if self.compression == Compression::None {
            return anyhow::Error::new(error)
                .context(format!("{}: cannot read file", self.path.display()));
        }
        anyhow::anyhow!(
            "{}: corrupt {} data before compressed byte {} of {} (line {} of the text, {} bytes in): {error}",
            self.path.display(),
            self.compression.name(),
            self.taken.get(),
            self.file_bytes,
            self.number + 1,
            self.text_bytes
        )
    }
}

/// A Parquet file's `--text_field` column, a document per row (rows
/// numbered from 1, as lines are). Row groups are read from the file one
/// at a time.
fn read_parquet(records: &mut Records<'_, '_>) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    use parquet::schema::types::Type;
    let path = records.path.display().to_string();
    let file = fs::File::open(records.path).with_context(|| format!("{path}: cannot read file"))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{path}: not a readable Parquet file"))?;
    let schema = reader.metadata().file_metadata().schema();
    let field = records.options.text_field.clone();
    let Some(column) = schema.get_fields().iter().find(|f| f.name() == field) else {
        let columns: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
        bail!(
            "{path}: no `{field}` column (it has: {}); pass --text_column to choose another",
            columns.join(", ")
        );
    };
    let projection = Type::group_type_builder(schema.name())
        .with_fields(vec![column.clone()])
        .build()?;
    let rows = reader
        .get_row_iter(Some(projection))
        .with_context(|| format!("{path}: cannot read column `{field}`"))?;
    for (index, row) in rows.enumerate() {
        let number = index + 1;
        let row = row.with_context(|| format!("{path}: row {number}: corrupt Parquet data"))?;
        match row.get_column_iter().next().map(|(_, value)| value) {
            Some(Field::Str(text)) => {
                if let Some(at) = text.bytes().position(|b| b == 0) {
                    records.bad(number, RecordProblem::NulByte { at })?;
                } else {
                    records.document(number, text.clone())?;
                }
            }
            other => records.bad(
                number,
                RecordProblem::NotAString {
                    field: field.clone(),
                    found: other.map_or("nothing".into(), |value| value.to_string()),
                },
            )?,
        }
    }
    Ok(())
}

/// Each non-empty line is a document; CRLF and CR line ends become `\n`.
fn read_txt(records: &mut Records<'_, '_>, lines: &mut Lines<'_>) -> Result<()> {
    let keep_linebreaks = records.options.keep_linebreaks;
    let mut raw = Vec::new();
    while let Some((number, length)) = lines.next(&mut raw)? {
        let ended = raw.ends_with(b"\n");
        let body = raw.strip_suffix(b"\n").unwrap_or(&raw);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if body.is_empty() {
            continue;
        }
        let body_length = length - (raw.len() - body.len());
        let Some(body) = records.line(number, body, body_length)? else {
            continue;
        };
        let mut text = body.replace('\r', "\n");
        if ended && keep_linebreaks {
            text.push('\n');
        }
        records.document(number, text)?;
    }
    Ok(())
}

/// The text field of one JSON record, or why there is none.
fn text_of(value: serde_json::Value, field: &str) -> Result<String, RecordProblem> {
    match value {
        serde_json::Value::Object(mut map) => match map.remove(field) {
            Some(serde_json::Value::String(text)) => Ok(text),
            Some(other) => Err(RecordProblem::NotAString {
                field: field.into(),
                found: other.to_string(),
            }),
            None => Err(RecordProblem::NoTextField {
                field: field.into(),
                keys: map.keys().cloned().collect(),
            }),
        },
        other => Err(RecordProblem::NotAnObject(other.to_string())),
    }
}

fn read_json_lines(records: &mut Records<'_, '_>, lines: &mut Lines<'_>) -> Result<()> {
    let field = records.options.text_field.clone();
    let mut raw = Vec::new();
    while let Some((number, length)) = lines.next(&mut raw)? {
        if raw.trim_ascii().is_empty() {
            continue;
        }
        let Some(line) = records.line(number, &raw, length)? else {
            continue;
        };
        let record = serde_json::from_str(line)
            .map_err(|e| RecordProblem::MalformedJson(e.to_string()))
            .and_then(|value| text_of(value, &field));
        match record {
            Ok(text) => records.document(number, text)?,
            Err(reason) => records.bad(number, reason)?,
        }
    }
    Ok(())
}

/// A `.json` file holding one array of records; a record's line is where it
/// starts. A file that does not parse is one bad record.
fn read_json_array(records: &mut Records<'_, '_>, bytes: &[u8]) -> Result<()> {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let line = bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            return records.bad(
                line,
                RecordProblem::InvalidUtf8 {
                    at: e.valid_up_to(),
                    of: "file",
                },
            );
        }
    };
    let line_at = |offset: usize| text[..offset].matches('\n').count() + 1;
    let values: Vec<serde_json::Value> = match serde_json::from_str(text) {
        Ok(values) => values,
        Err(e) => return records.bad(e.line(), RecordProblem::MalformedJson(e.to_string())),
    };
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
    let field = records.options.text_field.clone();
    for (i, value) in values.into_iter().enumerate() {
        let line = starts.get(i).map_or(1, |&o| line_at(o));
        match text_of(value, &field) {
            Ok(text) => records.document(line, text)?,
            Err(reason) => records.bad(line, reason)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of reading `path` with the default options, with its causes.
    fn read_error(path: &Path) -> String {
        format!(
            "{:#}",
            read_file(path, &ReadOptions::default()).unwrap_err()
        )
    }

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

    /// Bad records of each format name the file and the record's line.
    #[test]
    fn errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u8], &str); 4] = [
            (
                "a.jsonl",
                b"{\"text\": \"ok\"}\n\n{\"text\": oops}\n",
                "a.jsonl:3: malformed JSON",
            ),
            (
                "b.jsonl",
                b"{\"text\": \"ok\"}\n{\"content\": \"x\"}\n",
                "b.jsonl:2: record has no `text` field (it has: content)",
            ),
            (
                "a.json",
                b"[\n {\"text\": \"one {\"},\n {\"text\": \"two\"},\n {\"text\": 3}\n]",
                "a.json:4: field `text` is not a string",
            ),
            (
                "gbk.txt",
                b"ok\nstill ok\n\xD6\xD0\xCE\xC4\n",
                "gbk.txt:3: invalid UTF-8",
            ),
        ];
        for (name, contents, expected) in cases {
            let err = read_error(&write(dir.path(), name, contents));
            assert!(err.contains(expected), "{err}");
        }
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

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// A Parquet file with an optional string column `text` (None: null)
    /// and an int column `id`, in row groups of `group` rows.
    fn parquet(rows: &[Option<&str>], group: usize) -> Vec<u8> {
        use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        let schema = parse_message_type(
            "message corpus { OPTIONAL BYTE_ARRAY text (UTF8); REQUIRED INT64 id; }",
        )
        .unwrap();
        let mut out = Vec::new();
        let properties = std::sync::Arc::new(WriterProperties::builder().build());
        let mut writer =
            SerializedFileWriter::new(&mut out, std::sync::Arc::new(schema), properties).unwrap();
        for (g, chunk) in rows.chunks(group).enumerate() {
            let mut row_group = writer.next_row_group().unwrap();
            let values: Vec<ByteArray> = chunk.iter().flatten().map(|t| (*t).into()).collect();
            let defined: Vec<i16> = chunk.iter().map(|t| t.is_some() as i16).collect();
            let mut column = row_group.next_column().unwrap().unwrap();
            column
                .typed::<ByteArrayType>()
                .write_batch(&values, Some(&defined), None)
                .unwrap();
            column.close().unwrap();
            let ids: Vec<i64> = (0..chunk.len()).map(|i| (g * group + i) as i64).collect();
            let mut column = row_group.next_column().unwrap().unwrap();
            column
                .typed::<Int64Type>()
                .write_batch(&ids, None, None)
                .unwrap();
            column.close().unwrap();
            row_group.close().unwrap();
        }
        writer.close().unwrap();
        out
    }

    fn texts(file: &SourceFile) -> Vec<(u32, &str)> {
        file.documents
            .iter()
            .map(|d| (d.line, d.text.as_str()))
            .collect()
    }

    /// Compressed files read as their plain text does; Parquet rows are
    /// documents numbered from 1 across row groups.
    #[test]
    fn compressed_and_parquet_files_read_as_their_plain_text() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = b"{\"text\": \"\xE5\x8F\x91\xE7\x83\xAD\"}\n\n{\"text\": \"second\"}\n";
        let txt = b"first\nsecond\n";
        let plain_jsonl = read_file(
            &write(dir.path(), "a.jsonl", jsonl),
            &ReadOptions::default(),
        )
        .unwrap();
        let plain_txt =
            read_file(&write(dir.path(), "a.txt", txt), &ReadOptions::default()).unwrap();
        // Two gzip members, as `cat a.gz b.gz` or bgzip make.
        let (head, tail) = jsonl.split_at(10);
        let members = [gzip(head), gzip(tail)].concat();
        let zstd = zstd::encode_all(&txt[..], 3).unwrap();
        for (name, bytes, plain) in [
            ("c/b.jsonl.gz", members, &plain_jsonl),
            ("c/b.txt.gz", gzip(txt), &plain_txt),
            ("c/b.txt.zst", zstd, &plain_txt),
        ] {
            let file =
                read_file(&write(dir.path(), name, &bytes), &ReadOptions::default()).unwrap();
            assert_eq!(texts(&file), texts(plain), "{name}");
        }
        let rows = [Some("one"), None, Some("two"), Some(""), Some("three")];
        write(dir.path(), "c/d.parquet", &parquet(&rows, 2));
        let skip = ReadOptions {
            on_bad_record: ErrorPolicy::Skip,
            ..ReadOptions::default()
        };
        let file = read_file(&dir.path().join("c/d.parquet"), &skip).unwrap();
        assert_eq!(texts(&file), [(1, "one"), (3, "two"), (5, "three")]);
        assert_eq!(file.bad_records.len(), 1);
        assert_eq!(file.bad_records[0].line, 2);
        let err = read_error(&dir.path().join("c/d.parquet"));
        assert!(
            err.contains("d.parquet:2: field `text` is not a string but null"),
            "{err}"
        );
        let other = ReadOptions {
            text_field: "content".into(),
            ..ReadOptions::default()
        };
        let err = format!(
            "{:#}",
            read_file(&dir.path().join("c/d.parquet"), &other).unwrap_err()
        );
        assert!(
            err.contains("no `content` column (it has: text, id)"),
            "{err}"
        );
        let found = discover(&dir.path().join("c")).unwrap();
        assert_eq!(found.len(), 4);
    }

    /// A line longer than the document limit is a bad record with its real
    /// size; reading it keeps at most the limit in memory.
    #[test]
    fn an_overlong_line_is_a_bad_record_with_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let long = "x".repeat(3 << 20);
        let path = write(
            dir.path(),
            "a.txt",
            format!("short\n{long}\nlast\n").as_bytes(),
        );
        let options = ReadOptions {
            max_document_bytes: 1 << 20,
            on_bad_record: ErrorPolicy::Skip,
            ..ReadOptions::default()
        };
        let file = read_file(&path, &options).unwrap();
        assert_eq!(texts(&file), [(1, "short\n"), (3, "last\n")]);
        assert_eq!(file.bad_records[0].line, 2);
        assert!(
            file.bad_records[0]
                .reason
                .contains("the record is 3.0 MB, more than the limit of 1 MB"),
            "{:?}",
            file.bad_records
        );
        let mut lines = Lines::open(&path, Compression::None, 1 << 20).unwrap();
        let mut line = Vec::new();
        lines.next(&mut line).unwrap();
        assert_eq!(lines.next(&mut line).unwrap(), Some((2, (3 << 20) + 1)));
        assert_eq!(line.len(), (1 << 20) + 2);
    }

    /// Corrupt compressed or Parquet data is an error naming the file and
    /// how far reading got.
    #[test]
    fn corrupt_compressed_and_parquet_files_are_named_with_their_position() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..2000)
            .map(|i| format!("line {i} of the corpus\n"))
            .collect();
        let mut gz = gzip(text.as_bytes());
        let middle = gz.len() / 2;
        gz[middle] ^= 0xFF;
        let err = read_error(&write(dir.path(), "a.txt.gz", &gz));
        assert!(
            err.contains("a.txt.gz: corrupt gzip data before compressed byte"),
            "{err}"
        );
        let zst = zstd::encode_all(text.as_bytes(), 3).unwrap();
        let truncated = &zst[..zst.len() - 20];
        let err = read_error(&write(dir.path(), "a.jsonl.zst", truncated));
        assert!(err.contains("a.jsonl.zst: corrupt zstd data"), "{err}");
        assert!(err.contains("(line "), "{err}");
        let mut table = parquet(&[Some("one"), Some("two")], 2);
        table.truncate(table.len() - 12);
        let err = read_error(&write(dir.path(), "b.parquet", &table));
        assert!(
            err.contains("b.parquet: not a readable Parquet file"),
            "{err}"
        );
    }
}
