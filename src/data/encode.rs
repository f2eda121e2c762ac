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

/// Packs examples, in order, into sequences of at most `max_length` tokens. The first token of
/// each example after the first in a sequence is not trained, so nothing learns to predict
/// one example from the end of another.
pub fn pack(examples: Vec<Example>, max_length: usize) -> Vec<Example> {
    let mut packed: Vec<Example> = Vec::new();
    let mut current = Example { input_ids: Vec::new(), labels: Vec::new() };
    for mut ex in examples {
        if !current.is_empty() && current.len() + ex.len() > max_length {
            packed.push(std::mem::replace(&mut current, Example { input_ids: Vec::new(), labels: Vec::new() }));
        }
        if !current.is_empty() {
            if let Some(first) = ex.labels.first_mut() {
                *first = IGNORE;
            }
        }
        current.input_ids.append(&mut ex.input_ids);
        current.labels.append(&mut ex.labels);
    }
    if !current.is_empty() {
        packed.push(current);
    }
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

    #[test]
    fn packing_fills_sequences_in_order_and_masks_borders() {
        let examples = vec![ex(&[1, 2, 3], 0), ex(&[4, 5], 0), ex(&[6, 7, 8, 9], 1), ex(&[10], 0)];
        let packed = pack(examples, 5);
        let ids: Vec<Vec<u32>> = packed.iter().map(|e| e.input_ids.clone()).collect();
        assert_eq!(ids, vec![vec![1, 2, 3, 4, 5], vec![6, 7, 8, 9, 10]]);
        assert_eq!(packed[0].labels, vec![1, 2, 3, IGNORE, 5]);
        assert_eq!(packed[1].labels, vec![IGNORE, 7, 8, 9, IGNORE]);
        assert!(packed.iter().all(|e| e.len() <= 5 && e.labels.len() == e.input_ids.len()));
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
