//! Tokenizers: HF `tokenizer.json` (DeepSeek's byte-level BPE) through the `tokenizers` crate, or
//! the core's byte-level tokenizer. [`Tok`] is also what the `dsv3` CLI uses.
use crate::status::*;
use dsv3_core::tokenizer::ByteTokenizer;
use dsv3_core::{Error, Result};
use std::ffi::c_char;
use std::path::Path;

/// Why no tokenizer could be chosen for a model.
/// cbindgen:ignore
pub const NO_TOKENIZER: &str =
    "the model has no tokenizer.json and its vocabulary is not byte-level: use token ids or give a tokenizer";

/// A tokenizer.
pub enum Tok {
    Hf(Box<tokenizers::Tokenizer>),
    Byte(ByteTokenizer),
}

impl Tok {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Tok> {
        let t = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Io(format!("{}: cannot load tokenizer: {e}", path.display())))?;
        Ok(Tok::Hf(Box::new(t)))
    }

    /// `explicit`, else `dir/tokenizer.json`, else the byte tokenizer when the vocabulary is
    /// byte-level (256 bytes + 3 specials), else none.
    pub fn for_model(dir: &Path, explicit: Option<&Path>, vocab: usize) -> Result<Option<Tok>> {
        let path = explicit.map(Path::to_path_buf).unwrap_or_else(|| dir.join("tokenizer.json"));
        if path.exists() {
            return Tok::from_file(&path).map(Some);
        }
        if explicit.is_some() {
            return Err(Error::Io(format!("{}: no such file", path.display())));
        }
        Ok((vocab == ByteTokenizer::VOCAB).then_some(Tok::Byte(ByteTokenizer)))
    }

    /// Ids of `text`, with the tokenizer's special tokens (e.g. BOS) when `special`.
    pub fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        match self {
            Tok::Hf(t) => {
                Ok(t.encode(text, special).map_err(|e| Error::Input(format!("tokenizing: {e}")))?.get_ids().to_vec())
            }
            Tok::Byte(b) => Ok(b.encode(text)),
        }
    }

    /// Ids of a prompt (special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Ids without special tokens (e.g. a completion appended to a prompt).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    /// Text of `ids`; special tokens skipped when `skip_special`.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match self {
            Tok::Hf(t) => t.decode(ids, skip_special).map_err(|e| Error::Input(format!("detokenizing: {e}"))),
            Tok::Byte(b) => Ok(b.decode(ids)),
        }
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }

    /// The id of a token string (byte tokenizer: "<bos>", "<eos>", "<pad>" or a single byte).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Tok::Hf(t) => t.token_to_id(token),
            Tok::Byte(_) => match token {
                "<bos>" => Some(ByteTokenizer::BOS),
                "<eos>" => Some(ByteTokenizer::EOS),
                "<pad>" => Some(ByteTokenizer::PAD),
                s if s.len() == 1 => Some(s.as_bytes()[0] as u32),
                _ => None,
            },
        }
    }

    /// Vocabulary size (with added tokens).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tok::Hf(t) => t.get_vocab_size(true),
            Tok::Byte(_) => ByteTokenizer::VOCAB,
        }
    }
}

/// A tokenizer (opaque). One thread at a time.
pub struct dsv3_tokenizer {
    pub(crate) inner: Tok,
}

/// Loads a HF `tokenizer.json`.
#[no_mangle]
pub unsafe extern "C" fn dsv3_tokenizer_load(path: *const c_char, out: *mut *mut dsv3_tokenizer) -> dsv3_status {
    guard("dsv3_tokenizer_load", || {
        let p = cstr(path, "path")?;
        let out = nonnull_mut(out, "out")?;
        *out = Box::into_raw(Box::new(dsv3_tokenizer { inner: Tok::from_file(Path::new(p))? }));
        Ok(())
    })
}

