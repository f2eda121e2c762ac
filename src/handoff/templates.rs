//! assets/handoff_templates.toml: our chat templates under the names LLaMA-Factory and axolotl
//! give them, one row per family.

use std::sync::OnceLock;

use serde::Deserialize;

use super::Tool;
use crate::error::{Error, Result};

const TABLE_TOML: &str = include_str!("../../assets/handoff_templates.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    pub family: String,
    pub template: String,
    pub llamafactory: String,
    #[serde(default)]
    pub llamafactory_system: Option<String>,
    pub axolotl: String,
}

#[derive(Deserialize)]
struct Table {
    row: Vec<Row>,
}

pub fn rows() -> &'static [Row] {
    static ROWS: OnceLock<Vec<Row>> = OnceLock::new();
    // part of the binary and checked by the tests: a parse failure is a build defect
    ROWS.get_or_init(|| toml::from_str::<Table>(TABLE_TOML).expect("assets/handoff_templates.toml is valid").row)
}

/// How the job names the run's chat template.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolTemplate {
    /// The model's own chat_template: LLaMA-Factory reads it when `template` is left out,
    /// axolotl with `chat_template: tokenizer_default`.
    Model,
    /// One of the tool's own templates (and, for LLaMA-Factory, a default system prompt).
    Named { name: String, default_system: Option<String> },
    /// axolotl's `chat_template: jinja` with this template text (ours).
    Jinja(String),
}

/// The tool's template for our template `ours` (a name of assets/chat_templates.toml); an error
/// naming the key to change when the tool has no template that renders the same text.
pub fn map(ours: &str, tool: Tool) -> Result<ToolTemplate> {
    let row = rows().iter().find(|r| r.template.eq_ignore_ascii_case(ours)).ok_or_else(|| {
        Error::Invalid(format!(
            "[data] template = {ours:?} has no row in assets/handoff_templates.toml, so it cannot be handed to {}; \
             choose one of: {}",
            tool.label(),
            rows()
                .iter()
                .map(|r| r.template.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let name = match tool {
        Tool::LlamaFactory => &row.llamafactory,
        Tool::Axolotl => &row.axolotl,
    };
    if name.is_empty() {
        let usable: Vec<&str> = rows()
            .iter()
            .filter(|r| !match tool {
                Tool::LlamaFactory => r.llamafactory.is_empty(),
                Tool::Axolotl => r.axolotl.is_empty(),
            })
            .map(|r| r.template.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let family = if row.family.is_empty() { String::new() } else { format!(" (the {} family's)", row.family) };
        return Err(Error::Invalid(format!(
            "[data] template = {ours:?}{family}: {} has no template that renders the same text \
             (assets/handoff_templates.toml); set [data] template to one it has ({}), to \"model\" when the \
             model has a chat_template of its own, or hand the run to {}",
            tool.label(),
            usable.join(", "),
            match tool {
                Tool::LlamaFactory => "axolotl, which takes any Jinja template",
                Tool::Axolotl => "LLaMA-Factory",
            }
        )));
    }
    if tool == Tool::Axolotl && name == "jinja" {
        let text = crate::data::named_template(ours)
            .map(|t| t.template.trim().to_string())
            .ok_or_else(|| Error::Invalid(format!("[data] template = {ours:?} is not a known template")))?;
        return Ok(ToolTemplate::Jinja(text));
    }
    Ok(ToolTemplate::Named {
        name: name.clone(),
        default_system: if tool == Tool::LlamaFactory { row.llamafactory_system.clone() } else { None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_and_every_named_template_has_a_row() {
        let table = crate::arch::table().unwrap();
        for f in table.families() {
            assert!(rows().iter().any(|r| r.family == f.id), "no row for family {}", f.id);
        }
        for row in rows() {
            assert!(crate::data::named_template(&row.template).is_some(), "{} is not a template of ours", row.template);
            if !row.family.is_empty() {
                assert_eq!(crate::data::family_template_name(Some(&row.family)), row.template, "row {}", row.family);
            }
        }
        for t in crate::data::named_templates() {
            assert!(rows().iter().any(|r| r.template == t.name), "template {} has no row", t.name);
        }
    }

    #[test]
    fn a_template_without_an_equivalent_is_a_clear_error() {
        let e = map("phi", Tool::LlamaFactory).unwrap_err().to_string();
        assert!(e.contains("[data] template") && e.contains("axolotl"), "{e}");
        assert!(matches!(map("phi", Tool::Axolotl).unwrap(), ToolTemplate::Jinja(t) if t.contains("Instruct:")));
        assert_eq!(
            map("qwen", Tool::LlamaFactory).unwrap(),
            ToolTemplate::Named { name: "qwen".into(), default_system: Some("You are a helpful assistant.".into()) }
        );
        assert_eq!(
            map("chatml", Tool::Axolotl).unwrap(),
            ToolTemplate::Named { name: "chatml".into(), default_system: None }
        );
    }
}
