//! Tokenizers for the CLI: HF `tokenizer.json` through the `tokenizers` crate, or the core's
//! built-in byte-level tokenizer for byte-vocabulary models.
use dsv3_core::tokenizer::ByteTokenizer;
use dsv3_core::{Error, Result};
use std::path::Path;

pub const NO_TOKENIZER: &str =
    "the model has no tokenizer.json and its vocabulary is not byte-level: use --ids or --tokenizer";

/// A tokenizer.
pub enum Tok {
    Hf(Box<tokenizers::Tokenizer>),
    Byte(ByteTokenizer),
}

impl Tok {
    /// `explicit`, else `dir/tokenizer.json`, else the byte tokenizer when the vocabulary is
    /// byte-level (exactly 256 bytes + 3 specials), else none.
    pub fn for_model(dir: &Path, explicit: Option<&Path>, vocab: usize) -> Result<Option<Tok>> {
        let path = explicit.map(Path::to_path_buf).unwrap_or_else(|| dir.join("tokenizer.json"));
        if path.exists() {
            let t = tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| Error::Io(format!("{}: cannot load tokenizer: {e}", path.display())))?;
            return Ok(Some(Tok::Hf(Box::new(t))));
        }
        if explicit.is_some() {
            return Err(Error::Io(format!("{}: no such file", path.display())));
        }
        Ok((vocab == ByteTokenizer::VOCAB).then_some(Tok::Byte(ByteTokenizer)))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tok::Hf(t) => {
                Ok(t.encode(text, true).map_err(|e| Error::Input(format!("tokenizing: {e}")))?.get_ids().to_vec())
            }
            Tok::Byte(b) => Ok(b.encode(text)),
        }
    }

    /// Encodes without special tokens (e.g. a completion appended to a prompt).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tok::Hf(t) => {
                Ok(t.encode(text, false).map_err(|e| Error::Input(format!("tokenizing: {e}")))?.get_ids().to_vec())
            }
            Tok::Byte(b) => Ok(b.encode(text)),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tok::Hf(t) => t.decode(ids, true).map_err(|e| Error::Input(format!("detokenizing: {e}"))),
            Tok::Byte(b) => Ok(b.decode(ids)),
        }
    }
}
