//! The architecture table (assets/architectures.toml): the families qlora-studio trains, how
//! to recognise their config.json, their default LoRA targets, which linear modules they have
//! and how their fused projections split. No tensor math here.

mod fused;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::OnceLock;

use serde::Deserialize;

pub use fused::{QkvRows, SplitKind};

use crate::error::{Error, Result};

const TABLE_TOML: &str = include_str!("../../assets/architectures.toml");

/// One row of the table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub id: String,
    pub name: String,
    pub sizes: Vec<String>,
    /// Size → the hub id of the family's well-known checkpoint of that size.
    #[serde(default)]
    pub checkpoints: BTreeMap<String, String>,
    pub default_targets: Vec<String>,
    pub model_types: Vec<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub when: Option<When>,
    pub layout: String,
    #[serde(default)]
    pub layout_by_model_type: BTreeMap<String, String>,
    /// The family whose checkpoints this one's are interchangeable with for an adapter.
    #[serde(default)]
    pub weights_like: Option<String>,
    /// Logits use lm_head rows scaled to unit L2 norm (Baichuan2's NormHead).
    #[serde(default)]
    pub normalized_lm_head: bool,
    /// llama.cpp's architecture name, where its converter handles the family.
    #[serde(default)]
    pub gguf_arch: Option<String>,
}

impl Family {
    /// The group of families an adapter can move between: this one's `weights_like`, or itself.
    pub fn weights_group(&self) -> &str {
        self.weights_like.as_deref().unwrap_or(&self.id)
    }
}

/// The condition that picks one of several families sharing a model_type.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    #[serde(default)]
    pub has_key: Vec<String>,
    #[serde(default)]
    pub equals: BTreeMap<String, Vec<serde_json::Value>>,
    #[serde(default)]
    pub name_contains: Vec<String>,
    /// When the conditions of several rows hold, the highest precedence wins (then table order).
    #[serde(default)]
    pub precedence: i32,
}

impl When {
    fn holds(&self, config: &serde_json::Value) -> bool {
        let has_key = self.has_key.iter().any(|k| config.get(k).is_some());
        let equals = self
            .equals
            .iter()
            .any(|(k, values)| config.get(k).is_some_and(|v| values.iter().any(|want| json_number_eq(v, want))));
        let name = config.get("_name_or_path").and_then(|v| v.as_str()).unwrap_or("").to_lowercase();
        let name_contains = self.name_contains.iter().any(|n| name.contains(&n.to_lowercase()));
        has_key || equals || name_contains
    }
}

/// JSON equality that treats 4096 and 4096.0 as equal.
fn json_number_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// A fused projection and how its output rows split.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fused {
    pub module: String,
    pub split: SplitKind,
}

/// Where a checkpoint layout keeps its decoder layers and linear modules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleLayout {
    pub layers: String,
    #[serde(default)]
    pub layers_alt: Vec<String>,
    #[serde(default)]
    pub default_targets: Option<Vec<String>>,
    #[serde(default)]
    pub fused: Vec<Fused>,
    /// q, k and v always have biases (Qwen2), whatever the config says.
    #[serde(default)]
    pub qkv_bias: bool,
    /// Overrides the family's llama.cpp architecture name for this layout.
    #[serde(default)]
    pub gguf_arch: Option<String>,
    /// The weight names the generic decoder reads; they also say which linears a layer has.
    pub weights: WeightNames,
}

/// What a linear module computes in its decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Q,
    K,
    V,
    /// One projection holding q, k and v (split by the layout's `fused` entry).
    Qkv,
    /// The attention output projection.
    O,
    Gate,
    Up,
    /// One projection holding [gate; up] (ChatGLM).
    GateUp,
    Down,
    /// The MoE router: one logit per expert.
    Router,
    ExpertGate,
    ExpertUp,
    ExpertDown,
}

impl Role {
    pub fn is_attention(self) -> bool {
        matches!(self, Role::Q | Role::K | Role::V | Role::Qkv | Role::O)
    }

    /// In the "all linear" preset: every linear but the MoE router (as PEFT users pick them).
    pub fn in_all_linear(self) -> bool {
        self != Role::Router
    }

    pub fn is_expert(self) -> bool {
        matches!(self, Role::ExpertGate | Role::ExpertUp | Role::ExpertDown)
    }
}

