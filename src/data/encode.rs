//! From records to token ids and labels: the loss mask, the end-of-sequence token, cutting to
//! the maximum length, packing, and the length distribution.

use serde::{Deserialize, Serialize};

use super::records::{BadRecord, Content, Record, Role};
use super::template::ChatTemplate;
use super::tokenizer::ModelTokenizer;

/// The label of a token the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE: i64 = crate::model::IGNORE_INDEX;

/// One training sequence. `labels[i]` is `input_ids[i]` where the token is trained and
/// [`IGNORE`] elsewhere; the trainer shifts them (position i predicts labels[i + 1]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens the loss counts.
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// A record tokenized, with what the preview needs: the text and where each token sits in it.
#[derive(Debug, Clone)]
pub(crate) struct Tokenized {
    pub example: Example,
    pub text: String,
    /// Byte range of each token in `text`; `None` for tokens added outside it (BOS, EOS).
    pub spans: Vec<Option<(usize, usize)>>,
}

/// Tokenizes one record: a conversation rendered with the template, the assistant replies
/// trained (everything when `train_on_prompt`); a text document trained whole. A record the
/// template or tokenizer cannot handle comes back as a [`BadRecord`].
pub(crate) fn tokenize_record(
    record: &Record,
    template: Option<&ChatTemplate>,
    tokenizer: &ModelTokenizer,
    train_on_prompt: bool,
) -> Result<Tokenized, BadRecord> {
    let bad =
        |reason: String| BadRecord { file: record.file.clone(), line: record.line, record: None, field: None, reason };
    let (text, replies, add_special) = match &record.content {
        Content::Text(text) => (text.clone(), std::iter::once(0..text.len()).collect(), true),
        Content::Chat(messages) => {
            let template =
                template.ok_or_else(|| bad("a conversation needs a chat template, and none was chosen".into()))?;
            let (text, replies) = template.render_with_replies(messages, tokenizer).map_err(|e| {
                bad(format!(
                    "chat template `{}` fails on this record: {e} (another template may suit the data)",
                    template.name
                ))
            })?;
            (text, replies, false)
        }
    };
    let enc = tokenizer.encode(&text, add_special).map_err(|e| bad(e.to_string()))?;
    let mut ids = enc.ids;
    let mut labels: Vec<i64> = ids
        .iter()
        .zip(&enc.offsets)
        .map(|(&id, &(s, e))| {
            // A token is trained when it overlaps a reply; a token that straddles the border
            // (" Paris" after "Answer:") belongs to the reply, which must produce it. Byte-level
            // tokenizers trim the offsets of a token of spaces to the empty range at its end.
            let in_reply =
                replies.iter().any(|r| if e > s { e > r.start && s < r.end } else { s > r.start && s <= r.end });
            if in_reply || train_on_prompt {
                id as i64
            } else {
                IGNORE
            }
        })
        .collect();
    let mut spans: Vec<Option<(usize, usize)>> = enc.offsets.into_iter().map(Some).collect();

    // tokenizer_config.json's add_bos_token asks for a BOS the template may not write.
    if let (Some(true), Some(bos)) = (tokenizer.add_bos_token, tokenizer.bos_token_id) {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
            labels.insert(0, IGNORE);
            spans.insert(0, None);
        }
    }
    // The last reply must end with a token that stops generation, or the fine-tune never
    // learns to stop; templates without one (and plain text) get the EOS appended.
    let ends_with_reply = match &record.content {
        Content::Text(_) => true,
        Content::Chat(m) => m.last().is_some_and(|m| m.role == Role::Assistant),
    };
    if let (true, Some(eos)) = (ends_with_reply, tokenizer.eos_token_id) {
        let last_reply = replies.last().cloned().unwrap_or(0..0);
        let reply_has_stop = ids.iter().zip(&spans).any(|(&id, span)| {
            tokenizer.is_stop_token(id) && span.is_some_and(|(s, e)| e > last_reply.start && s < last_reply.end)
        });
        if !reply_has_stop {
            ids.push(eos);
            labels.push(eos as i64);
            spans.push(None);
        }
    }
    Ok(Tokenized { example: Example { input_ids: ids, labels }, text, spans })
}

