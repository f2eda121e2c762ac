//! English and Simplified Chinese. Strings are keyed by their English text, so the code reads
//! as English and a missing translation falls back to it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Lang {
    #[default]
    En,
    Zh,
}

impl Lang {
    pub fn label(self) -> &'static str {
        match self {
            Lang::En => "English",
            Lang::Zh => "简体中文",
        }
    }
}

/// The text of `english` in `lang`.
pub fn tr(lang: Lang, english: &'static str) -> &'static str {
    if lang == Lang::En {
        return english;
    }
    ZH.iter().find(|(en, _)| *en == english).map(|(_, zh)| *zh).unwrap_or(english)
}

/// `template` in `lang` with each `{}` replaced by the next of `args`: for the texts that carry
/// numbers or names ("{} tokens, {} trained").
pub fn trf(lang: Lang, template: &'static str, args: &[&dyn std::fmt::Display]) -> String {
    fill(tr(lang, template), args.iter().map(|a| a.to_string()))
}

fn fill(template: &str, args: impl IntoIterator<Item = String>) -> String {
    let mut args = args.into_iter();
    let mut parts = template.split("{}");
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        out.push_str(&args.next().unwrap_or_default());
        out.push_str(part);
    }
    out
}

/// A message made in English elsewhere (the trainer's events, the run log, the status line) in
/// `lang`: its own entry, else the entry whose template (`{}` for each value) it fills, the
/// values translated in turn; the English text when there is none.
pub fn tr_message(lang: Lang, text: &str) -> String {
    if lang == Lang::En || text.is_empty() {
        return text.to_string();
    }
    if let Some((_, zh)) = ZH.iter().find(|(en, _)| *en == text) {
        return zh.to_string();
    }
    // the most specific template: the one with the most fixed text
    let best = ZH
        .iter()
        .filter(|(en, _)| en.contains("{}"))
        .filter_map(|(en, zh)| Some((en.len(), zh, template_values(en, text)?)))
        .max_by_key(|(fixed, _, _)| *fixed);
    match best {
        Some((_, zh, values)) => fill(zh, values.into_iter().map(|v| tr_message(lang, v))),
        None => text.to_string(),
    }
}

/// The values `text` puts in the `{}` of `template` (each non-empty, matched leftmost), or None
/// when it does not fill it. A template needs fixed text besides its values.
fn template_values<'a>(template: &str, text: &'a str) -> Option<Vec<&'a str>> {
    let parts: Vec<&str> = template.split("{}").collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.iter().all(|p| p.trim().is_empty()) || text.len() < first.len() + last.len() {
        return None;
    }
    let mut rest = text.strip_prefix(first)?.strip_suffix(last)?;
    let mut values = Vec::with_capacity(parts.len() - 1);
    for sep in &parts[1..parts.len() - 1] {
        // the value runs to the next fixed part; it may not be empty
        let at = rest.get(1..)?.find(sep)? + 1;
        values.push(&rest[..at]);
        rest = &rest[at + sep.len()..];
    }
    (!rest.is_empty()).then(|| {
        values.push(rest);
        values
    })
}

