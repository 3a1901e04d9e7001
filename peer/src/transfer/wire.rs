//! The transfer's application protocol on its one QUIC bidirectional stream, and the rules for
//! file names. Pure functions and a push parser: no QUIC, no files, so each rule tests alone.
//!
//! Sender to receiver: a header, the content, then the content's SHA-256:
//!
//! ```text
//! magic "ferry-ft" (8) | version 1 (1) | name length (2, big-endian) | name (UTF-8)
//! | size (8, big-endian) | content (size bytes) | SHA-256 of the content (32) | end of stream
//! ```
//!
//! Receiver to sender: one verdict byte ([`Verdict`]), then end of stream. A receiver that will
//! not take the file (unsafe name, file exists, its own I/O failed) or a peer that sees the
//! protocol broken closes the QUIC connection with one of the [`close`] codes and a reason.

use bytes::{Buf, Bytes, BytesMut};

/// The first bytes of the stream.
pub(crate) const MAGIC: &[u8; 8] = b"ferry-ft";
/// The protocol version this code speaks.
pub(crate) const VERSION: u8 = 1;
/// The longest file name, in bytes (what Linux file systems allow for one component).
pub(crate) const MAX_NAME: usize = 255;
/// The length of the content hash (SHA-256).
pub(crate) const HASH_LEN: usize = 32;
/// Header bytes before the name: magic, version, name length.
const FIXED_BEFORE_NAME: usize = MAGIC.len() + 1 + 2;
/// Header bytes after the name: the size.
const FIXED_AFTER_NAME: usize = 8;

/// QUIC application close codes of a transfer.
pub(crate) mod close {
    /// The transfer is over (the sender has the verdict, or the receiver saw it acknowledged).
    pub(crate) const DONE: u32 = 0;
    /// The receiver will not take the file; the reason says why.
    pub(crate) const REFUSED: u32 = 1;
    /// The peer broke the transfer protocol; the reason says how.
    pub(crate) const PROTOCOL: u32 = 2;
    /// The peer gave up on its own (its file could not be read or written).
    pub(crate) const ABORTED: u32 = 3;
}

/// The receiver's answer, after it compared the hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The content's hash matched; the file is in place.
    Ok = 0,
    /// The content's hash did not match; the receiver deleted what it had.
    Mismatch = 1,
}

impl Verdict {
    /// The verdict a byte on the wire stands for.
    pub(crate) fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Ok),
            1 => Some(Self::Mismatch),
            _ => None,
        }
    }
}

/// Why a file name cannot be used, or `Ok` for a name that is a single safe path component.
///
/// Refused: the empty name, `.` and `..`, a name with `/` or NUL (it would not be one
/// component), a name with a control character (it could rewrite the terminal that prints
/// it), a name with a Unicode format character (an invisible one, or a bidirectional override
/// that makes `invoice_\u{202e}fdp.exe` show as `invoice_exe.pdf`), and a name longer than 255
/// bytes. `a..b` is allowed: without a `/` it cannot leave the directory.
pub fn check_file_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("the name is empty");
    }
    if name == "." || name == ".." {
        return Err("the name is `.` or `..`");
    }
    if name.contains('/') {
        return Err("the name contains `/`");
    }
    if name.contains('\0') {
        return Err("the name contains NUL");
    }
    if name.chars().any(char::is_control) {
        return Err("the name contains a control character");
    }
    if name.chars().any(is_format) {
        return Err("the name contains an invisible or bidirectional formatting character");
    }
    if name.len() > MAX_NAME {
        return Err("the name is longer than 255 bytes");
    }
    Ok(())
}

/// Whether `c` is a Unicode format character (general category Cf, Unicode 16): invisible
/// characters such as zero-width spaces and joiners, the byte order mark, and the
/// bidirectional controls that reorder how the text around them is shown.
fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{600}'..='\u{605}'
            | '\u{61c}'
            | '\u{6dd}'
            | '\u{70f}'
            | '\u{890}'..='\u{891}'
            | '\u{8e2}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{110bd}'
            | '\u{110cd}'
            | '\u{13430}'..='\u{1343f}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}'
    )
}

/// `text` from the other peer (a close reason), safe to print: control and format characters,
/// which could move the cursor, rewrite the terminal or reorder what is shown, are escaped
/// (`\n`, `\u{1b}`, `\u{202e}`) as [`check_file_name`] keeps them out of names.
pub(crate) fn escape_untrusted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || is_format(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// The header the sender writes first.
pub(crate) fn encode_header(name: &str, size: u64) -> Result<Bytes, &'static str> {
    check_file_name(name)?;
    let len = u16::try_from(name.len()).map_err(|_| "the name is longer than 255 bytes")?;
    let mut out = Vec::with_capacity(FIXED_BEFORE_NAME + name.len() + FIXED_AFTER_NAME);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    Ok(Bytes::from(out))
}

