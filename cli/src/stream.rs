//! Streams generated tokens to a writer as they come: the newly completed text with a tokenizer
//! (decoding the whole tail keeps multi-byte UTF-8 intact), comma-separated ids without one.
use dsv3_ffi::tokenizer::Tok;
use std::io::Write;

/// The tokens generated so far and how much of their text is already printed.
pub struct Streamer<'a> {
    tk: Option<&'a Tok>,
    pub generated: Vec<u32>,
    printed: usize,
}

impl<'a> Streamer<'a> {
    pub fn new(tk: Option<&'a Tok>) -> Streamer<'a> {
        Streamer { tk, generated: Vec::new(), printed: 0 }
    }

    /// Records `token` and writes what it adds to `out` (write errors are ignored: output is
    /// best effort, e.g. a closed pipe).
    pub fn push(&mut self, token: u32, out: &mut impl Write) {
        self.generated.push(token);
        match self.tk {
            Some(tk) => {
                if let Ok(text) = tk.decode(&self.generated) {
                    if text.len() > self.printed && text.is_char_boundary(self.printed) {
                        let _ = write!(out, "{}", &text[self.printed..]);
                        self.printed = text.len();
                    }
                }
            }
            None => {
                let _ = write!(out, "{}{token}", if self.generated.len() > 1 { "," } else { "" });
            }
        }
        let _ = out.flush();
    }
}