/// (English, 简体中文). Keep in the order the UI shows them. `{}` stands for a value (a number, a
/// name) in texts built with `format!`; the Chinese has as many, in the same order.
pub const ZH: &[(&str, &str)] = &[
    ("Model", "模型"),
    ("Dataset", "数据集"),
    ("LoRA", "LoRA"),
    ("Training", "训练"),
    ("Memory", "显存/内存"),
    ("Run", "运行"),
    ("Runs", "历史运行"),
    ("Try", "试用"),
    ("Export", "导出"),
    ("Language", "语言"),
    ("Save config…", "保存配置…"),
    ("Load config…", "加载配置…"),
    ("Source", "来源"),
    ("Folder…", "文件夹…"),
    ("GGUF file…", "GGUF 文件…"),
    ("File…", "文件…"),
    ("From the table", "从架构表选择"),
    ("Family", "模型家族"),
    ("Size", "规模"),
    ("Use", "使用"),
    ("Hub cache", "本地 Hub 缓存"),
    ("Parameters", "参数量"),
    ("Layers", "层数"),
    ("Heads", "注意力头"),
    ("Vocabulary", "词表"),
    ("Context", "上下文长度"),
    ("Mode", "模式"),
    ("Device", "设备"),
    ("Compute", "计算精度"),
    ("GPU tensors at their peak (the plot's peak in each step)", "GPU 张量峰值（即曲线中的“每步峰值”）"),
    ("GPU: used on the card", "GPU：整卡已用"),
    ("The dtype of the frozen weights and activations. LoRA weights and optimizer state stay f32.", "冻结权重与激活值的数据类型。LoRA 权重和优化器状态始终为 f32。"),
    ("Format", "格式"),
    ("Template", "模板"),
    ("Max length", "最大长度"),
    ("Packing", "样本拼接"),
    ("Train on prompt tokens too", "也训练提示词部分"),
    ("Validation fraction", "验证集比例"),
    ("Preview", "预览"),
    ("Skip bad records (they are counted and listed)", "跳过有问题的记录（会计数并列出）"),
    ("the model's own template, else its family's", "模型自带模板，否则用其家族的模板"),
    ("records", "条记录"),
    ("cut by the max length", "条被最大长度截断"),
    ("bad records", "条有问题的记录"),
    ("Token lengths (the line is the max length)", "词元长度分布（竖线为最大长度）"),
    ("examples", "样本"),
    ("Rank r", "秩 r"),
    ("Alpha", "Alpha"),
    ("Dropout", "Dropout"),
    ("Target modules", "目标模块"),
    ("Table default", "表格默认"),
    ("Attention", "注意力层"),
    ("All linear", "全部线性层"),
    ("Trainable parameters", "可训练参数"),
    ("Adapter memory", "适配器内存"),
    ("Learning rate", "学习率"),
    ("Schedule", "学习率调度"),
    ("Warmup steps", "预热步数"),
    ("Epochs", "轮数"),
    ("Max steps (0 = from epochs)", "最大步数（0 = 按轮数）"),
    ("Batch size", "批大小"),
    ("Gradient accumulation", "梯度累积"),
    ("Gradient checkpointing", "梯度检查点"),
    ("Memory check", "内存检查"),
    ("magnitude per output row", "每个输出行一个幅度"),
    (
        "Weight-decomposed LoRA (PEFT's use_dora): a trainable magnitude scales each output row of the normalised W + s·B·A. Often a little better than LoRA at the same rank; each step costs more.",
        "权重分解 LoRA（PEFT 的 use_dora）：一个可训练的幅度缩放归一化后的 W + s·B·A 的每个输出行。同样的秩下常比 LoRA 略好；每步更慢。",
    ),
    ("Start anyway", "仍然开始"),
    (
        "Starts this run once more, ignoring the memory estimate (the Training section's Memory check does so for every run).",
        "再次开始这次训练，忽略内存估算（“训练”部分的内存检查对每次训练都如此）。",
    ),
    // the trainer's notices about the data and the memory plan (src/data, src/train/memory_plan.rs)
    (
        "{} conversations are longer than max_length = {} and were cut: {} tokens dropped",
        "{} 段对话超过 max_length = {}，已截断：丢弃 {} 个词元",
    ),
    (
        "{} text documents are longer than max_length = {}: {} into blocks, no token dropped",
        "{} 篇文本超过 max_length = {}：{}为多个块，没有丢弃任何词元",
    ),
    ("packed as one token stream", "作为一个词元流打包"),
    ("split", "切分"),
    (
        "the largest micro-batch, {} × {} tokens (the longest training sequence: {}), needs about {} (band {} – {}), more than the {} of {}",
        "最大的微批次 {} × {} 个词元（最长的训练序列：{}）约需 {}（范围 {} – {}），超过 {}（{}）",
    ),
    (
        "{}: training with micro-batches of {} and {}× gradient accumulation instead (the same effective batch of {})",
        "{}：改用 {} 的微批次和 {} 倍梯度累积训练（有效批大小不变，仍为 {}）",
    ),
    ("{}: it may not fit (the lower end of the band does)", "{}：可能放不下（范围的下限能放下）"),
    ("{}; starting anyway, as train.ignore_memory_estimate asks", "{}；按 train.ignore_memory_estimate 的要求照样开始"),
    (
        "gradient checkpointing is on: without it the largest micro-batch, {} × {} tokens (the longest training sequence: {}), would need about {} (up to {}), more than the {} of {}",
        "已开启梯度检查点：否则最大的微批次 {} × {} 个词元（最长的训练序列：{}）约需 {}（最多 {}），超过 {}（{}）",
    ),
    ("packed sequences", "打包后的序列"),
    (
        "for the largest micro-batch: {} × {} tokens (the longest sequence: {})",
        "按最大的微批次估算：{} × {} 个词元（最长序列：{}）",
    ),
    (
        "for micro-batches of {} × {} tokens (batch × max length, until the data is read)",
        "按 {} × {} 个词元的微批次估算（批大小 × 最大长度，数据读入之前）",
    ),
    ("start even if the estimate says it does not fit", "即使估算显示放不下也开始"),
    (
        "A run whose estimate does not fit trains in smaller micro-batches, or is refused with what to change. Tick this to start it anyway.",
        "估算放不下的训练会改用更小的微批次，或被拒绝并给出修改建议。勾选此项则照样开始。",
    ),
    ("off", "关"),
    ("on", "开"),
    ("auto (on a GPU; on the CPU when it would not fit otherwise)", "自动（GPU 上开启；CPU 上在放不下时开启）"),
    (
        "Keeps only each layer's input and recomputes the layer in the backward: the same results with far less memory, for about a third more time per step.",
        "只保留每一层的输入，反向传播时重新计算该层：结果相同，内存少得多，每步约多用三分之一的时间。",
    ),
    ("Seed", "随机种子"),
    ("Evaluate every", "每隔多少步验证"),
    ("Checkpoint every", "每隔多少步保存"),
    ("Sample every", "每隔多少步生成样例"),
    ("Sample prompts (one per line)", "样例提示词（每行一个）"),
    ("Output folder", "输出文件夹"),
    ("Start", "开始"),
    ("Pause", "暂停"),
    ("Resume", "继续"),
    ("Stop", "停止"),
    ("Save now", "立即保存"),
    ("Loss", "损失"),
    ("Validation loss", "验证损失"),
    ("Training loss", "训练损失"),
    ("Learning rate over steps", "学习率"),
    ("Gradient norm", "梯度范数"),
    ("Tokens/s", "每秒词元数"),
    ("Memory (MiB)", "内存 (MiB)"),
    ("Samples", "生成样例"),
    ("Peak in each step (tensors)", "每步峰值（张量）"),
    ("Estimate of that peak", "该峰值的估算"),
    ("Estimate with the CUDA context", "含 CUDA 上下文的估算"),
    ("Estimate with the process around the run", "含进程其余部分的估算"),
    ("RSS (the whole process)", "RSS（整个进程）"),
    (
        "Lines of one colour belong together. The peak in each step is the most the run's tensors held between the step's start and its end, against the estimate of that peak. RSS is the whole process (binary, data, window, memory kept after a free), against the estimate with the process around the run.",
        "同色的线互相对照。每步峰值是本次运行的张量在一步开始到结束之间占用的最大内存，对照“该峰值的估算”；RSS 是整个应用（窗口、运行时、释放后仍保留的内存），对照“含进程其余部分的估算”。",
    ),
    ("Log", "日志"),
    ("Not started", "未开始"),
    ("Loading", "加载中"),
    ("Training…", "训练中…"),
    ("Paused", "已暂停"),
    ("Finished", "已完成"),
    ("Stopped", "已停止"),
    ("Failed", "失败"),
    ("step", "步"),
    ("ETA", "预计剩余"),
    ("no model chosen", "未选择模型"),
    ("Importing the GGUF file…", "正在导入 GGUF 文件…"),
    ("Downloading", "正在下载"),
    ("files", "文件"),
    ("not in the local Hugging Face cache", "不在本地 Hugging Face 缓存中"),
    ("Download", "下载"),
    ("Retry download", "重新下载"),
    ("Cancel", "取消"),
    (
        "The memory estimate uses this model's published config until it is downloaded.",
        "下载完成前，内存估算使用该模型公开的配置。",
    ),
    (
        "The estimate comes once the model is local (or pick a size from the table).",
        "模型在本地就绪后给出估算（或从架构表中选择一个规模）。",
    ),
    ("fits", "放得下"),
    ("does not fit", "放不下"),
    ("Estimate", "估计"),
    ("band", "区间"),
    ("No device memory to compare with was found.", "未找到可比较的设备内存。"),
    ("largest sequence that fits", "可容纳的最长序列"),
    ("largest batch that fits", "可容纳的最大批"),
    ("Suggestions", "建议"),
    // the memory suggestions (src/memory/fit.rs, Change::template)
    ("gradient checkpointing (each block recomputed in the backward)", "梯度检查点（反向传播时重新计算每一层）"),
    ("QLoRA (NF4 base) instead of LoRA", "改用 QLoRA（NF4 基座）代替 LoRA"),
    ("batch 1 with {} gradient-accumulation steps", "批大小 1，梯度累积 {} 步"),
    ("targets {} only", "只训练 {}"),
    ("sequences of at most {} tokens", "序列最长 {} 个词元"),
    ("Reopen", "打开"),
    ("Compare", "对比"),
    ("Settings", "设置"),
    ("Steps", "步数"),
    (" · default", " · 默认"),
    (
        "The preview comes once the model is local (it uses the model's tokenizer).",
        "模型在本地就绪后显示预览（预览使用模型的分词器）。",
    ),
    // the memory estimate's parts (src/memory/estimate.rs)
    ("frozen linears", "冻结的线性层"),
    ("embeddings, lm_head, norms", "词嵌入、lm_head、归一化层"),
    ("LoRA + grads + AdamW", "LoRA + 梯度 + AdamW"),
    ("activations", "激活值"),
    ("logits + loss", "logits + 损失"),
    ("backward working set", "反向传播工作集"),
    ("dequantized weight", "反量化权重"),
    ("CPU runtime buffers", "CPU 运行时缓冲"),
    ("process: binary, data, window", "进程：程序、数据、窗口"),
    ("CUDA context, cuBLAS, pool reserve", "CUDA 上下文、cuBLAS、内存池余量"),
    ("available RAM", "可用内存"),
    ("Adapter", "适配器"),
    ("Training loss of the compared runs", "所选运行的训练损失"),
    ("Peak memory", "内存峰值"),
    ("Export…", "导出…"),
    ("Use its settings", "使用其设置"),
    ("Resume from last checkpoint", "从最近的检查点继续"),
    ("No runs yet.", "还没有运行记录。"),
    ("Prompt", "提示词"),
    ("Generate", "生成"),
    ("Without adapter", "不加适配器"),
    ("With adapter", "加适配器"),
    ("As a chat turn (the model's template)", "作为对话轮次（使用模型模板）"),
    ("Max new tokens", "最多生成词元数"),
    ("No checkpoint yet: train first to compare with the adapter.", "还没有检查点：先训练，才能与适配器对比。"),
    ("Checkpoint", "检查点"),
    ("Export as…", "导出为…"),
    ("PEFT adapter", "PEFT 适配器"),
    ("GGUF adapter (llama.cpp, Ollama)", "GGUF 适配器（llama.cpp、Ollama）"),
    ("Merged model", "合并后的模型"),
    ("Merged model as one GGUF (llama.cpp, Ollama)", "合并为单个 GGUF 模型（llama.cpp、Ollama）"),
    ("Quantization:", "量化："),
    ("Exported to", "已导出到"),
    ("Exporting…", "导出中…"),
    ("Use the last checkpoint", "使用最近的检查点"),
    ("bf16 tensors (half the size)", "bf16 张量（体积减半）"),
    ("f16 tensors (half the size)", "f16 张量（体积减半）"),
    ("Also write an Ollama Modelfile", "同时写出 Ollama Modelfile"),
    (
        "Merge into the dequantized NF4 weights the adapter was trained against (QLoRA)",
        "合并到训练时使用的反量化 NF4 权重（QLoRA）",
    ),
    ("A divergence check compares the merged model with base + adapter.", "合并后会与“基座 + 适配器”做一致性对比。"),
    ("Error", "错误"),
    ("Warning", "警告"),
    ("Suggested prompts", "推荐提示词"),
    ("packed", "已打包"),
    (" · fused {}", " · 融合 {}"),
    // the header's machine line
    ("GPU {}: {}, {} ({} free)", "GPU {}：{}，{}（空闲 {}）"),
    (", compute {}", "，计算能力 {}"),
    ("CPU: {} cores", "CPU：{} 核"),
    (", {} RAM", "，内存 {}"),
    ("built without the cuda feature: training runs on the CPU", "构建时未启用 cuda 功能：训练在 CPU 上运行"),
    // the dataset preview's cards
    ("{} · {} tokens, {} trained", "{} · {} 个词元，其中 {} 个参与训练"),
    // the status line and the notification
    ("run finished at step {}; adapter in {}", "运行已完成，共 {} 步；适配器在 {}"),
    ("run stopped at step {}; adapter in {}", "运行已在第 {} 步停止；适配器在 {}"),
    ("run finished at step {}", "运行已完成，共 {} 步"),
    ("run stopped at step {}", "运行已在第 {} 步停止"),
    ("qlora-studio: run finished", "qlora-studio：运行已完成"),
    ("qlora-studio: run failed", "qlora-studio：运行失败"),
    ("{} holds an earlier run; this one writes to {}", "{} 中已有之前的运行；本次写入 {}"),
    ("run config saved to {}", "运行配置已保存到 {}"),
    ("the settings could not be saved to {}: {}", "设置无法保存到 {}：{}"),
    ("{} could not be read ({}); {}. Starting from the defaults.", "无法读取 {}（{}）；{}。改用默认设置。"),
    ("kept as {}", "已另存为 {}"),
    ("and could not be moved aside: {}", "且无法移到一旁：{}"),
    // the run log (src/gui/run_view.rs) and the trainer's events (src/train/trainer.rs)
    (
        "training {} of {} parameters on {} examples; {} steps, micro-batch {} × {}",
        "训练 {} 个参数（共 {} 个），{} 个样本；{} 步，微批 {} × {}",
    ),
    ("note: {}", "提示：{}"),
    ("step {}: validation loss {}", "第 {} 步：验证损失 {}"),
    ("step {}: checkpoint {}", "第 {} 步：检查点 {}"),
    ("paused at step {}", "已在第 {} 步暂停"),
    ("resumed at step {}", "已从第 {} 步继续"),
    ("finished at step {}", "已完成，共 {} 步"),
    ("failed: {}", "失败：{}"),
    ("reading checkpoint {}", "正在读取检查点 {}"),
    ("loading model {}", "正在加载模型 {}"),
    ("tokenizing the dataset", "正在对数据集分词"),
    ("ready", "就绪"),
    ("downloading {} ({} of {} MiB)", "正在下载 {}（{} / {} MiB）"),
    ("resumed at step {} of {}", "从第 {} 步继续（共 {} 步）"),
    ("{} bad records were skipped, the first: {}", "跳过了 {} 条有问题的记录，第一条：{}"),
    (
        "{} training examples have no response token within the max length and are left out",
        "{} 个训练样本在最大长度内没有回答词元，已略去",
    ),
    (
        "gradient checkpointing is on (the default on a GPU; train.gradient_checkpointing = \"off\" turns it off)",
        "梯度检查点已开启（GPU 上的默认设置；train.gradient_checkpointing = \"off\" 可关闭）",
    ),
    (
        "gradient checkpointing is on: without it the run would need about {} GiB (up to {}), more than the {} GiB of {}",
        "梯度检查点已开启：不开启时本次运行约需 {} GiB（最多 {}），超过 {} GiB 的{}",
    ),
    // the Export tab's result and the memory budget
    ("top-1 agreement {}%, mean KL {} with base + adapter", "与“基座 + 适配器”的 top-1 一致率 {}%，平均 KL {}"),
    (
        "{}: no such file or folder, and not a hub id (owner/name); give a model folder, a .gguf file or a hub id",
        "{}：没有这个文件或文件夹，也不是 Hub id（owner/name）；请给出模型文件夹、.gguf 文件或 Hub id",
    ),
    // the Runs tab's cards
    ("{} r={} α={} · lr {} · batch {}×{}", "{} r={} α={} · 学习率 {} · 批 {}×{}"),
    ("free on {}", "{} 的空闲显存"),
    // handing a run to another trainer (gui/handoff_view.rs, the Memory panel's offer, the Runs tab)
    ("Hand off to LLaMA-Factory or axolotl…", "交给 LLaMA-Factory 或 axolotl 训练…"),
    (
        "For a run that outgrows this machine: write it as a multi-GPU job for another trainer, and open its result in the Runs tab.",
        "本机放不下的运行：写成另一个训练工具的多 GPU 任务，其结果可在“历史运行”中打开。",
    ),
    ("Hand off to several GPUs", "交给多 GPU 训练"),
    ("Close", "关闭"),
    (
        "Writes this run as a job for LLaMA-Factory or axolotl on several GPUs: the data, the config, DeepSpeed and a launch script. Its result opens in the Runs tab.",
        "把本次运行写成 LLaMA-Factory 或 axolotl 的多 GPU 任务：数据、配置、DeepSpeed 和启动脚本。其结果可在“历史运行”中打开。",
    ),
    ("Trainer", "训练工具"),
    ("GPUs per node", "每节点 GPU 数"),
    ("Nodes", "节点数"),
    ("Memory per GPU (GiB)", "每块 GPU 显存（GiB）"),
    ("Job folder", "任务文件夹"),
    ("beside the output folder", "放在输出文件夹旁"),
    ("copy a local model into the job", "把本地模型复制进任务"),
    ("Write the {} job", "写出 {} 任务"),
    ("Job written", "任务已写出"),
    ("trained by {}", "由 {} 训练"),
    ("Add a finished run…", "添加已完成的运行…"),
    (
        "A run folder of qlora-studio, or the output folder of a job handed to LLaMA-Factory or axolotl.",
        "qlora-studio 的运行文件夹，或交给 LLaMA-Factory / axolotl 的任务的输出文件夹。",
    ),
    (
        "{}: not a run folder: no checkpoint of qlora-studio and no PEFT adapter with a trainer state or log of LLaMA-Factory or axolotl",
        "{}：不是运行文件夹：既没有 qlora-studio 的检查点，也没有带 LLaMA-Factory 或 axolotl 训练状态/日志的 PEFT 适配器",
    ),
    ("On several GPUs (DeepSpeed ZeRO, per-GPU estimate)", "多 GPU 时（DeepSpeed ZeRO，每块 GPU 的估算）"),
    ("{} cards: {} × under {} (up to {} each)", "{} 的卡：{} 块，使用 {}（每块最多 {}）"),
    ("{} cards: more than 64", "{} 的卡：超过 64 块"),
    ("ZeRO buckets", "ZeRO 通信缓冲"),
    ("ZeRO-3 gathered weights", "ZeRO-3 聚合的权重"),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The string literal at the start of `text` (after its opening quote), escapes undone and
    /// line continuations joined as the compiler joins them.
    fn literal(text: &str) -> String {
        let mut out = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('\n') => {
                        while chars.peek().is_some_and(|c| c.is_whitespace()) {
                            chars.next();
                        }
                    }
                    Some('n') => out.push('\n'),
                    Some(other) => out.push(other),
                    None => {}
                },
                c => out.push(c),
            }
        }
        out
    }

    /// The first argument of every call `name(...)` whose first argument is a string literal,
    /// or, for `lang_first`, whose arguments are `lang, "..."` (across lines too).
    fn literal_arguments(text: &str, name: &str, lang_first: bool) -> Vec<String> {
        let mut found = Vec::new();
        for (at, _) in text.match_indices(&format!("{name}(")) {
            if text[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // a longer name that ends in this one
            }
            let mut rest = text[at + name.len() + 1..].trim_start();
            if lang_first {
                let Some(after) = rest.strip_prefix("lang,") else { continue };
                rest = after.trim_start();
            }
            if let Some(after) = rest.strip_prefix('"') {
                found.push(literal(after));
            }
        }
        found
    }

    /// A `format!` text with every `{...}` as `{}` (`{{` and `}}` stay braces).
    fn as_template(format: &str) -> String {
        let mut out = String::new();
        let mut chars = format.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, chars.peek()) {
                ('{', Some('{')) | ('}', Some('}')) => {
                    out.push(c);
                    chars.next();
                }
                ('{', _) => {
                    for c in chars.by_ref() {
                        if c == '}' {
                            break;
                        }
                    }
                    out.push_str("{}");
                }
                _ => out.push(c),
            }
        }
        out
    }

    /// Words of a text that are not names, units or file-name parts, which stay as they are.
    fn english_words(template: &str) -> Vec<String> {
        const KEPT: &[&str] = &[
            "gib", "mib", "kib", "gpu", "cpu", "rss", "cuda", "auto", "toml", "gguf", "peft", "lora", "merged", "step",
        ];
        template
            .replace("{}", " ")
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| w.len() >= 3 && !KEPT.contains(&w.to_lowercase().as_str()))
            .map(str::to_string)
            .collect()
    }

    fn gui_sources() -> Vec<(String, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gui");
        let mut sources: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.ends_with("i18n.rs"))
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap();
                // the tests' own messages are not the GUI's
                let code = text.split("#[cfg(test)]").next().unwrap_or_default().to_string();
                (p.file_name().unwrap().to_string_lossy().to_string(), code)
            })
            .collect();
        sources.sort();
        sources
    }

    /// Every text of the GUI has its Chinese: the `tr(lang, "…")` and `trf(lang, "…")` texts,
    /// and every `format!` with English words in it (the run log, the status line, the preview's
    /// cards are built so and shown through `tr_message`, which needs its template, `{}` for
    /// each value). A missing one would show English in the Chinese UI.
    #[test]
    fn every_translated_string_has_chinese() {
        let mut missing = Vec::new();
        let has = |english: &str| ZH.iter().any(|(en, _)| *en == english);
        for (file, text) in gui_sources() {
            for english in ["tr", "trf"].iter().flat_map(|name| literal_arguments(&text, name, true)) {
                if !has(&english) {
                    missing.push(format!("{file}: {english}"));
                }
            }
            for format in literal_arguments(&text, "format!", false) {
                let template = as_template(&format);
                if !english_words(&template).is_empty() && !has(&template) {
                    missing.push(format!("{file}: format!(\"{format}\") as {template:?}"));
                }
            }
        }
        // the memory estimate's parts, shown through tr()
        let input = crate::memory::EstimateInput::new(
            crate::memory::presets::spec_for("llama-2-7b").unwrap(),
            crate::memory::Method::Qlora { double_quant: true },
            vec!["q_proj".into()],
            8,
            1,
            64,
        );
        for device in [crate::memory::DeviceKind::Cpu, crate::memory::DeviceKind::Cuda] {
            for t in crate::memory::estimate(&input.clone().on(device)).unwrap().terms {
                if !has(t.name) {
                    missing.push(format!("memory term: {}", t.name));
                }
            }
        }
        use crate::memory::fit::Change;
        let changes =
            [Change::Qlora, Change::BatchOne { accumulation: 2 }, Change::DefaultTargets(vec![]), Change::MaxSeq(2)];
        for template in changes.iter().map(Change::template) {
            if !has(template) {
                missing.push(format!("memory suggestion: {template}"));
            }
        }
        assert!(missing.is_empty(), "no Chinese for:\n{}", missing.join("\n"));
    }

    /// The scan above finds what it must: a literal over several lines, named values, and a
    /// `format!` of English words (so the test can fail).
    #[test]
    fn the_scan_finds_every_kind_of_text() {
        let source = "ui.label(tr(\n    lang,\n    \"Two \\\n     lines\",\n));\n\
                      let a = format!(\"step {step}: checkpoint {}\", p);\n\
                      let b = format!(\"{}/{}\", x, y);";
        assert_eq!(literal_arguments(source, "tr", true), ["Two lines"]);
        let formats = literal_arguments(source, "format!", false);
        assert_eq!(formats.iter().map(|f| as_template(f)).collect::<Vec<_>>(), ["step {}: checkpoint {}", "{}/{}"]);
        assert_eq!(english_words(&as_template(&formats[0])), ["checkpoint"]);
        assert!(english_words("{}/{} · {} MiB").is_empty());
    }

    /// A translation has the values of its English, as many and in the same order.
    #[test]
    fn every_template_keeps_its_values() {
        for (en, zh) in ZH {
            assert_eq!(en.matches("{}").count(), zh.matches("{}").count(), "{en} → {zh}");
        }
    }

    #[test]
    fn messages_made_in_english_are_shown_in_chinese() {
        let zh = |text: &str| tr_message(Lang::Zh, text);
        assert_eq!(
            zh("run finished at step 80; adapter in /runs/demo/checkpoint-000080"),
            "运行已完成，共 80 步；适配器在 /runs/demo/checkpoint-000080"
        );
        assert_eq!(zh("step 20: validation loss 3.9906"), "第 20 步：验证损失 3.9906");
        // a value that is a message of its own is translated too
        assert_eq!(zh("note: resumed at step 20 of 80"), "提示：从第 20 步继续（共 80 步）");
        // the most specific template wins ("finished at step {}" is also in "run finished at …")
        assert_eq!(zh("run finished at step 80"), "运行已完成，共 80 步");
        assert_eq!(zh("finished at step 80"), "已完成，共 80 步");
        assert_eq!(
            trf(Lang::Zh, "{} · {} tokens, {} trained", &[&"a.jsonl:1", &56, &34]),
            "a.jsonl:1 · 56 个词元，其中 34 个参与训练"
        );
        assert_eq!(
            trf(Lang::En, "{} · {} tokens, {} trained", &[&"a.jsonl:1", &56, &34]),
            "a.jsonl:1 · 56 tokens, 34 trained"
        );
        // what no entry covers stays as it is; English stays English
        assert_eq!(zh("a message of the model's own"), "a message of the model's own");
        assert_eq!(tr_message(Lang::En, "note: ready"), "note: ready");
    }
}