/// The tokenizer of a model: its directory's tokenizer.json, or the built-in byte tokenizer for a
/// byte-level vocabulary (259 ids: bytes, then <bos>, <eos>, <pad>). A model from
/// dsv3_trainer_model (no directory) gets the byte tokenizer or an error. Fails when the tokenizer
/// has more ids than the model.
#[no_mangle]
pub unsafe extern "C" fn dsv3_tokenizer_for_model(
    model: *const crate::model::dsv3_model,
    out: *mut *mut dsv3_tokenizer,
) -> dsv3_status {
    guard("dsv3_tokenizer_for_model", || {
        let m = nonnull(model, "model")?;
        let out = nonnull_mut(out, "out")?;
        let vocab = m.inner.cfg.vocab_size;
        // a model without a directory (a trainer snapshot) has only the byte tokenizer to offer
        let t = if m.dir.as_os_str().is_empty() {
            (vocab == ByteTokenizer::VOCAB).then_some(Tok::Byte(ByteTokenizer))
        } else {
            Tok::for_model(&m.dir, None, vocab)?
        };
        let t = t.ok_or_else(|| invalid(NO_TOKENIZER))?;
        if t.vocab_size() > vocab {
            return Err(invalid(format!("the tokenizer has {} ids but the model only {vocab}", t.vocab_size())));
        }
        *out = Box::into_raw(Box::new(dsv3_tokenizer { inner: t }));
        Ok(())
    })
}

/// Frees a tokenizer. NULL is a no-op.
#[no_mangle]
pub unsafe extern "C" fn dsv3_tokenizer_free(tok: *mut dsv3_tokenizer) {
    free_handle(tok)
}

/// Encodes UTF-8 `text` into `ids` (`cap` entries; `*needed`, may be NULL, gets the count).
/// `add_special` = 1 adds the special tokens the tokenizer.json's post-processor defines (e.g.
/// DeepSeek's BOS); the built-in byte tokenizer adds none either way.
#[no_mangle]
pub unsafe extern "C" fn dsv3_tokenizer_encode(
    tok: *const dsv3_tokenizer,
    text: *const c_char,
    add_special: i32,
    ids: *mut i32,
    cap: usize,
    needed: *mut usize,
) -> dsv3_status {
    guard("dsv3_tokenizer_encode", || {
        let t = &nonnull(tok, "tokenizer")?.inner;
        let v: Vec<i32> = t.encode_with(cstr(text, "text")?, add_special != 0)?.into_iter().map(|x| x as i32).collect();
        fill(&v, ids, cap, needed, "ids")
    })
}

/// Decodes `n` ids into NUL-terminated UTF-8 in `buf` (`cap` bytes; `*needed` gets the size with
/// the NUL). `skip_special` = 1 drops special tokens.
#[no_mangle]
pub unsafe extern "C" fn dsv3_tokenizer_decode(
    tok: *const dsv3_tokenizer,
    ids: *const i32,
    n: usize,
    skip_special: i32,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> dsv3_status {
    guard("dsv3_tokenizer_decode", || {
        let t = &nonnull(tok, "tokenizer")?.inner;
        let ids: Vec<u32> = slice(ids, n, "ids")?
            .iter()
            .map(|&x| if x < 0 { Err(invalid(format!("negative token id {x}"))) } else { Ok(x as u32) })
            .collect::<std::result::Result<_, _>>()?;
        fill_str(&t.decode_with(&ids, skip_special != 0)?, buf, cap, needed, "text")
    })
}

/// The id of a token string (e.g. "<｜end▁of▁sentence｜>"); fails with DSV3_ERR_INVALID_ARGUMENT
/// if the vocabulary has no such token.
#[no_mangle]
pub unsafe extern "C" fn dsv3_tokenizer_token_to_id(
    tok: *const dsv3_tokenizer,
    token: *const c_char,
    id: *mut i32,
) -> dsv3_status {
    guard("dsv3_tokenizer_token_to_id", || {
        let t = &nonnull(tok, "tokenizer")?.inner;
        let s = cstr(token, "token")?;
        let out = nonnull_mut(id, "id")?;
        *out = t.token_to_id(s).ok_or_else(|| invalid(format!("no token '{s}' in the vocabulary")))? as i32;
        Ok(())
    })
}

/// The vocabulary size, added tokens included.
#[no_mangle]
pub unsafe extern "C" fn dsv3_tokenizer_vocab_size(tok: *const dsv3_tokenizer, out: *mut usize) -> dsv3_status {
    guard("dsv3_tokenizer_vocab_size", || {
        *nonnull_mut(out, "out")? = nonnull(tok, "tokenizer")?.inner.vocab_size();
        Ok(())
    })
}
