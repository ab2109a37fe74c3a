//! Text inputs: tokenization into BERT-style int64 tensors, plain-text and Brown corpus readers.

use smelt_tensor::{bail, Error, Result, Tensor};
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationParams};

/// One tokenized batch, each tensor int64 `[batch, seq]`.
#[derive(Clone, Debug)]
pub struct TextBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub token_type_ids: Tensor,
}

/// Tokenizes `sentences` with a HuggingFace `tokenizer.json`, truncating each to `max_len`
/// tokens (special tokens included) and padding to the longest sentence, or to `pad_to`.
///
/// The file's own padding is ignored so the batch shape is decided here: padding to a fixed
/// 128 (as many exported tokenizers do) would waste most of the compute on short calibration
/// sentences.
pub fn tokenize(
    tokenizer_json: &Path,
    sentences: &[String],
    max_len: usize,
    pad_to: Option<usize>,
) -> Result<TextBatch> {
    let ctx = || format!("tokenizer {}", tokenizer_json.display());
    if sentences.is_empty() {
        bail!(Input, "no sentences to tokenize");
    }
    let mut tok = Tokenizer::from_file(tokenizer_json)
        .map_err(|e| Error::Input(format!("{}: cannot load: {e}", ctx())))?;
    let pad_id = tok
        .get_padding()
        .map(|p| p.pad_id)
        .or_else(|| ["[PAD]", "<pad>"].iter().find_map(|t| tok.token_to_id(t)))
        .unwrap_or(0);
    tok.with_padding(None);
    // Special tokens count against max_len; the tokenizers crate underflows if max_len is
    // smaller than them, so measure them on an empty input first.
    tok.with_truncation(None)
        .map_err(|e| Error::Input(format!("{}: {e}", ctx())))?;
    let n_special = tok
        .encode("", true)
        .map_err(|e| Error::Input(format!("{}: {e}", ctx())))?
        .get_ids()
        .len();
    if max_len <= n_special {
        bail!(
            Input,
            "max_len {max_len} leaves no room for text: the tokenizer adds {n_special} special tokens"
        );
    }
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| Error::Input(format!("{}: {e}", ctx())))?;

    let encodings = tok
        .encode_batch(
            sentences.iter().map(String::as_str).collect::<Vec<_>>(),
            true,
        )
        .map_err(|e| Error::Input(format!("{}: encoding failed: {e}", ctx())))?;
    let longest = encodings
        .iter()
        .map(|e| e.get_ids().len())
        .max()
        .unwrap_or(0);
    let seq = match pad_to {
        Some(p) if p < longest => bail!(
            Input,
            "pad_to {p} is shorter than the longest tokenized sentence ({longest} tokens); \
             set max_len <= pad_to"
        ),
        Some(p) => p,
        None => longest,
    };
    let b = encodings.len();
    let mut ids = vec![i64::from(pad_id); b * seq];
    let mut mask = vec![0i64; b * seq];
    let mut types = vec![0i64; b * seq];
    for (r, enc) in encodings.iter().enumerate() {
        let row = r * seq;
        for (j, ((&id, &t), &m)) in enc
            .get_ids()
            .iter()
            .zip(enc.get_type_ids())
            .zip(enc.get_attention_mask())
            .enumerate()
        {
            ids[row + j] = i64::from(id);
            types[row + j] = i64::from(t);
            mask[row + j] = i64::from(m);
        }
    }
    Ok(TextBatch {
        input_ids: Tensor::from_vec(vec![b, seq], ids)?,
        attention_mask: Tensor::from_vec(vec![b, seq], mask)?,
        token_type_ids: Tensor::from_vec(vec![b, seq], types)?,
    })
}

/// Non-empty, trimmed lines of the given text files, in order, at most `limit` of them.
pub fn read_text_lines(paths: &[PathBuf], limit: Option<usize>) -> Result<Vec<String>> {
    let max = limit.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    for p in paths {
        if out.len() >= max {
            break;
        }
        let text = std::fs::read_to_string(p)
            .map_err(|e| Error::io(format!("text file {}", p.display()), e))?;
        out.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .take(max - out.len())
                .map(str::to_string),
        );
    }
    if out.is_empty() {
        bail!(Input, "dataset is empty: no non-empty lines in {paths:?}");
    }
    Ok(out)
}