/// Cuts an example to `max_length` tokens, keeping the start; says whether it cut.
pub(crate) fn truncate(example: &mut Example, max_length: usize) -> bool {
    if example.input_ids.len() <= max_length {
        return false;
    }
    example.input_ids.truncate(max_length);
    example.labels.truncate(max_length);
    true
}

/// Cuts a plain-text document into consecutive blocks of at most `max_length` tokens, every
/// token kept and trained as the document says (as transformers' run_clm cuts its token
/// stream); only the last block may be shorter.
pub(crate) fn split_into_blocks(example: Example, max_length: usize) -> Vec<Example> {
    if example.len() <= max_length {
        return vec![example];
    }
    example
        .input_ids
        .chunks(max_length)
        .zip(example.labels.chunks(max_length))
        .map(|(ids, labels)| Example { input_ids: ids.to_vec(), labels: labels.to_vec() })
        .collect()
}

/// An example on its way to packing: a plain-text document flows across sequence borders
/// (one token stream cut into blocks); a conversation stays whole.
#[derive(Debug, Clone)]
pub struct PackItem {
    pub example: Example,
    pub document: bool,
    /// file:line of the record it came from.
    pub location: String,
}

/// Packs examples, in order, into sequences of at most `max_length` tokens. A conversation
/// starts a new sequence when it does not fit in what is left of the current one; a document
/// fills it and goes on in the next. The first token of each example after the first in a
/// sequence is not trained, so nothing learns to predict one example from the end of another.
pub fn pack(examples: Vec<PackItem>, max_length: usize) -> Vec<Example> {
    let mut packed: Vec<Example> = Vec::new();
    let mut current = Example { input_ids: Vec::new(), labels: Vec::new() };
    let mut flush = |current: &mut Example| {
        if !current.is_empty() {
            packed.push(std::mem::replace(current, Example { input_ids: Vec::new(), labels: Vec::new() }));
        }
    };
    for PackItem { example: mut ex, document, .. } in examples {
        if !document && current.len() + ex.len() > max_length {
            flush(&mut current);
        }
        if !current.is_empty() {
            if let Some(first) = ex.labels.first_mut() {
                *first = IGNORE;
            }
        }
        let mut at = 0;
        while at < ex.len() {
            if current.len() == max_length {
                flush(&mut current);
            }
            let take = (max_length - current.len()).min(ex.len() - at);
            current.input_ids.extend_from_slice(&ex.input_ids[at..at + take]);
            current.labels.extend_from_slice(&ex.labels[at..at + take]);
            at += take;
        }
    }
    flush(&mut current);
    packed
}

/// One bar of the length histogram: examples with `start <= tokens < end`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthBucket {
    pub start: usize,
    pub end: usize,
    pub count: usize,
}

/// Token lengths of the examples before cutting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LengthStats {
    pub count: usize,
    pub min: usize,
    pub max: usize,
    pub mean: f64,
    pub p50: usize,
    pub p90: usize,
    pub p99: usize,
    /// The max_length the examples are cut to, and how many are longer.
    pub max_length: usize,
    pub over_max_length: usize,
    pub histogram: Vec<LengthBucket>,
}

const BUCKETS: usize = 20;

impl LengthStats {
    pub fn from_lengths(lengths: &[usize], max_length: usize) -> Self {
        if lengths.is_empty() {
            return LengthStats { max_length, ..Default::default() };
        }
        let mut sorted = lengths.to_vec();
        sorted.sort_unstable();
        let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
        let max = *sorted.last().unwrap_or(&0);
        // Equal buckets, multiples of 8 tokens wide, spanning the longest example.
        let width = max.div_ceil(BUCKETS).div_ceil(8).max(1) * 8;
        let n_buckets = max / width + 1;
        let mut histogram: Vec<LengthBucket> =
            (0..n_buckets).map(|b| LengthBucket { start: b * width, end: (b + 1) * width, count: 0 }).collect();
        for &l in lengths {
            histogram[l / width].count += 1;
        }
        LengthStats {
            count: lengths.len(),
            min: sorted[0],
            max,
            mean: lengths.iter().sum::<usize>() as f64 / lengths.len() as f64,
            p50: pct(0.5),
            p90: pct(0.9),
            p99: pct(0.99),
            max_length,
            over_max_length: lengths.iter().filter(|&&l| l > max_length).count(),
            histogram,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], trained_from: usize) -> Example {
        Example {
            input_ids: ids.to_vec(),
            labels: ids.iter().enumerate().map(|(i, &id)| if i >= trained_from { id as i64 } else { IGNORE }).collect(),
        }
    }