/// One linear module of a layout's decoder layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutLinear {
    pub role: Role,
    /// The path relative to the layer; an expert's holds `{e}` for its index.
    pub path: String,
    /// The name users pick and PEFT matches: the shortest suffix of the path (whole
    /// components) that no other module of the layer ends with (`q_proj`; Qwen v1's
    /// `attn.c_proj` and `mlp.c_proj`). The experts of one part share theirs.
    pub name: String,
}

/// Does the target module name `target` select the module at `path`? PEFT's rule for a list
/// of targets: the whole path, or a suffix of it after a dot.
pub fn target_matches(path: &str, target: &str) -> bool {
    path == target || (path.ends_with(target) && path[..path.len() - target.len()].ends_with('.'))
}

/// Where the decoder finds each weight: `embed`, `embed_norm`, `final_norm` and `lm_head` are
/// prefixes from the checkpoint root, the others are relative to the layer prefix (MoE expert
/// parts relative to `experts`). Absent parts are absent from the architecture: no `mlp_norm`
/// means attention and MLP read one norm in parallel; `qkv` instead of q/k/v is a fused
/// projection; no `gate` is a plain (ungated) MLP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightNames {
    pub embed: String,
    #[serde(default)]
    pub embed_norm: Option<String>,
    pub final_norm: String,
    pub lm_head: String,
    pub attn_norm: String,
    #[serde(default)]
    pub mlp_norm: Option<String>,
    #[serde(default)]
    pub q: Option<String>,
    #[serde(default)]
    pub k: Option<String>,
    #[serde(default)]
    pub v: Option<String>,
    #[serde(default)]
    pub qkv: Option<String>,
    pub o: String,
    #[serde(default)]
    pub router: Option<String>,
    #[serde(default)]
    pub experts: Option<String>,
    #[serde(default)]
    pub gate: Option<String>,
    /// A fused [gate; up] projection (ChatGLM's dense_h_to_4h); `up` names it too.
    #[serde(default)]
    pub gate_up: Option<String>,
    pub up: String,
    pub down: String,
}

impl WeightNames {
    /// The linear modules of one decoder layer, in the order the decoder builds them: q, k, v
    /// (or the fused qkv), o, then the MLP's (gate, up, down; or the fused gate/up and down;
    /// or up and down; or the MoE router and each expert's gate, up and down).
    pub fn layer_linears(&self) -> Vec<LayoutLinear> {
        let mut parts: Vec<(Role, String)> = Vec::new();
        match (&self.qkv, &self.q, &self.k, &self.v) {
            (Some(qkv), ..) => parts.push((Role::Qkv, qkv.clone())),
            (None, Some(q), Some(k), Some(v)) => {
                parts.extend([(Role::Q, q.clone()), (Role::K, k.clone()), (Role::V, v.clone())])
            }
            _ => {}
        }
        parts.push((Role::O, self.o.clone()));
        match (&self.experts, &self.router, &self.gate_up, &self.gate) {
            (Some(experts), Some(router), _, gate) => {
                parts.push((Role::Router, router.clone()));
                let gate = gate.as_deref().unwrap_or_default();
                parts.extend([
                    (Role::ExpertGate, format!("{experts}.{gate}")),
                    (Role::ExpertUp, format!("{experts}.{}", self.up)),
                    (Role::ExpertDown, format!("{experts}.{}", self.down)),
                ]);
            }
            (_, _, Some(gate_up), _) => {
                parts.extend([(Role::GateUp, gate_up.clone()), (Role::Down, self.down.clone())])
            }
            (_, _, None, Some(gate)) => {
                parts.extend([(Role::Gate, gate.clone()), (Role::Up, self.up.clone()), (Role::Down, self.down.clone())])
            }
            _ => parts.extend([(Role::Up, self.up.clone()), (Role::Down, self.down.clone())]),
        }
        let paths: Vec<&str> = parts.iter().map(|(_, p)| p.as_str()).collect();
        parts
            .iter()
            .map(|(role, path)| LayoutLinear { role: *role, path: path.clone(), name: unique_suffix(path, &paths) })
            .collect()
    }

    fn check(&self) -> std::result::Result<(), String> {
        let separate = [&self.q, &self.k, &self.v].iter().filter(|x| x.is_some()).count();
        match (separate, &self.qkv) {
            (3, None) | (0, Some(_)) => {}
            _ => return Err("weights need either all of q, k, v or qkv".into()),
        }
        if self.router.is_some() != self.experts.is_some() {
            return Err("weights need both router and experts, or neither".into());
        }
        if self.experts.as_ref().is_some_and(|e| !e.contains("{e}")) {
            return Err("the experts prefix must contain {e}".into());
        }
        Ok(())
    }
}

