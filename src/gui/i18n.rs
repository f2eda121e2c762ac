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

/// (English, 简体中文). Keep in the order the UI shows them.
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
    ("GPU: tensors, peak of the step", "GPU：张量，本步峰值"),
    ("GPU tensors at their peak (the plot's pool peak)", "GPU 张量峰值（即曲线中的内存池峰值）"),
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
    ("live heap (tensors)", "堆内存（张量）"),
    ("RSS (the whole app)", "RSS（整个应用）"),
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
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `tr(lang, "…")` of the GUI's sources has its Chinese text (a missing one would
    /// show English in the Chinese UI).
    #[test]
    fn every_translated_string_has_chinese() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gui");
        let mut missing = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            if path.ends_with("i18n.rs") {
                continue;
            }
            for piece in text.split("tr(lang, \"").skip(1) {
                let english = &piece[..piece.find('"').unwrap()];
                if !ZH.iter().any(|(en, _)| *en == english) {
                    missing.push(format!("{}: {english}", path.file_name().unwrap().to_string_lossy()));
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
                if !ZH.iter().any(|(en, _)| *en == t.name) {
                    missing.push(format!("memory term: {}", t.name));
                }
            }
        }
        use crate::memory::fit::Change;
        let changes =
            [Change::Qlora, Change::BatchOne { accumulation: 2 }, Change::DefaultTargets(vec![]), Change::MaxSeq(2)];
        for template in changes.iter().map(Change::template) {
            if !ZH.iter().any(|(en, _)| *en == template) {
                missing.push(format!("memory suggestion: {template}"));
            }
        }
        assert!(missing.is_empty(), "no Chinese for:\n{}", missing.join("\n"));
    }
}
