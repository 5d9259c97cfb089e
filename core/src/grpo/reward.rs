//! Rule rewards in the style of DeepSeek-R1 (R1 paper §2.2.2): accuracy of the final answer,
//! the `<think>…</think><answer>…</answer>` format, and language consistency of the reasoning.
//! Rewards are functions of (prompt, completion, reference answer); `None` means "does not apply"
//! (TRL turns it into NaN, skipped when rewards are summed).
use alloc::string::String;
use alloc::vec::Vec;

/// A reward function.
pub trait Reward {
    /// The name used in metrics.
    fn name(&self) -> &str;
    /// The reward of one completion.
    fn score(&self, prompt: &str, completion: &str, answer: Option<&str>) -> Option<f32>;
}

/// The final answer of a completion: the content of the last `\boxed{…}` (balanced braces), else
/// of the last `<answer>…</answer>`, trimmed.
pub fn extract_answer(text: &str) -> Option<String> {
    if let Some(start) = text.rfind("\\boxed{") {
        let body = &text[start + "\\boxed{".len()..];
        let mut depth = 1usize;
        for (i, ch) in body.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(String::from(body[..i].trim()));
                    }
                }
                _ => {}
            }
        }
        return None;
    }
    let open = text.rfind("<answer>")?;
    let rest = &text[open + "<answer>".len()..];
    let close = rest.find("</answer>")?;
    Some(String::from(rest[..close].trim()))
}

/// Normalizes an answer for comparison: drops spaces, `$`, thousands separators and a trailing
/// period; numbers compare by value (`"1,000.0"` == `"1000"`, `"0.50"` == `".5"`).
pub fn normalize(ans: &str) -> String {
    let s: String = ans.chars().filter(|c| !c.is_whitespace() && *c != '$').collect();
    let s = s.strip_suffix('.').unwrap_or(&s);
    let s = s.strip_prefix("\\text{").and_then(|x| x.strip_suffix('}')).unwrap_or(s);
    let plain: String = s.chars().filter(|&c| c != ',').collect();
    match plain.parse::<f64>() {
        Ok(v) if v.is_finite() => {
            if v == libm::round(v) && v.abs() < 1e15 {
                alloc::format!("{}", v as i64)
            } else {
                alloc::format!("{v}")
            }
        }
        _ => String::from(s),
    }
}

/// 1 when the extracted final answer equals the reference after [`normalize`], else 0; `None`
/// without a reference answer.
pub struct Accuracy;

impl Reward for Accuracy {
    fn name(&self) -> &str {
        "accuracy"
    }
    fn score(&self, _prompt: &str, completion: &str, answer: Option<&str>) -> Option<f32> {
        let want = normalize(answer?);
        Some(match extract_answer(completion) {
            Some(got) if normalize(&got) == want => 1.0,
            _ => 0.0,
        })
    }
}

/// 1 when the whole completion (trimmed, up to the first newline) equals the reference after
/// [`normalize`], else 0; `None` without a reference. For tasks whose answer is the completion
/// itself (the demo's `47+85=` → `132`).
pub struct ExactMatch;

impl Reward for ExactMatch {
    fn name(&self) -> &str {
        "exact"
    }
    fn score(&self, _prompt: &str, completion: &str, answer: Option<&str>) -> Option<f32> {
        let want = normalize(answer?);
        let got = completion.trim_start().split('\n').next().unwrap_or("");
        Some(if !got.trim().is_empty() && normalize(got) == want { 1.0 } else { 0.0 })
    }
}

/// R1's format reward: 1 when the completion is exactly `<think>…</think>` then
/// `<answer>…</answer>` (whitespace around and between allowed, each tag once), else 0.
pub struct Format;

impl Reward for Format {
    fn name(&self) -> &str {
        "format"
    }
    fn score(&self, _prompt: &str, completion: &str, _answer: Option<&str>) -> Option<f32> {
        let t = completion.trim();
        let ok = (|| {
            let rest = t.strip_prefix("<think>")?;
            let end = rest.find("</think>")?;
            let (think, rest) = (&rest[..end], rest[end + "</think>".len()..].trim_start());
            let body = rest.strip_prefix("<answer>")?.strip_suffix("</answer>")?;
            let once = |s: &str| !["<think>", "</think>", "<answer>", "</answer>"].iter().any(|tag| s.contains(tag));
            Some(once(think) && once(body))
        })();
        Some(if ok == Some(true) { 1.0 } else { 0.0 })
    }
}

/// R1's language-consistency reward: the fraction of the reasoning's words (inside `<think>`, or
/// the whole completion) written in the target script. `ascii`: Latin-script target (English);
/// otherwise CJK target (a word counts when it has a CJK character).
pub struct LanguageConsistency {
    pub ascii: bool,
}

