//! The data module: formats and their detection, errors for bad input, skipping bad records,
//! loss masks, templates, truncation, packing, the validation split, the preview.

mod common;

use std::path::PathBuf;

use common::tokenizer::{
    base_model_dir, byte_ids, chatml_model_dir, model_dir, special_id, write_json, CHATML_SPECIALS,
    SMOLLM2_CHAT_TEMPLATE,
};
use qlora_studio::data::{
    self, check_template, family_template_name, named_template, named_templates, prepare, preview, read_file,
    render_preview_text, ChatTemplate, Content, DataConfig, DataFormat, Example, Message, ModelTokenizer, Role,
    TemplateChoice, Validation, IGNORE,
};
use serde_json::json;

fn data_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn demo_dataset() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo/dataset.jsonl")
}

fn config(path: PathBuf) -> DataConfig {
    DataConfig { path, ..Default::default() }
}

fn error_text<T: std::fmt::Debug>(r: qlora_studio::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

/// A piece of an expected token sequence: a special token or plain text (one token per byte),
/// trained or not.
enum Piece<'a> {
    Special(&'a str),
    Text(&'a str),
}

/// Ids and labels of pieces for the byte-level test tokenizer with the ChatML specials.
fn expected(parts: &[(bool, Vec<Piece>)]) -> Example {
    let mut input_ids = Vec::new();
    let mut labels = Vec::new();
    for (trained, pieces) in parts {
        for p in pieces {
            let ids = match p {
                Piece::Special(s) => vec![special_id(&CHATML_SPECIALS, s)],
                Piece::Text(t) => byte_ids(t),
            };
            labels.extend(ids.iter().map(|&id| if *trained { id as i64 } else { IGNORE }));
            input_ids.extend(ids);
        }
    }
    Example { input_ids, labels }
}

use Piece::{Special as S, Text as T};

fn chat_messages(record: &data::Record) -> &[Message] {
    match &record.content {
        Content::Chat(m) => m,
        Content::Text(_) => panic!("expected a conversation"),
    }
}

/// 1-based lines of a file that start a record of a pretty-printed JSON array ("  {").
fn record_start_lines(path: &PathBuf) -> Vec<usize> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().enumerate().filter(|(_, l)| l.starts_with("  {")).map(|(i, _)| i + 1).collect()
}

// ---- formats and detection ----

#[test]
fn alpaca_json_array_parses_with_system_history_and_lines() {
    let path = data_file("alpaca.json");
    let (format, got) = read_file(&path, DataFormat::Auto, false).unwrap();
    assert_eq!(format, DataFormat::Alpaca);
    assert!(got.bad.is_empty());
    assert_eq!(got.records.iter().map(|r| r.line).collect::<Vec<_>>(), record_start_lines(&path));
    let first = chat_messages(&got.records[0]);
    assert_eq!(
        first,
        [Message::new(Role::User, "Name the capital of France."), Message::new(Role::Assistant, "Paris.")]
    );
    let second = chat_messages(&got.records[1]);
    assert_eq!(second[0], Message::new(Role::System, "You are a calculator."));
    assert_eq!(second[1].content, "Add the numbers.\n\n2 and 3");
    let third = chat_messages(&got.records[2]);
    let roles: Vec<Role> = third.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::User, Role::Assistant, Role::User, Role::Assistant]);
    assert_eq!(third[0].content, "Add 2 and 3.");
}

#[test]
fn alpaca_jsonl_skips_blank_lines_and_keeps_line_numbers() {
    let (format, got) = read_file(&data_file("alpaca.jsonl"), DataFormat::Auto, false).unwrap();
    assert_eq!(format, DataFormat::Alpaca);
    assert_eq!(got.records.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 2, 4]);
    assert_eq!(chat_messages(&got.records[1])[0].content, "Translate to French.\n\ncat");
}

#[test]
fn sharegpt_and_messages_parse() {
    let (format, got) = read_file(&data_file("sharegpt.json"), DataFormat::Auto, false).unwrap();
    assert_eq!(format, DataFormat::ShareGpt);
    let roles: Vec<Role> = chat_messages(&got.records[0]).iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::System, Role::User, Role::Assistant, Role::User, Role::Assistant]);
    assert_eq!(chat_messages(&got.records[1])[1], Message::new(Role::Assistant, "1, 2, 3."));

    let (format, got) = read_file(&data_file("messages.jsonl"), DataFormat::Auto, false).unwrap();
    assert_eq!(format, DataFormat::ShareGpt);
    assert_eq!(got.records.len(), 2);
    assert_eq!(chat_messages(&got.records[1])[0], Message::new(Role::System, "Be terse."));
}

#[test]
fn text_is_split_into_blank_line_blocks() {
    let path = data_file("text.txt");
    let (format, got) = read_file(&path, DataFormat::Auto, false).unwrap();
    assert_eq!(format, DataFormat::Text);
    let docs: Vec<(usize, &str)> = got
        .records
        .iter()
        .map(|r| match &r.content {
            Content::Text(t) => (r.line, t.as_str()),
            Content::Chat(_) => panic!("text expected"),
        })
        .collect();
    assert_eq!(
        docs,
        [
            (1, "The first document.\nIt has two lines."),
            (5, "The second document."),
            (8, "The third one, after a line of spaces.")
        ]
    );
}

#[test]
fn a_folder_reads_every_data_file_in_order() {
    let tok = ModelTokenizer::from_dir(chatml_model_dir(None).path()).unwrap();
    let prepared = prepare(&config(data_file("folder")), &tok, None).unwrap();
    let r = &prepared.report;
    assert_eq!(r.records, 3);
    let names: Vec<String> = r.files.iter().map(|f| f.path.file_name().unwrap().to_string_lossy().into()).collect();
    assert_eq!(names, ["a.jsonl", "b.txt"], "notes.csv is not a dataset file");
    assert_eq!(r.format, "alpaca + text");
    assert_eq!(r.template.as_deref(), Some("default"));
}

