//! The built-in byte-level tokenizer (for models trained from scratch). HF `tokenizer.json`
//! (DeepSeek's byte-level BPE) is handled outside the core, in the CLI and the C ABI.
use alloc::string::String;
use alloc::vec::Vec;

/// Bytes are ids 0..=255; then BOS = 256, EOS = 257, PAD = 258.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const BOS: u32 = 256;
    pub const EOS: u32 = 257;
    pub const PAD: u32 = 258;
    /// Vocabulary size (bytes + specials).
    pub const VOCAB: usize = 259;

    /// UTF-8 bytes of `text` as ids (no specials added).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }
    /// Text from ids; specials are skipped, invalid UTF-8 is replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn roundtrip() {
        let t = super::ByteTokenizer;
        let ids = t.encode("12+7=19 ü");
        assert_eq!(t.decode(&ids), "12+7=19 ü");
        assert_eq!(t.decode(&[49, super::ByteTokenizer::EOS, 50]), "12");
    }
}