/// The shortest suffix of `path` (whole components) that no other of `paths` ends with; a path
/// and the `{e}`-templated path of its experts' siblings never collide, since `{e}` sits before
/// the last component.
fn unique_suffix(path: &str, paths: &[&str]) -> String {
    let parts: Vec<&str> = path.split('.').collect();
    for n in 1..=parts.len() {
        let suffix = parts[parts.len() - n..].join(".");
        if paths.iter().all(|p| *p == path || !target_matches(p, &suffix)) {
            return suffix;
        }
    }
    path.to_string()
}

impl ModuleLayout {
    /// The last component of a module path.
    pub fn module_name(path: &str) -> &str {
        path.rsplit('.').next().unwrap_or(path)
    }

    /// The linear modules of one layer (`WeightNames::layer_linears`).
    pub fn layer_linears(&self) -> Vec<LayoutLinear> {
        self.weights.layer_linears()
    }

    /// The names of the "all linear" preset, in layer order, without duplicates.
    pub fn all_linear_names(&self) -> Vec<String> {
        let linears = self.layer_linears();
        dedup_names(linears.iter().filter(|l| l.role.in_all_linear()).map(|l| l.name.as_str()))
    }

    /// Every linear module name a layer has, routers included.
    pub fn linear_names(&self) -> Vec<String> {
        dedup_names(self.layer_linears().iter().map(|l| l.name.as_str()))
    }

    /// Does `target` select at least one linear module of a layer?
    pub fn has_target(&self, target: &str) -> bool {
        self.layer_linears().iter().any(|l| target_matches(&l.path, target))
    }

    /// The fused projection whose name (the last path component) is `name`.
    pub fn fused(&self, name: &str) -> Option<&Fused> {
        self.fused.iter().find(|f| f.module == name)
    }
}

pub(crate) fn dedup_names<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    names.filter(|n| seen.insert(*n)).map(str::to_string).collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    family: Vec<Family>,
    layouts: BTreeMap<String, ModuleLayout>,
}

/// The whole table, validated.
#[derive(Debug)]
pub struct ArchTable {
    families: Vec<Family>,
    layouts: BTreeMap<String, ModuleLayout>,
}

/// What a config.json turned out to be.
#[derive(Debug, Clone, Copy)]
pub struct Recognised<'a> {
    pub family: &'a Family,
    pub layout_name: &'a str,
    pub layout: &'a ModuleLayout,
}

impl Recognised<'_> {
    /// The family's default targets, as they are named in this layout.
    pub fn default_targets(&self) -> Vec<String> {
        self.layout.default_targets.clone().unwrap_or_else(|| self.family.default_targets.clone())
    }

    pub fn linear_names(&self) -> Vec<String> {
        self.layout.linear_names()
    }

    pub fn all_linear_names(&self) -> Vec<String> {
        self.layout.all_linear_names()
    }

    /// llama.cpp's architecture name for checkpoints of this family and layout.
    pub fn gguf_arch(&self) -> Option<&str> {
        self.layout.gguf_arch.as_deref().or(self.family.gguf_arch.as_deref())
    }

    /// Checks that every target names a linear module of this model; the error lists the ones
    /// it has.
    pub fn check_targets(&self, targets: &[String]) -> Result<()> {
        let have = self.linear_names();
        let missing: Vec<&String> =
            targets.iter().filter(|t| *t != "all-linear" && !self.layout.has_target(t)).collect();
        if targets.is_empty() {
            return Err(Error::Invalid(format!(
                "no LoRA target modules chosen; {} has: {}",
                self.family.name,
                have.join(", ")
            )));
        }
        if !missing.is_empty() {
            let missing: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            return Err(Error::Invalid(format!(
                "{} has no linear module named {}; its linear modules are: {}",
                self.family.name,
                missing.join(", "),
                have.join(", ")
            )));
        }
        Ok(())
    }
}

/// The built-in table, parsed and validated once.
pub fn table() -> Result<&'static ArchTable> {
    static TABLE: OnceLock<std::result::Result<ArchTable, String>> = OnceLock::new();
    TABLE
        .get_or_init(|| ArchTable::parse(TABLE_TOML).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Invalid(format!("the built-in architecture table is broken: {e}")))
}