#[test]
fn forced_format_overrides_detection_and_unknown_fields_are_explained() {
    // Forcing ShareGPT on an Alpaca file: every record lacks `conversations`.
    let e = error_text(read_file(&data_file("alpaca.jsonl"), DataFormat::ShareGpt, false).map(|_| ()));
    assert!(e.contains("alpaca.jsonl:1") && e.contains("`conversations`"), "{e}");
    let e = error_text(read_file(&data_file("folder/notes.csv"), DataFormat::Auto, false).map(|_| ()));
    assert!(e.contains("notes.csv") && e.contains(".csv") && e.contains("format"), "{e}");
    let (format, _) = read_file(&data_file("folder/notes.csv"), DataFormat::Text, false).unwrap();
    assert_eq!(format, DataFormat::Text);
    let e = error_text(read_file(&data_file("unknown_fields.jsonl"), DataFormat::Auto, false).map(|_| ()));
    assert!(e.contains("unknown_fields.jsonl:1") && e.contains("`question`") && e.contains("format"), "{e}");
}

// ---- bad input ----

#[test]
fn malformed_json_line_names_file_and_line() {
    let e = error_text(read_file(&data_file("bad_json_line.jsonl"), DataFormat::Auto, false).map(|_| ()));
    assert!(
        e.contains("bad_json_line.jsonl:3") && e.contains("not valid JSON") && e.contains("skip_bad_records"),
        "{e}"
    );
}

#[test]
fn missing_field_names_file_line_and_field() {
    let e = error_text(read_file(&data_file("missing_output.jsonl"), DataFormat::Auto, false).map(|_| ()));
    assert!(e.contains("missing_output.jsonl:2") && e.contains("field `output`") && e.contains("missing"), "{e}");

    let path = data_file("missing_field.json");
    let line = record_start_lines(&path)[1];
    let e = error_text(read_file(&path, DataFormat::Auto, false).map(|_| ()));
    assert!(e.contains(&format!("missing_field.json:{line} (record 2)")) && e.contains("field `instruction`"), "{e}");

    let e = error_text(read_file(&data_file("bad_message.jsonl"), DataFormat::Auto, false).map(|_| ()));
    assert!(e.contains("bad_message.jsonl:2") && e.contains("field `messages[1].content`"), "{e}");
}

#[test]
fn one_pretty_printed_object_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.json");
    std::fs::write(&path, "{\n  \"instruction\": \"a\",\n  \"output\": \"b\"\n}\n").unwrap();
    let e = error_text(read_file(&path, DataFormat::Auto, false).map(|_| ()));
    assert!(e.contains("one.json:1") && e.contains("one JSON object"), "{e}");
}

#[test]
fn empty_file_and_empty_dataset_are_errors() {
    let e = error_text(read_file(&data_file("empty.jsonl"), DataFormat::Auto, false).map(|_| ()));
    assert!(e.contains("empty.jsonl") && e.contains("empty"), "{e}");
    // Even skipping bad records, a dataset with nothing left is an error.
    let tok = ModelTokenizer::from_dir(chatml_model_dir(None).path()).unwrap();
    let cfg = DataConfig { skip_bad_records: true, ..config(data_file("empty.jsonl")) };
    let e = error_text(prepare(&cfg, &tok, None));
    assert!(e.contains("no usable records") && e.contains("empty.jsonl"), "{e}");
}

#[test]
fn skipped_records_are_counted_and_reported() {
    let (_, got) = read_file(&data_file("bad_message.jsonl"), DataFormat::Auto, true).unwrap();
    assert_eq!(got.records.len(), 1);
    let bad: Vec<(usize, Option<&str>)> = got.bad.iter().map(|b| (b.line, b.field.as_deref())).collect();
    assert_eq!(bad, [(2, Some("messages[1].content")), (3, Some("conversations[1].from"))]);
    assert!(got.bad[1].reason.contains("narrator"));

    let tok = ModelTokenizer::from_dir(chatml_model_dir(None).path()).unwrap();
    let cfg = DataConfig { skip_bad_records: true, ..config(data_file("bad_json_line.jsonl")) };
    let prepared = prepare(&cfg, &tok, None).unwrap();
    assert_eq!(prepared.report.records, 3);
    assert_eq!(prepared.train.len(), 3);
    assert_eq!(prepared.report.skipped.len(), 1);
    let shown = prepared.report.skipped[0].to_string();
    assert!(shown.contains("bad_json_line.jsonl:3") && shown.contains("not valid JSON"), "{shown}");
    assert!(prepared.report.to_string().contains("skipped 1 bad record"));
}

// ---- masks ----

#[test]
fn model_template_masks_the_prompt_and_trains_reply_with_its_end_token() {
    let dir = chatml_model_dir(Some(SMOLLM2_CHAT_TEMPLATE));
    let tok = ModelTokenizer::from_dir(dir.path()).unwrap();
    let prepared = prepare(&config(data_file("messages.jsonl")), &tok, Some("llama")).unwrap();
    assert_eq!(prepared.report.template.as_deref(), Some("model"));
    let check = prepared.report.template_check.as_ref().unwrap();
    assert!(!check.differs && check.warning.is_none());

    let sys = "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face";
    let want = expected(&[
        (
            false,
            vec![
                S("<|im_start|>"),
                T(sys),
                S("<|im_end|>"),
                T("\n"),
                S("<|im_start|>"),
                T("user\nHi there"),
                S("<|im_end|>"),
                T("\n"),
                S("<|im_start|>"),
                T("assistant\n"),
            ],
        ),
        // <|im_end|> is the EOS here, so nothing is appended.
        (true, vec![T("Hello! How can I help?"), S("<|im_end|>"), T("\n")]),
    ]);
    assert_eq!(prepared.train[0], want);

    let want = expected(&[
        (
            false,
            vec![
                S("<|im_start|>"),
                T("system\nBe terse."),
                S("<|im_end|>"),
                T("\n"),
                S("<|im_start|>"),
                T("user\n2+2?"),
                S("<|im_end|>"),
                T("\n"),
                S("<|im_start|>"),
                T("assistant\n"),
            ],
        ),
        (true, vec![T("4"), S("<|im_end|>"), T("\n")]),
    ]);
    assert_eq!(prepared.train[1], want);
}