impl Reward for LanguageConsistency {
    fn name(&self) -> &str {
        if self.ascii {
            "language"
        } else {
            "language-zh"
        }
    }
    fn score(&self, _prompt: &str, completion: &str, _answer: Option<&str>) -> Option<f32> {
        let cot = match (completion.find("<think>"), completion.find("</think>")) {
            (Some(a), Some(b)) if b > a => &completion[a + "<think>".len()..b],
            _ => completion,
        };
        let words: Vec<&str> = cot.split_whitespace().filter(|w| w.chars().any(|c| c.is_alphabetic())).collect();
        if words.is_empty() {
            return Some(0.0);
        }
        let cjk = |c: char| matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x3040..=0x30FF | 0xAC00..=0xD7AF);
        let hits = words
            .iter()
            .filter(|w| {
                if self.ascii {
                    w.chars().filter(|c| c.is_alphabetic()).all(|c| c.is_ascii_alphabetic())
                } else {
                    w.chars().any(cjk)
                }
            })
            .count();
        Some(hits as f32 / words.len() as f32)
    }
}

/// The built-in reward named `name`: "accuracy", "exact", "format", "language" (English
/// reasoning) or "language-zh"; `None` for any other name.
pub fn builtin(name: &str) -> Option<alloc::boxed::Box<dyn Reward>> {
    use alloc::boxed::Box;
    Some(match name {
        "accuracy" => Box::new(Accuracy),
        "exact" => Box::new(ExactMatch),
        "format" => Box::new(Format),
        "language" => Box::new(LanguageConsistency { ascii: true }),
        "language-zh" => Box::new(LanguageConsistency { ascii: false }),
        _ => return None,
    })
}

/// The names [`builtin`] knows, for error messages.
pub const BUILTIN_NAMES: &str = "accuracy, exact, format, language, language-zh";

/// `Σ_f w_f · r_f` over the functions that apply (TRL's `sum_then_normalize` with `nansum`);
/// `None` when none applies.
pub fn combined(rewards: &[(&dyn Reward, f32)], prompt: &str, completion: &str, answer: Option<&str>) -> Option<f32> {
    let scores: Vec<f32> =
        rewards.iter().filter_map(|(r, w)| r.score(prompt, completion, answer).map(|s| s * w)).collect();
    (!scores.is_empty()).then(|| scores.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_extracted_and_normalized() {
        assert_eq!(extract_answer("so \\boxed{\\frac{1}{2}} done").as_deref(), Some("\\frac{1}{2}"));
        assert_eq!(extract_answer("a \\boxed{1} then \\boxed{ 42 }").as_deref(), Some("42"));
        assert_eq!(extract_answer("<think>x</think><answer> 7 </answer>").as_deref(), Some("7"));
        assert_eq!(extract_answer("no answer"), None);
        assert_eq!(extract_answer("\\boxed{unclosed"), None);
        assert_eq!(normalize("1,000.0"), "1000");
        assert_eq!(normalize(" $0.50 "), "0.5");
        assert_eq!(normalize(".5"), "0.5");
        assert_eq!(normalize("\\text{yes}"), "yes");
        let acc = Accuracy;
        assert_eq!(acc.score("", "<answer>1,024</answer>", Some("1024")), Some(1.0));
        assert_eq!(acc.score("", "<answer>1023</answer>", Some("1024")), Some(0.0));
        assert_eq!(acc.score("", "\\boxed{12}", None), None);
        let ex = ExactMatch;
        assert_eq!(ex.score("", "132\n", Some("132")), Some(1.0));
        assert_eq!(ex.score("", " 1,32 \nmore", Some("132")), Some(1.0));
        assert_eq!(ex.score("", "133\n", Some("132")), Some(0.0));
        assert_eq!(ex.score("", "\n", Some("")), Some(0.0));
    }

    #[test]
    fn format_and_language() {
        let f = Format;
        assert_eq!(f.score("", " <think>a b</think>\n<answer>3</answer> ", None), Some(1.0));
        assert_eq!(f.score("", "<think>a</think>3", None), Some(0.0));
        assert_eq!(f.score("", "<think>a<think></think><answer>3</answer>", None), Some(0.0));
        assert_eq!(f.score("", "<answer>3</answer><think>a</think>", None), Some(0.0));
        let en = LanguageConsistency { ascii: true };
        assert_eq!(en.score("", "<think>add the two numbers</think><answer>5</answer>", None), Some(1.0));
        assert_eq!(en.score("", "<think>add 两个 numbers 相加</think>", None), Some(0.5));
        let zh = LanguageConsistency { ascii: false };
        assert_eq!(zh.score("", "<think>两个 数 add</think>", None), Some(2.0 / 3.0));
        let acc = Accuracy;
        let both: [(&dyn Reward, f32); 2] = [(&acc, 1.0), (&f, 0.5)];
        assert_eq!(combined(&both, "", "<think>t</think><answer>4</answer>", Some("4")), Some(1.5));
        assert_eq!(combined(&[(&acc, 1.0)], "", "x", None), None);
        for name in BUILTIN_NAMES.split(", ") {
            assert_eq!(builtin(name).map(|r| String::from(r.name())).as_deref(), Some(name));
        }
        assert!(builtin("bogus").is_none());
    }
}