    fn whole(e: Example) -> PackItem {
        PackItem { example: e, document: false, location: String::new() }
    }

    #[test]
    fn packing_fills_sequences_in_order_and_masks_borders() {
        let examples = vec![ex(&[1, 2, 3], 0), ex(&[4, 5], 0), ex(&[6, 7, 8, 9], 1), ex(&[10], 0)];
        let packed = pack(examples.into_iter().map(whole).collect(), 5);
        let ids: Vec<Vec<u32>> = packed.iter().map(|e| e.input_ids.clone()).collect();
        assert_eq!(ids, vec![vec![1, 2, 3, 4, 5], vec![6, 7, 8, 9, 10]]);
        assert_eq!(packed[0].labels, vec![1, 2, 3, IGNORE, 5]);
        assert_eq!(packed[1].labels, vec![IGNORE, 7, 8, 9, IGNORE]);
        assert!(packed.iter().all(|e| e.len() <= 5 && e.labels.len() == e.input_ids.len()));
    }

    #[test]
    fn documents_flow_across_sequences_and_no_token_is_lost() {
        let doc = |ids: &[u32]| PackItem { example: ex(ids, 0), document: true, location: String::new() };
        let examples = vec![doc(&[1, 2, 3, 4, 5, 6, 7]), whole(ex(&[8, 9, 10], 1)), doc(&[11, 12, 13, 14])];
        let packed = pack(examples, 4);
        let ids: Vec<Vec<u32>> = packed.iter().map(|e| e.input_ids.clone()).collect();
        // the conversation [8, 9, 10] does not fit after [5, 6, 7]: it starts the next sequence
        assert_eq!(ids, vec![vec![1, 2, 3, 4], vec![5, 6, 7], vec![8, 9, 10, 11], vec![12, 13, 14]]);
        assert_eq!(packed[1].labels, vec![5, 6, 7], "a document's continuation stays trained");
        assert_eq!(packed[2].labels, vec![IGNORE, 9, 10, IGNORE]);
        assert_eq!(packed[3].labels, vec![12, 13, 14]);
    }

    #[test]
    fn a_long_document_splits_into_blocks_keeping_every_token() {
        let blocks = split_into_blocks(ex(&[1, 2, 3, 4, 5, 6, 7], 1), 3);
        let ids: Vec<Vec<u32>> = blocks.iter().map(|e| e.input_ids.clone()).collect();
        assert_eq!(ids, vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
        assert_eq!(blocks[0].labels, vec![IGNORE, 2, 3]);
        assert_eq!(split_into_blocks(ex(&[1, 2], 0), 3), vec![ex(&[1, 2], 0)]);
    }

    #[test]
    fn truncation_keeps_the_start() {
        let mut e = ex(&[1, 2, 3, 4], 2);
        assert!(!truncate(&mut e, 4));
        assert!(truncate(&mut e, 3));
        assert_eq!(e, ex(&[1, 2, 3], 2));
    }

    #[test]
    fn length_stats_count_every_example() {
        let lengths: Vec<usize> = (1..=100).collect();
        let s = LengthStats::from_lengths(&lengths, 64);
        assert_eq!((s.count, s.min, s.max, s.p50, s.over_max_length), (100, 1, 100, 51, 36));
        assert_eq!(s.histogram.iter().map(|b| b.count).sum::<usize>(), 100);
        assert!(s.histogram.iter().all(|b| b.end - b.start == 8));
        for b in &s.histogram {
            assert_eq!(b.count, lengths.iter().filter(|&&l| l >= b.start && l < b.end).count());
        }
    }
}