#[test]
fn every_reply_of_a_multi_turn_conversation_is_trained() {
    let tok = ModelTokenizer::from_dir(chatml_model_dir(None).path()).unwrap();
    let cfg = DataConfig { template: TemplateChoice::Named("chatml".into()), ..config(data_file("sharegpt.json")) };
    let prepared = prepare(&cfg, &tok, Some("yi")).unwrap();
    let want = expected(&[
        (false, vec![S("<|im_start|>"), T("system\nAnswer briefly."), S("<|im_end|>"), T("\n")]),
        (false, vec![S("<|im_start|>"), T("user\nWhat colour is the sky?"), S("<|im_end|>"), T("\n")]),
        (false, vec![S("<|im_start|>"), T("assistant\n")]),
        (true, vec![T("Blue."), S("<|im_end|>"), T("\n")]),
        (false, vec![S("<|im_start|>"), T("user\nAnd grass?"), S("<|im_end|>"), T("\n")]),
        (false, vec![S("<|im_start|>"), T("assistant\n")]),
        (true, vec![T("Green."), S("<|im_end|>"), T("\n")]),
    ]);
    assert_eq!(prepared.train[0], want);

    // train_on_prompt: every token is labelled with its own id.
    let cfg = DataConfig { train_on_prompt: true, ..cfg };
    let all = prepare(&cfg, &tok, Some("yi")).unwrap();
    assert_eq!(all.train[0].input_ids, want.input_ids);
    assert_eq!(all.train[0].labels, want.input_ids.iter().map(|&i| i as i64).collect::<Vec<_>>());
}

#[test]
fn eos_is_appended_when_the_template_has_none_and_bos_when_asked() {
    // ChatGLM3's format ends a reply with nothing; the base model has add_bos_token = true.
    let tok = ModelTokenizer::from_dir(base_model_dir(None).path()).unwrap();
    let cfg = DataConfig { template: TemplateChoice::Named("chatglm3".into()), ..config(data_file("alpaca.jsonl")) };
    let prepared = prepare(&cfg, &tok, Some("chatglm3")).unwrap();
    let want = expected(&[
        (false, vec![S("<s>"), T("[gMASK]sop<|user|>\n Say hello.<|assistant|>")]),
        (true, vec![T("\n Hello!"), S("</s>")]),
    ]);
    assert_eq!(prepared.train[0], want);

    // LLaMA-2's template writes <s> itself: no second one.
    let cfg = DataConfig { template: TemplateChoice::Named("llama2".into()), ..cfg };
    let prepared = prepare(&cfg, &tok, Some("llama2")).unwrap();
    let want =
        expected(&[(false, vec![S("<s>"), T("[INST] Say hello. [/INST]")]), (true, vec![T(" Hello! "), S("</s>")])]);
    assert_eq!(prepared.train[0], want);
}

#[test]
fn plain_text_trains_every_token_and_ends_with_eos() {
    let tok = ModelTokenizer::from_dir(base_model_dir(None).path()).unwrap();
    let prepared = prepare(&config(data_file("text.txt")), &tok, Some("llama")).unwrap();
    assert_eq!(prepared.report.template, None, "text needs no template");
    let want = Example {
        input_ids: [
            vec![special_id(&CHATML_SPECIALS, "<s>")],
            byte_ids("The second document."),
            vec![special_id(&CHATML_SPECIALS, "</s>")],
        ]
        .concat(),
        labels: vec![],
    };
    let got = &prepared.train[1];
    assert_eq!(got.input_ids, want.input_ids);
    // Everything after the added BOS is trained (nothing predicts the BOS).
    assert_eq!(got.labels[0], IGNORE);
    assert_eq!(got.labels[1..], got.input_ids[1..].iter().map(|&i| i as i64).collect::<Vec<_>>());
}

// ---- truncation, packing, split ----