/// The first `n` sentences of at least 5 words from the Brown corpus files in `dir` (`ca01` ..
/// `cr09`, read in name order), with the `word/TAG` tags stripped. Fewer are returned only if
/// the corpus runs out.
pub fn brown_sentences(dir: &Path, n: usize) -> Result<Vec<String>> {
    let ctx = || format!("Brown corpus directory {}", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(ctx(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(is_brown_name)
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            Input,
            "{}: no corpus files (expected names like ca01 .. cr09)",
            ctx()
        );
    }
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for f in &files {
        if out.len() >= n {
            break;
        }
        let text = std::fs::read_to_string(f)
            .map_err(|e| Error::io(format!("Brown corpus file {}", f.display()), e))?;
        for line in text.lines() {
            if out.len() >= n {
                break;
            }
            if let Some(s) = brown_line(line) {
                out.push(s);
            }
        }
    }
    Ok(out)
}

/// Two lowercase category letters then two digits (`ca01`), which skips README/cats.txt.
fn is_brown_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 4
        && b[0] == b'c'
        && b[1].is_ascii_lowercase()
        && b[2].is_ascii_digit()
        && b[3].is_ascii_digit()
}

/// One tagged line to plain text, if it has at least 5 words (tokens with a letter or digit).
fn brown_line(line: &str) -> Option<String> {
    let words: Vec<&str> = line
        .split_whitespace()
        .map(|tok| match tok.rsplit_once('/') {
            Some((w, _tag)) if !w.is_empty() => w,
            _ => tok,
        })
        .map(|w| if w == "``" || w == "''" { "\"" } else { w })
        .collect();
    let n_words = words
        .iter()
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .count();
    (n_words >= 5).then(|| words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::asset;

    #[test]
    fn minilm_hello_world() {
        let tj = asset("minilm/tokenizer.json");
        let b = tokenize(&tj, &["hello world".to_string()], 128, None).unwrap();
        assert_eq!(b.input_ids.shape(), &[1, 4]);
        assert_eq!(
            b.input_ids.as_slice::<i64>().unwrap(),
            &[101, 7592, 2088, 102]
        );
        assert_eq!(b.attention_mask.as_slice::<i64>().unwrap(), &[1, 1, 1, 1]);
        assert_eq!(b.token_type_ids.as_slice::<i64>().unwrap(), &[0, 0, 0, 0]);
    }

    #[test]
    fn minilm_padding_and_truncation() {
        let tj = asset("minilm/tokenizer.json");
        let s = vec!["hello world".to_string(), "hello".to_string()];
        let b = tokenize(&tj, &s, 128, None).unwrap();
        assert_eq!(b.input_ids.shape(), &[2, 4]);
        assert_eq!(
            b.input_ids.as_slice::<i64>().unwrap(),
            &[101, 7592, 2088, 102, 101, 7592, 102, 0]
        );
        assert_eq!(
            b.attention_mask.as_slice::<i64>().unwrap(),
            &[1, 1, 1, 1, 1, 1, 1, 0]
        );

        let b = tokenize(&tj, &s, 128, Some(6)).unwrap();
        assert_eq!(b.input_ids.shape(), &[2, 6]);
        assert_eq!(b.attention_mask.as_slice::<i64>().unwrap()[4..6], [0, 0]);

        // Truncation keeps [CLS] and [SEP] around the first token.
        let b = tokenize(&tj, &s, 3, None).unwrap();
        assert_eq!(
            b.input_ids.as_slice::<i64>().unwrap(),
            &[101, 7592, 102, 101, 7592, 102]
        );

        assert!(tokenize(&tj, &s, 2, None).is_err());
        assert!(tokenize(&tj, &s, 128, Some(3)).is_err());
        assert!(tokenize(&tj, &[], 128, None).is_err());
        assert!(tokenize(Path::new("/nonexistent/tokenizer.json"), &s, 128, None).is_err());
    }

    #[test]
    fn brown_first_sentences() {
        let s = brown_sentences(&asset("brown"), 64).unwrap();
        assert_eq!(s.len(), 64);
        assert!(
            s[0].starts_with(
                "The Fulton County Grand Jury said Friday an investigation of Atlanta's"
            ),
            "{}",
            s[0]
        );
        assert!(s
            .iter()
            .all(|x| !x.contains("/nn") && x.split(' ').count() >= 5));
    }

    #[test]
    fn brown_line_strips_tags() {
        assert_eq!(
            brown_line("\tThe/at jury/nn said/vbd ``/`` it/pps 1/2/cd was/bedz fine/jj ./."),
            Some("The jury said \" it 1/2 was fine .".to_string())
        );
        assert_eq!(brown_line("Too/ql short/jj ./."), None);
        assert!(is_brown_name("cr09") && !is_brown_name("cats.txt") && !is_brown_name("README"));
    }

    #[test]
    fn text_lines_skip_blank_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        let b = dir.path().join("b.txt");
        std::fs::write(&a, "one\n\n  two  \n").unwrap();
        std::fs::write(&b, "three\nfour\n").unwrap();
        let l = read_text_lines(&[a.clone(), b.clone()], Some(3)).unwrap();
        assert_eq!(l, vec!["one", "two", "three"]);
        assert_eq!(read_text_lines(&[a, b], None).unwrap().len(), 4);
        let e = dir.path().join("e.txt");
        std::fs::write(&e, "\n \n").unwrap();
        assert!(read_text_lines(&[e], None).is_err());
    }
}
