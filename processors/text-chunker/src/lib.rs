//! Splits documents into overlapping chunks at natural boundaries (paragraphs, then
//! sentences, then words), the usual first step before embedding text for retrieval.
//!
//! - As a service (backend `none`): `POST {"text": "...", "max_chars": 800, "overlap": 100}`
//!   answers `{"chunks": [{"index", "start", "end", "text"}]}` (offsets in characters).
//! - Around an embeddings model: `pre_process` sends `{"input": [chunk texts]}` as the
//!   model input's parameters, and `post_process` answers the chunks together with the
//!   model's JSON metadata.
//!
//! Configuration: `CHUNK_MAX_CHARS` (default 1000) and `CHUNK_OVERLAP` (default 100) are
//! the defaults for requests that do not say.

use serde::{Deserialize, Serialize};
use wasp_sdk::{Error, ModelInput, ModelOutput, Prepared, Processor, Request, Response};

/// One chunk, with offsets in characters into the document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Position among the chunks, from 0.
    pub index: usize,
    /// Offset of the first character.
    pub start: usize,
    /// Offset just past the last character.
    pub end: usize,
    /// The chunk's text.
    pub text: String,
}

/// Largest `max_chars` a request may ask for.
const MAX_CHUNK_CHARS: usize = 100_000;

/// Splits `text` into chunks of at most `max_chars` characters, each starting `overlap`
/// characters before the previous one ended (snapped forward to a word start). Cuts prefer
/// a paragraph break, then a sentence end, then whitespace, within the last half of the
/// window; a single word longer than the window is cut where it must be.
pub fn chunk(text: &str, max_chars: usize, overlap: usize) -> Vec<Chunk> {
    let chars: Vec<char> = text.chars().collect();
    let mut chunks = Vec::new();
    let mut start = skip_space(&chars, 0);
    while start < chars.len() {
        let limit = (start + max_chars).min(chars.len());
        let end = if limit == chars.len() {
            limit
        } else {
            best_cut(&chars, start, limit)
        };
        let piece: String = chars[start..end].iter().collect();
        let trimmed = piece.trim_end();
        let end_trimmed = start + trimmed.chars().count();
        chunks.push(Chunk {
            index: chunks.len(),
            start,
            end: end_trimmed,
            text: trimmed.to_owned(),
        });
        if end >= chars.len() {
            break;
        }
        // Step back by the overlap, then forward to the start of a word; always progress.
        let mut next = end.saturating_sub(overlap).max(start + 1);
        if next < end {
            while next < end && !chars[next - 1].is_whitespace() {
                next += 1;
            }
        }
        start = skip_space(&chars, next);
    }
    chunks
}

fn skip_space(chars: &[char], mut at: usize) -> usize {
    while at < chars.len() && chars[at].is_whitespace() {
        at += 1;
    }
    at
}

fn best_cut(chars: &[char], start: usize, limit: usize) -> usize {
    let floor = start + (limit - start) / 2;
    let window = floor.max(start + 1)..=limit;
    let rfind = |pred: &dyn Fn(usize) -> bool| window.clone().rev().find(|&i| pred(i));
    let paragraph = rfind(&|i| chars[i] == '\n' && i > 0 && chars[i - 1] == '\n');
    let sentence =
        rfind(&|i| matches!(chars[i - 1], '.' | '!' | '?' | '。') && chars[i].is_whitespace());
    let space = rfind(&|i| chars[i].is_whitespace());
    paragraph.or(sentence).or(space).unwrap_or(limit)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChunkRequest {
    text: String,
    #[serde(default)]
    max_chars: Option<usize>,
    #[serde(default)]
    overlap: Option<usize>,
}

fn chunk_request(request: &Request) -> Result<Vec<Chunk>, Error> {
    let body: ChunkRequest = request.json()?;
    let max_chars = match body.max_chars {
        Some(n) => n,
        None => wasp_sdk::config::parse_or("CHUNK_MAX_CHARS", 1000)?,
    };
    let overlap = match body.overlap {
        Some(n) => n,
        None => wasp_sdk::config::parse_or("CHUNK_OVERLAP", 100)?,
    };
    if !(1..=MAX_CHUNK_CHARS).contains(&max_chars) {
        return Err(
            Error::bad_request(format!("must be between 1 and {MAX_CHUNK_CHARS}"))
                .with_field("max_chars"),
        );
    }
    if overlap >= max_chars {
        return Err(Error::bad_request("must be smaller than max_chars").with_field("overlap"));
    }
    Ok(chunk(&body.text, max_chars, overlap))
}

struct TextChunker;

impl Processor for TextChunker {
    fn handle(request: Request) -> Result<Response, Error> {
        let chunks = chunk_request(&request)?;
        Ok(Response::json(&serde_json::json!({ "chunks": chunks })))
    }

    fn pre_process(request: Request) -> Result<Prepared, Error> {
        let chunks = chunk_request(&request)?;
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        let context = serde_json::to_vec(&chunks)
            .map_err(|e| Error::internal(format!("cannot encode context: {e}")))?;
        Ok(Prepared {
            input: ModelInput {
                tensors: Vec::new(),
                parameters: Some(serde_json::json!({ "input": texts }).to_string()),
            },
            context,
        })
    }

    fn post_process(context: Vec<u8>, output: ModelOutput) -> Result<Response, Error> {
        let chunks: Vec<Chunk> = serde_json::from_slice(&context)
            .map_err(|e| Error::internal(format!("bad context: {e}")))?;
        let model: serde_json::Value = match &output.metadata {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| Error::internal(format!("model metadata is not JSON: {e}")))?,
            None => serde_json::Value::Null,
        };
        Ok(Response::json(
            &serde_json::json!({ "chunks": chunks, "model": model }),
        ))
    }
}

wasp_sdk::processor!(TextChunker);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_chunk() {
        let chunks = chunk("  hello world  ", 100, 10);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].text, "hello world");
        assert_eq!((chunks[0].start, chunks[0].end), (2, 13));
    }

    #[test]
    fn cuts_at_sentences_and_overlaps_on_word_starts() {
        let text = "One two three. Four five six. Seven eight nine. Ten eleven twelve.";
        let chunks = chunk(text, 32, 10);
        assert!(chunks.len() >= 3, "{chunks:?}");
        for c in &chunks {
            assert!(c.text.chars().count() <= 32, "{c:?}");
            assert_eq!(
                c.text,
                text.chars()
                    .skip(c.start)
                    .take(c.end - c.start)
                    .collect::<String>()
            );
            assert!(c.start == 0 || text.chars().nth(c.start - 1).unwrap().is_whitespace());
        }
        assert!(chunks[0].text.ends_with('.'), "{:?}", chunks[0]);
        // Overlap: each chunk starts before the previous one ended.
        for pair in chunks.windows(2) {
            assert!(pair[1].start < pair[0].end, "{pair:?}");
        }
        assert_eq!(chunks.last().unwrap().end, text.chars().count());
    }

    #[test]
    fn unbroken_text_is_cut_hard_and_progresses() {
        let text = "x".repeat(25);
        let chunks = chunk(&text, 10, 9);
        assert!(chunks.iter().all(|c| c.text.len() <= 10));
        assert_eq!(chunks.last().unwrap().end, 25);
    }

    #[test]
    fn counts_characters_not_bytes() {
        let text = "ééééé ééééé ééééé";
        let chunks = chunk(text, 11, 0);
        assert_eq!(chunks[0].text, "ééééé ééééé");
    }
}