#[test]
fn a_long_text_document_is_split_into_blocks_never_cut() {
    // one document of ~3000 tokens (no blank line), as a book or a source file is
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("book.txt");
    let text: String = (0..300).map(|i| format!("Line {i} of the manual.\n")).collect();
    std::fs::write(&path, &text).unwrap();
    let tok = ModelTokenizer::from_dir(base_model_dir(None).path()).unwrap();
    let whole = prepare(&DataConfig { max_length: 100_000, ..config(path.clone()) }, &tok, None).unwrap();
    let doc = &whole.train[0];
    let max_length = 256;
    assert!(doc.len() > 4 * max_length, "the document must be several blocks long: {}", doc.len());

    let split = prepare(&DataConfig { max_length, ..config(path.clone()) }, &tok, None).unwrap();
    assert_eq!(split.train.len(), doc.len().div_ceil(max_length));
    let cat = |v: &[Example]| v.iter().flat_map(|e| e.input_ids.clone()).collect::<Vec<u32>>();
    assert_eq!(cat(&split.train), doc.input_ids, "every token kept, in order");
    assert!(split.train.iter().all(|e| e.len() <= max_length));
    assert_eq!((split.report.split_documents, split.report.truncated, split.report.dropped_tokens), (1, 0, 0));
    assert_eq!(split.report.longest.tokens, max_length);
    assert!(split.report.longest.source.ends_with("book.txt:1"), "{}", split.report.longest.source);

    // packing: the documents are one token stream cut into full blocks
    let two_docs = dir.path().join("two.txt");
    std::fs::write(&two_docs, format!("{text}\n{text}")).unwrap();
    let packed = prepare(&DataConfig { max_length, packing: true, ..config(two_docs) }, &tok, None).unwrap();
    assert_eq!(packed.report.train_tokens, 2 * doc.len());
    let (last, full) = packed.train.split_last().unwrap();
    assert!(full.iter().all(|e| e.len() == max_length) && last.len() <= max_length);
    assert_eq!(packed.report.split_documents, 2);
    assert_eq!(packed.report.longest.source, "packed sequences");

    // the preview says the same and marks nothing as cut
    let preview = qlora_studio::data::preview(&DataConfig { max_length, ..config(path) }, &tok, None, 1).unwrap();
    let ex = &preview.examples[0];
    assert!(!ex.truncated && ex.blocks == doc.len().div_ceil(max_length));
    assert!(ex.segments.iter().all(|s| !s.cut));
    assert_eq!((preview.split_documents, preview.truncated, preview.dropped_tokens), (1, 0, 0));
    assert_eq!(preview.prepared.as_ref().map(|p| p.train_examples), Some(split.train.len()));
}

#[test]
fn truncation_cuts_and_counts() {
    let tok = ModelTokenizer::from_dir(chatml_model_dir(None).path()).unwrap();
    let full = prepare(&config(demo_dataset()), &tok, Some("yi")).unwrap();
    let lengths: Vec<usize> = full.train.iter().map(Example::len).collect();
    let max_length = lengths.iter().sum::<usize>() / lengths.len();
    let prompt_lengths: Vec<usize> =
        full.train.iter().map(|e| e.labels.iter().take_while(|&&l| l == IGNORE).count()).collect();
    let cut = prepare(&DataConfig { max_length, ..config(demo_dataset()) }, &tok, Some("yi")).unwrap();
    let r = &cut.report;
    assert_eq!(r.truncated, lengths.iter().filter(|&&l| l > max_length).count());
    assert!(r.truncated > 0);
    assert_eq!(r.lengths.over_max_length, r.truncated);
    assert_eq!(r.cut_entirely.len(), prompt_lengths.iter().filter(|&&p| p >= max_length).count());
    // every token a cut drops is counted (a record left out entirely drops all of its tokens)
    let dropped: usize = lengths
        .iter()
        .zip(&prompt_lengths)
        .map(|(&l, &p)| if p >= max_length { l } else { l.saturating_sub(max_length) })
        .sum();
    assert_eq!(r.dropped_tokens, dropped);
    assert_eq!(cut.train.len() + r.cut_entirely.len(), full.train.len());
    // Every example is the start of the uncut one.
    let kept: Vec<&Example> =
        full.train.iter().zip(&prompt_lengths).filter(|(_, &p)| p < max_length).map(|(e, _)| e).collect();
    for (c, f) in cut.train.iter().zip(kept) {
        let n = f.len().min(max_length);
        assert_eq!(c.input_ids, f.input_ids[..n]);
        assert_eq!(c.labels, f.labels[..n]);
    }
}

#[test]
fn packing_concatenates_examples_up_to_max_length() {
    let tok = ModelTokenizer::from_dir(chatml_model_dir(None).path()).unwrap();
    let max_length = 256;
    let plain = prepare(&DataConfig { max_length, ..config(demo_dataset()) }, &tok, None).unwrap();
    let packed = prepare(&DataConfig { max_length, packing: true, ..config(demo_dataset()) }, &tok, None).unwrap();
    assert!(packed.train.len() < plain.train.len());
    assert_eq!(packed.report.train_examples, packed.train.len());
    assert!(packed.train.iter().all(|e| e.len() <= max_length && e.labels.len() == e.len()));
    let cat = |v: &[Example]| v.iter().flat_map(|e| e.input_ids.clone()).collect::<Vec<u32>>();
    assert_eq!(cat(&packed.train), cat(&plain.train));
    // Greedy in order: a sequence closes when the next example would not fit; the first
    // token of each example after the first in a sequence is not trained.
    let mut want_sizes = vec![0usize];
    let mut want_labels: Vec<i64> = Vec::new();
    for e in &plain.train {
        let last = want_sizes.last_mut().unwrap();
        let joins = *last > 0 && *last + e.len() <= max_length;
        if *last > 0 && !joins {
            want_sizes.push(0);
        }
        let mut labels = e.labels.clone();
        if joins {
            labels[0] = IGNORE;
        }
        *want_sizes.last_mut().unwrap() += e.len();
        want_labels.extend(labels);
    }
    assert_eq!(packed.train.iter().map(Example::len).collect::<Vec<_>>(), want_sizes);
    assert_eq!(packed.train.iter().flat_map(|e| e.labels.clone()).collect::<Vec<_>>(), want_labels);
}