impl ArchTable {
    /// Parse and validate a table in the format of assets/architectures.toml.
    pub fn parse(text: &str) -> Result<Self> {
        let file: TableFile = toml::from_str(text)
            .map_err(|e| Error::Table { row: "assets/architectures.toml".into(), message: e.to_string() })?;
        let table = ArchTable { families: file.family, layouts: file.layouts };
        table.validate()?;
        Ok(table)
    }

    fn validate(&self) -> Result<()> {
        let err = |row: &str, message: String| Error::Table { row: row.to_string(), message };
        for (name, layout) in &self.layouts {
            let row = format!("layout `{name}`");
            if !layout.layers.contains("{i}") || layout.layers_alt.iter().any(|l| !l.contains("{i}")) {
                return Err(err(&row, "layer paths must contain {i}".into()));
            }
            layout.weights.check().map_err(|m| err(&row, m))?;
            let linears = layout.layer_linears();
            for l in &linears {
                if l.path.is_empty() || l.path.split('.').any(str::is_empty) || l.path.contains("{i}") {
                    return Err(err(&row, format!("`{}` is not a module path relative to the layer", l.path)));
                }
            }
            for f in &layout.fused {
                let fused_roles = [Role::Qkv, Role::GateUp];
                if !linears.iter().any(|l| fused_roles.contains(&l.role) && Self::last(&l.path) == f.module) {
                    return Err(err(&row, format!("fused module `{}` is not the layout's qkv or gate_up", f.module)));
                }
            }
            if let Some(t) = &layout.default_targets {
                if let Some(bad) = t.iter().find(|t| !layout.has_target(t)) {
                    return Err(err(&row, format!("default target `{bad}` is not a linear module of the layout")));
                }
            }
        }
        let mut ids = BTreeSet::new();
        for f in &self.families {
            let row = format!("family `{}`", f.id);
            if f.id.is_empty() || f.name.is_empty() {
                return Err(err(&row, "id and name must not be empty".into()));
            }
            if !ids.insert(f.id.as_str()) {
                return Err(err(&row, "the id appears twice".into()));
            }
            for (what, list) in
                [("sizes", &f.sizes), ("default_targets", &f.default_targets), ("model_types", &f.model_types)]
            {
                if list.is_empty() || list.iter().any(|s| s.trim().is_empty()) {
                    return Err(err(&row, format!("{what} must be a non-empty list of non-empty strings")));
                }
            }
            if let Some(like) = f.weights_like.as_deref().filter(|like| !self.families.iter().any(|g| g.id == *like)) {
                return Err(err(&row, format!("weights_like names `{like}`, not a family of the table")));
            }
            if let Some(size) = f.checkpoints.keys().find(|s| !f.sizes.contains(s)) {
                return Err(err(&row, format!("checkpoints names size `{size}`, not one of its sizes")));
            }
            if let Some(id) = f.checkpoints.values().find(|id| crate::hub::parse_hub_id(id).is_none()) {
                return Err(err(&row, format!("checkpoints: `{id}` is not a hub id (owner/name)")));
            }
            let mut layouts = vec![f.layout.as_str()];
            for (model_type, layout) in &f.layout_by_model_type {
                if !f.model_types.contains(model_type) {
                    return Err(err(
                        &row,
                        format!("layout_by_model_type names `{model_type}`, not one of its model_types"),
                    ));
                }
                layouts.push(layout);
            }
            for name in layouts {
                let layout = self
                    .layouts
                    .get(name)
                    .ok_or_else(|| err(&row, format!("layout `{name}` is not defined under [layouts]")))?;
                let targets = layout.default_targets.as_ref().unwrap_or(&f.default_targets);
                if let Some(t) = targets.iter().find(|t| !layout.has_target(t)) {
                    return Err(err(&row, format!("default target `{t}` is not a linear module of layout `{name}`")));
                }
            }
        }
        // Families sharing a model_type need exactly one fallback row (one without `when`).
        let mut by_type: BTreeMap<&str, Vec<&Family>> = BTreeMap::new();
        for f in &self.families {
            for t in &f.model_types {
                by_type.entry(t).or_default().push(f);
            }
        }
        for (t, rows) in by_type {
            let fallbacks = rows.iter().filter(|f| f.when.is_none()).count();
            if rows.len() > 1 && fallbacks != 1 {
                let ids: Vec<&str> = rows.iter().map(|f| f.id.as_str()).collect();
                return Err(err(
                    &format!("model_type `{t}`"),
                    format!(
                        "shared by {} with {fallbacks} rows without `when`; exactly one must have none",
                        ids.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn last(path: &str) -> &str {
        ModuleLayout::module_name(path)
    }

    pub fn families(&self) -> &[Family] {
        &self.families
    }

    pub fn family(&self, id: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.id == id)
    }

    pub fn layout(&self, name: &str) -> Option<&ModuleLayout> {
        self.layouts.get(name)
    }

    /// The family's layout for a given config `model_type`.
    pub fn layout_for<'a>(&'a self, family: &'a Family, model_type: Option<&str>) -> Recognised<'a> {
        let layout_name = model_type.and_then(|t| family.layout_by_model_type.get(t)).unwrap_or(&family.layout);
        // validate() guarantees every named layout exists
        let layout = &self.layouts[layout_name];
        Recognised { family, layout_name, layout }
    }

    /// Which family a parsed config.json describes: by `model_type`, else by `architectures`
    /// and `auto_map` class names; among families sharing a model_type, the first whose
    /// `when` holds, else the fallback.
    pub fn recognise(&self, config: &serde_json::Value) -> Result<Recognised<'_>> {
        let model_type = config.get("model_type").and_then(|v| v.as_str());
        let classes = config_classes(config);
        let mut candidates: Vec<&Family> = match model_type {
            Some(t) => self.families.iter().filter(|f| f.model_types.iter().any(|m| m == t)).collect(),
            None => Vec::new(),
        };
        if candidates.is_empty() {
            candidates = self.families.iter().filter(|f| f.architectures.iter().any(|a| classes.contains(a))).collect();
        }
        let holding = candidates.iter().filter(|f| f.when.as_ref().is_some_and(|w| w.holds(config)));
        // max_by_key keeps the last maximum; reversing keeps the first in table order
        let chosen = holding
            .rev()
            .max_by_key(|f| f.when.as_ref().map_or(0, |w| w.precedence))
            .or_else(|| candidates.iter().find(|f| f.when.is_none()))
            .or(candidates.first());
        match chosen {
            Some(family) => Ok(self.layout_for(family, model_type)),
            None => Err(Error::UnknownFamily(format!(
                "model_type {} (architectures: {}) is not a family qlora-studio supports; supported model_types: {}",
                model_type.map_or("missing".to_string(), |t| format!("`{t}`")),
                if classes.is_empty() { "none".to_string() } else { classes.join(", ") },
                self.supported_model_types().join(", ")
            ))),
        }
    }

    /// Read and recognise a config.json file; errors name the file.
    pub fn recognise_file(&self, path: &Path) -> Result<Recognised<'_>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: not valid JSON: {e}", path.display())))?;
        self.recognise(&config).map_err(|e| match e {
            Error::UnknownFamily(m) => Error::UnknownFamily(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn supported_model_types(&self) -> Vec<String> {
        dedup_names(self.families.iter().flat_map(|f| f.model_types.iter().map(String::as_str)))
    }
}

/// Class names a config names: `architectures` and the class part of `auto_map` entries.
fn config_classes(config: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> = config
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    if let Some(map) = config.get("auto_map").and_then(|v| v.as_object()) {
        for v in map.values() {
            let entries: Vec<&serde_json::Value> = match v {
                serde_json::Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for e in entries.into_iter().filter_map(|e| e.as_str()) {
                // "modeling_baichuan.BaichuanForCausalLM" or "repo--modeling_x.Class"
                let class = e.rsplit('.').next().unwrap_or(e).to_string();
                if !out.contains(&class) {
                    out.push(class);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builtin_table_is_valid() {
        let t = table().unwrap();
        assert_eq!(t.families().len(), 15);
    }

    #[test]
    fn shared_model_types_pick_by_condition() {
        let t = table().unwrap();
        let id = |c: serde_json::Value| t.recognise(&c).unwrap().family.id.clone();
        assert_eq!(id(json!({"model_type": "llama", "max_position_embeddings": 2048})), "llama");
        assert_eq!(id(json!({"model_type": "llama", "max_position_embeddings": 4096})), "llama2");
        assert_eq!(id(json!({"model_type": "llama", "vocab_size": 64000, "max_position_embeddings": 4096})), "yi");
        assert_eq!(id(json!({"model_type": "bloom", "_name_or_path": "bigscience/bloomz-560m"})), "bloomz");
        assert_eq!(id(json!({"model_type": "bloom"})), "bloom");
        assert_eq!(id(json!({"model_type": "baichuan", "vocab_size": 125696})), "baichuan2");
        assert_eq!(id(json!({"model_type": "RefinedWebModel"})), "falcon");
        assert_eq!(id(json!({"architectures": ["RWForCausalLM"]})), "falcon");
        assert_eq!(id(json!({"model_type": "Yi"})), "yi");
    }

    #[test]
    fn unknown_family_names_the_model_type() {
        let t = table().unwrap();
        let e = t.recognise(&json!({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("`gpt_neox`") && m.contains("GPTNeoXForCausalLM") && m.contains("llama"), "{m}");
    }

    #[test]
    fn malformed_rows_are_clear_errors() {
        let base = "[layouts.l]\nlayers = \"model.layers.{i}\"\n\
                    [layouts.l.weights]\nembed = \"e\"\nfinal_norm = \"n\"\nlm_head = \"h\"\nattn_norm = \"a\"\n\
                    q = \"self_attn.q_proj\"\nk = \"k\"\nv = \"v\"\no = \"o\"\nup = \"u\"\ndown = \"d\"\n";
        let row = |extra: &str| {
            format!(
                "[[family]]\nid = \"x\"\nname = \"X\"\nsizes = [\"1B\"]\ndefault_targets = [\"q_proj\"]\nmodel_types = [\"x\"]\nlayout = \"l\"\n{extra}\n{base}"
            )
        };
        assert!(ArchTable::parse(&row("")).is_ok());
        let e = ArchTable::parse(&row("colour = \"red\"")).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        let e =
            ArchTable::parse(&row("").replace("[\"q_proj\"]\nmodel", "[\"W_pack\"]\nmodel")).unwrap_err().to_string();
        assert!(e.contains("family `x`") && e.contains("W_pack"), "{e}");
        let e = ArchTable::parse(&row("").replace("layout = \"l\"", "layout = \"nope\"")).unwrap_err().to_string();
        assert!(e.contains("`nope`"), "{e}");
        let e = ArchTable::parse(&row("").replace("model.layers.{i}", "model.layers")).unwrap_err().to_string();
        assert!(e.contains("{i}"), "{e}");
        let e = ArchTable::parse(&row("").replace("q = \"self_attn.q_proj\"\n", "")).unwrap_err().to_string();
        assert!(e.contains("layout `l`") && e.contains("q, k, v"), "{e}");
        let e = ArchTable::parse("[[family]]\nid = 3").unwrap_err().to_string();
        assert!(e.contains("architectures.toml"), "{e}");
    }

    #[test]
    fn targets_are_checked_against_the_layout() {
        let t = table().unwrap();
        let r = t.recognise(&json!({"model_type": "mixtral"})).unwrap();
        r.check_targets(&["q_proj".into(), "w1".into(), "gate".into()]).unwrap();
        assert!(!r.all_linear_names().contains(&"gate".to_string()), "the router is not in all-linear");
        let e = r.check_targets(&["query_key_value".into()]).unwrap_err().to_string();
        assert!(e.contains("query_key_value") && e.contains("q_proj"), "{e}");
        let experts: Vec<String> =
            r.layout.layer_linears().into_iter().filter(|l| l.role.is_expert()).map(|l| l.path).collect();
        assert_eq!(
            experts,
            ["block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3", "block_sparse_moe.experts.{e}.w2"]
        );
    }

    #[test]
    fn names_are_the_shortest_suffix_that_tells_modules_apart() {
        let t = table().unwrap();
        let names = |model_type: &str| t.recognise(&json!({ "model_type": model_type })).unwrap().linear_names();
        assert_eq!(names("llama"), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
        // Qwen v1 has a c_proj in attention and in the MLP: each is named by its parent too
        assert_eq!(names("qwen"), ["c_attn", "attn.c_proj", "w2", "w1", "mlp.c_proj"]);
        assert!(target_matches("transformer.h.0.attn.c_proj", "c_proj"));
        assert!(target_matches("transformer.h.0.attn.c_proj", "attn.c_proj"));
        assert!(!target_matches("transformer.h.0.mlp.c_proj", "attn.c_proj"));
        assert!(!target_matches("transformer.h.0.attn.xc_proj", "c_proj"));
        let qwen = t.recognise(&json!({ "model_type": "qwen" })).unwrap();
        qwen.check_targets(&["c_proj".into(), "attn.c_proj".into()]).unwrap();
    }
}