/// What the receiver's parser found in the stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// The header. The name is not checked yet: the caller checks it and says why it refuses.
    Header {
        /// The file's name as sent.
        name: String,
        /// The content's length.
        size: u64,
    },
    /// Content bytes, in order.
    Content(Bytes),
    /// The sender's SHA-256 of the content; nothing may follow.
    Hash([u8; HASH_LEN]),
}

/// Where the parser is in the stream.
#[derive(Debug)]
enum State {
    /// Collecting the header.
    Header(BytesMut),
    /// Passing content on; this many bytes are still to come.
    Content(u64),
    /// Collecting the hash.
    Hash(BytesMut),
    /// The hash was read; only the end of the stream may follow.
    Done,
}

/// A push parser of the sender's stream: feed it chunks in order as they arrive, then tell it
/// the stream ended. It holds at most one header or one hash, never content.
#[derive(Debug)]
pub(crate) struct InboundParser {
    state: State,
}

impl Default for InboundParser {
    fn default() -> Self {
        Self {
            state: State::Header(BytesMut::new()),
        }
    }
}

impl InboundParser {
    /// Parses the next chunk of the stream, appending what it completes to `out`.
    pub(crate) fn feed(&mut self, mut data: Bytes, out: &mut Vec<Inbound>) -> Result<(), String> {
        while !data.is_empty() {
            match &mut self.state {
                State::Header(buf) => {
                    let need = header_len(buf)?;
                    let take = need.saturating_sub(buf.len()).min(data.len());
                    buf.extend_from_slice(&data.split_to(take));
                    if buf.len() < FIXED_BEFORE_NAME || buf.len() < header_len(buf)? {
                        continue;
                    }
                    let (name, size) = parse_header(buf)?;
                    out.push(Inbound::Header { name, size });
                    self.state = if size == 0 {
                        State::Hash(BytesMut::new())
                    } else {
                        State::Content(size)
                    };
                }
                State::Content(left) => {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                    out.push(Inbound::Content(data.split_to(take)));
                    *left -= take as u64;
                    if *left == 0 {
                        self.state = State::Hash(BytesMut::new());
                    }
                }
                State::Hash(buf) => {
                    let take = (HASH_LEN - buf.len()).min(data.len());
                    buf.extend_from_slice(&data.split_to(take));
                    if buf.len() == HASH_LEN {
                        let mut hash = [0; HASH_LEN];
                        hash.copy_from_slice(buf);
                        out.push(Inbound::Hash(hash));
                        self.state = State::Done;
                    }
                }
                State::Done => {
                    return Err(format!(
                        "{} bytes follow the content's hash",
                        data.remaining()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that the stream may end here: after the hash, and nowhere else.
    pub(crate) fn finish(&self) -> Result<(), String> {
        match &self.state {
            State::Done => Ok(()),
            State::Header(buf) => Err(format!(
                "the stream ended inside the header, after {} bytes",
                buf.len()
            )),
            State::Content(left) => Err(format!(
                "the stream ended with {left} bytes of content still to come"
            )),
            State::Hash(buf) => Err(format!(
                "the stream ended inside the hash, after {} of {HASH_LEN} bytes",
                buf.len()
            )),
        }
    }
}

/// The header's full length as far as `buf` tells it: the fixed part until the name's length
/// is known, then the whole header. Checks the magic and version as soon as they are in.
fn header_len(buf: &[u8]) -> Result<usize, String> {
    let magic_seen = buf.len().min(MAGIC.len());
    if buf[..magic_seen] != MAGIC[..magic_seen] {
        return Err("the stream does not start with the transfer's magic".into());
    }
    if let Some(&version) = buf.get(MAGIC.len())
        && version != VERSION
    {
        return Err(format!(
            "transfer protocol version {version} (this peer speaks {VERSION})"
        ));
    }
    if buf.len() < FIXED_BEFORE_NAME {
        return Ok(FIXED_BEFORE_NAME);
    }
    let name_len = usize::from(u16::from_be_bytes([buf[9], buf[10]]));
    if name_len > MAX_NAME {
        return Err(format!(
            "a file name of {name_len} bytes (at most {MAX_NAME})"
        ));
    }
    Ok(FIXED_BEFORE_NAME + name_len + FIXED_AFTER_NAME)
}

/// The name and size of a complete header.
fn parse_header(buf: &[u8]) -> Result<(String, u64), String> {
    let name_end = buf.len() - FIXED_AFTER_NAME;
    let name = std::str::from_utf8(&buf[FIXED_BEFORE_NAME..name_end])
        .map_err(|_| "the file name is not UTF-8".to_string())?
        .to_owned();
    let mut size = [0; 8];
    size.copy_from_slice(&buf[name_end..]);
    Ok((name, u64::from_be_bytes(size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(stream: &[u8], chunk: usize) -> Result<Vec<Inbound>, String> {
        let mut parser = InboundParser::default();
        let mut out = Vec::new();
        for piece in stream.chunks(chunk.max(1)) {
            parser.feed(Bytes::copy_from_slice(piece), &mut out)?;
        }
        parser.finish()?;
        Ok(out)
    }

    fn stream(name: &str, content: &[u8], hash: [u8; HASH_LEN]) -> Vec<u8> {
        let mut s = encode_header(name, content.len() as u64)
            .expect("valid name")
            .to_vec();
        s.extend_from_slice(content);
        s.extend_from_slice(&hash);
        s
    }

    #[test]
    fn a_stream_parses_the_same_in_any_chunking() {
        let content: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let s = stream("report.pdf", &content, [9; HASH_LEN]);
        for chunk in [1, 2, 7, 11, 64, 1500, s.len()] {
            let out = parse_all(&s, chunk).expect("parses");
            assert_eq!(
                out[0],
                Inbound::Header {
                    name: "report.pdf".into(),
                    size: 1000
                }
            );
            let body: Vec<u8> = out
                .iter()
                .filter_map(|i| match i {
                    Inbound::Content(b) => Some(b.to_vec()),
                    _ => None,
                })
                .flatten()
                .collect();
            assert_eq!(body, content, "chunk {chunk}");
            assert_eq!(out.last(), Some(&Inbound::Hash([9; HASH_LEN])));
        }
    }

    #[test]
    fn an_empty_file_is_a_header_and_a_hash() {
        let out = parse_all(&stream("empty", &[], [3; HASH_LEN]), 5).expect("parses");
        assert_eq!(
            out,
            vec![
                Inbound::Header {
                    name: "empty".into(),
                    size: 0
                },
                Inbound::Hash([3; HASH_LEN])
            ]
        );
    }

    #[test]
    fn broken_streams_are_refused_with_the_reason() {
        let good = stream("a", b"xyz", [1; HASH_LEN]);
        let mut bad_magic = good.clone();
        bad_magic[0] = b'F';
        assert!(parse_all(&bad_magic, 3).unwrap_err().contains("magic"));
        let mut bad_version = good.clone();
        bad_version[8] = 2;
        assert!(
            parse_all(&bad_version, 100)
                .unwrap_err()
                .contains("version 2")
        );
        let mut long_name = good.clone();
        long_name[9..11].copy_from_slice(&300u16.to_be_bytes());
        assert!(
            parse_all(&long_name, 100)
                .unwrap_err()
                .contains("300 bytes")
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(parse_all(&trailing, 4).unwrap_err().contains("follow"));
        for cut in [5, 15, good.len() - 33, good.len() - 1] {
            assert!(parse_all(&good[..cut], 4).is_err(), "cut at {cut}");
        }
        let mut not_utf8 = good;
        not_utf8[11] = 0xff;
        assert!(parse_all(&not_utf8, 100).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn only_single_safe_components_are_file_names() {
        for ok in [
            "file.txt",
            "a..b",
            ".hidden",
            "ümlaut ok",
            "\u{65e5}\u{672c}.txt",
            "a\\b",
            &"x".repeat(255),
        ] {
            assert_eq!(check_file_name(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/etc/passwd",
            "../x",
            "a\0b",
            "bell\x07",
            "new\nline",
            "c1\u{9b}",
            "invoice_\u{202e}fdp.exe",
            "isolate\u{2066}",
            "report\u{200b}.txt",
            "joiner\u{2060}",
            "bom\u{feff}",
            "soft\u{ad}hyphen",
            "tag\u{e0041}",
            &"x".repeat(256),
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
            assert!(encode_header(bad, 1).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn untrusted_text_is_printed_with_control_and_format_characters_escaped() {
        assert_eq!(
            escape_untrusted("\u{1b}[2J\r\nferry-peer: saved \u{202e}fdp.exe\u{7}"),
            "\\u{1b}[2J\\r\\nferry-peer: saved \\u{202e}fdp.exe\\u{7}"
        );
        let plain =
            "the file \"r\u{e9}sum\u{e9}.pdf\" already exists; it's kept \\ \u{65e5}\u{672c}";
        assert_eq!(escape_untrusted(plain), plain);
    }

    #[test]
    fn verdict_bytes_round_trip_and_others_are_unknown() {
        assert_eq!(Verdict::from_byte(Verdict::Ok as u8), Some(Verdict::Ok));
        assert_eq!(
            Verdict::from_byte(Verdict::Mismatch as u8),
            Some(Verdict::Mismatch)
        );
        assert_eq!(Verdict::from_byte(2), None);
    }
}