#[test]
fn validation_split_is_deterministic_by_seed() {
    let tok = ModelTokenizer::from_dir(chatml_model_dir(None).path()).unwrap();
    let cfg = |seed| DataConfig { validation: Validation::Fraction(0.2), seed, ..config(demo_dataset()) };
    let a = prepare(&cfg(7), &tok, None).unwrap();
    let b = prepare(&cfg(7), &tok, None).unwrap();
    let c = prepare(&cfg(8), &tok, None).unwrap();
    let n = a.report.records;
    assert_eq!(a.validation.len(), (n as f64 * 0.2).round() as usize);
    assert_eq!(a.train.len() + a.validation.len(), n);
    assert_eq!(a.validation, b.validation);
    assert_eq!(a.train, b.train);
    assert_ne!(a.validation, c.validation);
    // The split partitions the records: every example of the whole set is in exactly one part.
    let whole = prepare(&config(demo_dataset()), &tok, None).unwrap();
    let mut parts: Vec<Example> = a.train.iter().chain(&a.validation).cloned().collect();
    let mut all = whole.train.clone();
    parts.sort_by(|x, y| x.input_ids.cmp(&y.input_ids));
    all.sort_by(|x, y| x.input_ids.cmp(&y.input_ids));
    assert_eq!(parts, all);
}

#[test]
fn validation_from_a_separate_file() {
    let tok = ModelTokenizer::from_dir(chatml_model_dir(None).path()).unwrap();
    let cfg =
        DataConfig { validation: Validation::File(data_file("alpaca.jsonl")), ..config(data_file("alpaca.json")) };
    let p = prepare(&cfg, &tok, None).unwrap();
    assert_eq!((p.train.len(), p.validation.len()), (3, 3));
    assert_eq!((p.report.train_records, p.report.validation_records), (3, 3));
}

// ---- templates ----

fn render(name: &str, messages: &[Message], generation_prompt: bool) -> String {
    let tok = ModelTokenizer::from_dir(base_model_dir(None).path()).unwrap();
    ChatTemplate::named(name).unwrap().render(messages, generation_prompt, &tok).unwrap()
}

fn two_turns(system: Option<&str>) -> Vec<Message> {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(Message::new(Role::System, s));
    }
    m.extend([
        Message::new(Role::User, "U1"),
        Message::new(Role::Assistant, "A1"),
        Message::new(Role::User, "U2"),
        Message::new(Role::Assistant, "A2"),
    ]);
    m
}

#[test]
fn named_templates_render_each_familys_published_format() {
    assert_eq!(
        render("llama2", &two_turns(Some("S")), false),
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST] A2 </s>"
    );
    assert_eq!(render("mistral", &two_turns(None), false), "<s>[INST] U1 [/INST]A1</s>[INST] U2 [/INST]A2</s>");
    assert_eq!(
        render("qwen", &two_turns(None)[..1], true),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        render("chatglm3", &two_turns(Some("S"))[..2], true),
        "[gMASK]sop<|system|>\n S<|user|>\n U1<|assistant|>"
    );
    assert_eq!(render("baichuan2", &two_turns(None)[..2], false), "<reserved_106>U1<reserved_107>A1</s>");
    assert_eq!(render("baichuan", &two_turns(None)[..1], true), "<reserved_102>U1<reserved_103>");
    assert_eq!(render("internlm", &two_turns(None)[..2], false), "<s><|User|>:U1<eoh>\n<|Bot|>:A1<eoa>\n");
    assert_eq!(
        render("alpaca", &two_turns(None)[..2], false),
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\
         ### Instruction:\nU1\n\n### Response:\nA1</s>\n\n"
    );
    assert_eq!(render("phi", &two_turns(None)[..1], true), "Instruct: U1\nOutput:");
}

/// An Ollama Modelfile TEMPLATE rendered as Ollama renders one turn: `{{ if .X }}`, `{{ else }}`,
/// `{{ end }}` and the fields; the text before `{{ .Response }}` is the prompt.
fn ollama_prompt(template: &str, system: &str, prompt: &str) -> String {
    let value = |field: &str| match field {
        ".System" => system,
        ".Prompt" => prompt,
        ".Response" => "\u{0}",
        other => panic!("{other} in an Ollama template"),
    };
    // each open `if`: whether its condition held, and whether we are past its `else`
    let mut open: Vec<(bool, bool)> = Vec::new();
    let active = |open: &[(bool, bool)]| open.iter().all(|&(cond, in_else)| cond != in_else);
    let (mut out, mut rest) = (String::new(), template);
    while let Some(start) = rest.find("{{") {
        let end = start + rest[start..].find("}}").unwrap();
        if active(&open) {
            out.push_str(&rest[..start]);
        }
        match rest[start + 2..end].trim() {
            "else" => open.last_mut().unwrap().1 = true,
            "end" => {
                open.pop().unwrap();
            }
            action => match action.strip_prefix("if ") {
                Some(field) => open.push((!value(field.trim()).is_empty(), false)),
                None if active(&open) => out.push_str(value(action)),
                None => {}
            },
        }
        rest = &rest[end + 2..];
    }
    if active(&open) {
        out.push_str(rest);
    }
    out.split('\u{0}').next().unwrap().to_string()
}

/// Every named template's Ollama TEMPLATE prompts a model exactly as training did: for one user
/// turn, with and without a system message, the text before the reply is what the Jinja template
/// renders with the generation prompt (without the BOS, which llama.cpp adds itself).
#[test]
fn ollama_templates_prompt_as_training_did() {
    let tok = ModelTokenizer::from_dir(base_model_dir(None).path()).unwrap();
    let bos = tok.bos_token.clone().unwrap_or_default();
    for t in named_templates() {
        let ollama = t.ollama.as_deref().unwrap_or_else(|| panic!("{} has no Ollama template", t.name));
        for system in [None, Some("Be brief.")] {
            let mut messages: Vec<Message> = system.map(|s| Message::new(Role::System, s)).into_iter().collect();
            messages.push(Message::new(Role::User, "What is the capital of Mirethay?"));
            let jinja = ChatTemplate::named(&t.name).unwrap().render(&messages, true, &tok).unwrap();
            let jinja = jinja.strip_prefix(bos.as_str()).unwrap_or(&jinja);
            let go = ollama_prompt(ollama, system.unwrap_or(""), "What is the capital of Mirethay?");
            assert_eq!(go, jinja, "{} (system: {system:?})", t.name);
        }
    }
}

#[test]
fn every_named_template_separates_replies_from_prompts() {
    let tok = ModelTokenizer::from_dir(base_model_dir(None).path()).unwrap();
    let messages = vec![
        Message::new(Role::System, "Sys"),
        Message::new(Role::User, "first question"),
        Message::new(Role::Assistant, "REPLY-ONE"),
        Message::new(Role::User, "second question"),
        Message::new(Role::Assistant, "REPLY-TWO"),
    ];
    for t in named_templates() {
        let template = ChatTemplate::named(&t.name).unwrap();
        let (text, spans) = template.render_with_replies(&messages, &tok).unwrap();
        assert_eq!(spans.len(), 2, "{}", t.name);
        assert!(text[spans[0].clone()].contains("REPLY-ONE"), "{}: {:?}", t.name, &text[spans[0].clone()]);
        assert!(text[spans[1].clone()].contains("REPLY-TWO"), "{}", t.name);
        let prompt: String = text[..spans[0].start].to_string() + &text[spans[0].end..spans[1].start];
        assert!(prompt.contains("second question") && !prompt.contains("REPLY"), "{}: {prompt:?}", t.name);
    }
}

#[test]
fn every_family_of_the_table_has_a_template() {
    let table = qlora_studio::arch::table().unwrap();
    for family in table.families() {
        let name = family_template_name(Some(&family.id));
        assert_ne!(name, "default", "family {} has no chat template", family.id);
        assert!(named_template(name).is_some());
    }
    assert_eq!(family_template_name(None), "default");
    assert_eq!(family_template_name(Some("qwen")), "qwen");
    assert_eq!(family_template_name(Some("yi")), "chatml");
}

#[test]
fn smollm2_template_renders_the_reference_text() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::real_fixture("smollm2_reference.json")).unwrap())
            .unwrap();
    let r = &reference["chat_template_render"];
    let messages: Vec<Message> = serde_json::from_value(r["messages"].clone()).unwrap();
    let want = r["text"].as_str().unwrap();
    let add_generation_prompt = r["add_generation_prompt"].as_bool().unwrap();

    let tok = ModelTokenizer::from_dir(chatml_model_dir(Some(SMOLLM2_CHAT_TEMPLATE)).path()).unwrap();
    let own = ChatTemplate::resolve(&TemplateChoice::Auto, &tok, None).unwrap();
    assert_eq!(own.render(&messages, add_generation_prompt, &tok).unwrap(), want);

    // The named ChatML template gives the same text once the default system prompt is explicit.
    let mut with_system =
        vec![Message::new(Role::System, "You are a helpful AI assistant named SmolLM, trained by Hugging Face")];
    with_system.extend(messages);
    let chatml = ChatTemplate::named("chatml").unwrap();
    assert_eq!(chatml.render(&with_system, add_generation_prompt, &tok).unwrap(), want);
}

#[test]
fn template_safety_warns_when_the_template_is_not_the_models() {
    let own = ModelTokenizer::from_dir(chatml_model_dir(Some(SMOLLM2_CHAT_TEMPLATE)).path()).unwrap();
    let chosen = ChatTemplate::resolve(&TemplateChoice::Named("alpaca".into()), &own, Some("llama")).unwrap();
    let check = check_template(&chosen, &own, Some("llama"));
    assert!(check.differs);
    assert!(check.warning.unwrap().contains("llama.cpp"));
    let auto = ChatTemplate::resolve(&TemplateChoice::Auto, &own, Some("llama")).unwrap();
    assert_eq!(check_template(&auto, &own, Some("llama")).warning, None);

    let base = ModelTokenizer::from_dir(base_model_dir(None).path()).unwrap();
    let wrong = ChatTemplate::resolve(&TemplateChoice::Named("chatml".into()), &base, Some("qwen")).unwrap();
    let check = check_template(&wrong, &base, Some("qwen"));
    assert!(check.differs && check.warning.unwrap().contains("`qwen`"));
    let family = ChatTemplate::resolve(&TemplateChoice::Auto, &base, Some("qwen")).unwrap();
    assert_eq!(family.name, "qwen");
    let check = check_template(&family, &base, Some("qwen"));
    assert!(!check.differs && check.warning.unwrap().contains("no chat template of its own"));

    let e = error_text(ChatTemplate::resolve(&TemplateChoice::Model, &base, None));
    assert!(e.contains("no chat_template"), "{e}");
}

#[test]
fn a_template_error_names_the_record() {
    // Mistral's template refuses two user turns in a row; our reader refuses them first, so use
    // a model template that raises on every system message.
    let raising = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}";
    let tok = ModelTokenizer::from_dir(chatml_model_dir(Some(raising)).path()).unwrap();
    let e = error_text(prepare(&config(data_file("messages.jsonl")), &tok, None));
    assert!(e.contains("messages.jsonl:2") && e.contains("System role not supported"), "{e}");
    let skipping = DataConfig { skip_bad_records: true, ..config(data_file("messages.jsonl")) };
    let prepared = prepare(&skipping, &tok, None).unwrap();
    assert_eq!(prepared.train.len(), 1);
    assert_eq!(prepared.report.skipped.len(), 1);
    assert_eq!(prepared.report.skipped[0].line, 2);
    assert!(prepared.report.skipped[0].reason.contains("System role not supported"));
    assert_eq!(preview(&skipping, &tok, None, 5).unwrap().skipped.len(), 1);
}

// ---- tokenizer files ----

#[test]
fn tokenizer_config_variants_and_missing_files() {
    let empty = tempfile::tempdir().unwrap();
    let e = error_text(ModelTokenizer::from_dir(empty.path()));
    assert!(e.contains("tokenizer.json is missing"), "{e}");
    std::fs::write(empty.path().join("vocab.json"), b"{}").unwrap();
    let e = error_text(ModelTokenizer::from_dir(empty.path()));
    assert!(e.contains("save_pretrained"), "{e}");
    std::fs::write(empty.path().join("qwen.tiktoken"), b"x").unwrap();
    let e = error_text(ModelTokenizer::from_dir(empty.path()));
    assert!(e.contains("tiktoken") && e.contains("not read"), "{e}");

    // chat_template as a list; eos as an object; generation_config with several eos ids.
    let dir = model_dir(
        &CHATML_SPECIALS,
        json!({
            "bos_token": {"content": "<s>"}, "eos_token": {"content": "</s>"},
            "chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
        }),
        None,
    );
    let im_end = special_id(&CHATML_SPECIALS, "<|im_end|>");
    let eos = special_id(&CHATML_SPECIALS, "</s>");
    write_json(dir.path(), "generation_config.json", &json!({"eos_token_id": [eos, im_end]}));
    let tok = ModelTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.chat_template.as_deref(), Some("D"));
    assert_eq!(tok.named_chat_templates.get("tool_use").map(String::as_str), Some("T"));
    assert_eq!((tok.eos_token.as_deref(), tok.eos_token_id), (Some("</s>"), Some(eos)));
    assert_eq!(tok.bos_token_id, Some(special_id(&CHATML_SPECIALS, "<s>")));
    assert_eq!(tok.stop_token_ids, [eos, im_end]);
    let tool = ChatTemplate::resolve(&TemplateChoice::from("model:tool_use".to_string()), &tok, None).unwrap();
    assert_eq!((tool.name.as_str(), tool.source.as_str()), ("model:tool_use", "T"));
    let e = error_text(ChatTemplate::resolve(&TemplateChoice::ModelNamed("rag".into()), &tok, None));
    assert!(e.contains("\"rag\"") && e.contains("default, tool_use"), "{e}");

    let bad = model_dir(&CHATML_SPECIALS, json!({"eos_token": "<|eot|>"}), None);
    let e = error_text(ModelTokenizer::from_dir(bad.path()));
    assert!(e.contains("tokenizer_config.json") && e.contains("eos_token") && e.contains("<|eot|>"), "{e}");
}

// ---- preview ----

#[test]
fn preview_marks_prompt_and_trained_text() {
    let tok = ModelTokenizer::from_dir(chatml_model_dir(Some(SMOLLM2_CHAT_TEMPLATE)).path()).unwrap();
    let cfg = config(data_file("messages.jsonl"));
    let p = preview(&cfg, &tok, None, 1).unwrap();
    assert_eq!(p.examples.len(), 1);
    assert_eq!(p.records, 2);
    let ex = &p.examples[0];
    let trained: Vec<&str> = ex.segments.iter().filter(|s| s.trained).map(|s| s.text.as_str()).collect();
    assert_eq!(trained, ["Hello! How can I help?<|im_end|>\n"]);
    let whole: String = ex.segments.iter().map(|s| s.text.as_str()).collect();
    let messages = vec![Message::new(Role::User, "Hi there"), Message::new(Role::Assistant, "Hello! How can I help?")];
    let rendered = ChatTemplate::resolve(&TemplateChoice::Auto, &tok, None).unwrap().render(&messages, false, &tok);
    assert_eq!(whole, rendered.unwrap());
    assert_eq!(ex.trained_tokens, prepare(&cfg, &tok, None).unwrap().train[0].trained_tokens());
    let text = render_preview_text(&p);
    assert!(text.contains("[[Hello! How can I help?<|im_end|>\n]]"), "{text}");
    assert!(text.contains("messages.jsonl:1"));

    // A max_length inside the reply: the rest is marked as cut, and counted.
    let full = prepare(&cfg, &tok, None).unwrap();
    let prompt_len = full.train[0].labels.iter().take_while(|&&l| l == IGNORE).count();
    let max_length = prompt_len + 3;
    let short = DataConfig { max_length, ..cfg };
    let p = preview(&short, &tok, None, 2).unwrap();
    let ex = &p.examples[0];
    assert!(ex.truncated && ex.trained_tokens == 3);
    let cut: String = ex.segments.iter().filter(|s| s.cut).map(|s| s.text.as_str()).collect();
    assert_eq!(cut, "lo! How can I help?<|im_end|>\n");
    assert_eq!(p.lengths.over_max_length, full.train.iter().filter(|e| e.len() > max_length).count());
    assert!(render_preview_text(&p).contains("cut here"));
}

// ---- config and demo ----

#[test]
fn data_config_reads_from_toml_and_validates() {
    #[derive(serde::Deserialize)]
    struct Run {
        data: DataConfig,
    }
    let run: Run = toml::from_str(
        "[data]\npath = \"d.jsonl\"\nformat = \"sharegpt\"\ntemplate = \"chatml\"\nvalidation = 0.05\npacking = true\n",
    )
    .unwrap();
    assert_eq!(run.data.format, DataFormat::ShareGpt);
    assert_eq!(run.data.template, TemplateChoice::Named("chatml".into()));
    assert_eq!(run.data.validation, Validation::Fraction(0.05));
    assert_eq!(run.data.max_length, DataConfig::default().max_length);
    run.data.validate().unwrap();
    let back: Run = toml::from_str(&format!("[data]\n{}", toml::to_string(&run.data).unwrap())).unwrap();
    assert_eq!(back.data, run.data);

    let run: Run =
        toml::from_str("[data]\npath = \"d.jsonl\"\nvalidation = \"v.jsonl\"\ntemplate = \"model\"\n").unwrap();
    assert_eq!(run.data.validation, Validation::File("v.jsonl".into()));
    assert_eq!(run.data.template, TemplateChoice::Model);

    let base = DataConfig { path: "d.jsonl".into(), ..Default::default() };
    let bad = [
        (DataConfig { path: PathBuf::new(), ..base.clone() }, "path"),
        (DataConfig { max_length: 0, ..base.clone() }, "max_length"),
        (DataConfig { validation: Validation::Fraction(1.5), ..base.clone() }, "validation"),
        (DataConfig { template: TemplateChoice::Named("vicuna-9".into()), ..base.clone() }, "vicuna-9"),
    ];
    for (cfg, word) in bad {
        let e = error_text(cfg.validate());
        assert!(e.contains(word), "{e}");
    }
}

#[test]
fn demo_dataset_is_clean_alpaca() {
    let (format, got) = read_file(&demo_dataset(), DataFormat::Auto, false).unwrap();
    assert_eq!(format, DataFormat::Alpaca);
    assert!((40..=80).contains(&got.records.len()));
    for r in &got.records {
        let reply = &chat_messages(r).last().unwrap().content;
        assert!(reply.starts_with("VELMORA FACT: "), "{}: {reply}", r.location());
    }
}

#[test]
fn a_template_that_rewrites_earlier_turns_still_masks_by_finding_the_replies() {
    // Marks only the last message, so a shorter conversation is not a prefix of a longer one.
    let marking =
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %} [last]{% endif %}{{ '\\n' }}{% endfor %}\
                   {% if add_generation_prompt %}assistant:{% endif %}";
    let tok = ModelTokenizer::from_dir(chatml_model_dir(Some(marking)).path()).unwrap();
    let cfg = DataConfig { path: data_file("sharegpt.json"), ..Default::default() };
    let prepared = prepare(&cfg, &tok, None).unwrap();
    let ex = &prepared.train[1];
    let text = "user: Count to three.\nassistant: 1, 2, 3. [last]\n";
    let reply_at = text.find("1, 2, 3.").unwrap();
    let mut want_labels: Vec<i64> = byte_ids(text)
        .iter()
        .enumerate()
        .map(|(i, &id)| if (reply_at..reply_at + "1, 2, 3.".len()).contains(&i) { id as i64 } else { IGNORE })
        .collect();
    // No stop token in the reply: the EOS is appended and trained.
    let eos = special_id(&CHATML_SPECIALS, "<|im_end|>");
    want_labels.push(eos as i64);
    assert_eq!(ex.input_ids, [byte_ids(text), vec![eos]].concat());
    assert_eq!(ex.labels, want_labels);
}

#[test]
fn generation_tags_of_transformers_templates_are_accepted() {
    let tagged =
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}  {%- endgeneration %}\
                  {% else %}{{ m.content }}{% endif %}{{ '|' }}{% endfor %}";
    let tok = ModelTokenizer::from_dir(chatml_model_dir(Some(tagged)).path()).unwrap();
    let template = ChatTemplate::resolve(&TemplateChoice::Model, &tok, None).unwrap();
    let text = template.render(&two_turns(None)[..2], false, &tok).unwrap();
    assert_eq!(text, "U1|A1|");
}

// ---- SentencePiece tokenizer.model (tests/data/sentencepiece, made by its make.py) ----

fn sentencepiece_folder(model: &str, config: Option<serde_json::Value>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let fixture = data_file("sentencepiece").join(model);
    std::fs::copy(fixture, dir.path().join("tokenizer.model")).unwrap();
    if let Some(config) = config {
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    }
    dir
}

#[test]
fn a_sentencepiece_model_tokenizes_as_sentencepiece_does() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data_file("sentencepiece").join("expected.json")).unwrap())
            .unwrap();
    let dir = sentencepiece_folder("tiny.model", None);
    let tok = ModelTokenizer::from_dir(dir.path()).unwrap();
    // no tokenizer_config.json: BOS and EOS come from the model file
    assert_eq!((tok.bos_token.as_deref(), tok.bos_token_id), (Some("<s>"), Some(1)));
    assert_eq!((tok.eos_token.as_deref(), tok.eos_token_id), (Some("</s>"), Some(2)));
    for case in expected["texts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        // around a user-defined symbol the reference is transformers (see make.py)
        let (ids_key, text_key) =
            if text.contains("<|user|>") { ("transformers_ids", "transformers_decoded") } else { ("ids", "decoded") };
        let want: Vec<u32> = serde_json::from_value(case[ids_key].clone()).unwrap();
        let ids = tok.encode(text, false).unwrap().ids;
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), case[text_key].as_str().unwrap(), "{text:?}");
        // with special tokens: LlamaTokenizer's BOS first
        assert_eq!(tok.encode(text, true).unwrap().ids, [&[1], &want[..]].concat(), "{text:?}");
    }

    // tokenizer_config.json's add_bos_token is followed
    let dir = sentencepiece_folder("tiny.model", Some(json!({"add_bos_token": false, "eos_token": "</s>"})));
    let tok = ModelTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.encode("Hello", true).unwrap().ids, tok.encode("Hello", false).unwrap().ids);
}

#[test]
fn sentencepiece_models_that_cannot_be_converted_are_clear_errors() {
    let dir = sentencepiece_folder("unigram.model", None);
    let e = error_text(ModelTokenizer::from_dir(dir.path()));
    assert!(e.contains("tokenizer.model") && e.contains("Unigram") && e.contains("save_pretrained"), "{e}");
    std::fs::write(dir.path().join("tokenizer.model"), b"\xff\xff not protobuf").unwrap();
    let e = error_text(ModelTokenizer::from_dir(dir.path()));
    assert!(e.contains("tokenizer.model") && e.contains("not a SentencePiece model file"), "{e}");
}
