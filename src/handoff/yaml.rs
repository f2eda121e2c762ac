//! A small YAML writer for the configs a handoff writes: sections of `key: value` lines in a
//! fixed order (so a config reads like the tool's own examples and can be compared with the
//! expected files in tests/data), scalars written so that both PyYAML (axolotl) and OmegaConf
//! (LLaMA-Factory) read them back as the same type.

use serde_json::Value;

#[derive(Default)]
pub struct Yaml {
    text: String,
}

impl Yaml {
    pub fn comment(&mut self, line: &str) {
        self.text.push_str("# ");
        self.text.push_str(line);
        self.text.push('\n');
    }

    pub fn section(&mut self, title: &str) {
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str("### ");
        self.text.push_str(title);
        self.text.push('\n');
    }

    pub fn kv(&mut self, key: &str, value: impl Into<Value>) {
        self.text.push_str(key);
        self.text.push_str(": ");
        self.text.push_str(&scalar(&value.into()));
        self.text.push('\n');
    }

    /// `key:` followed by a list of flow mappings (`- {a: 1}`), e.g. axolotl's `datasets`.
    pub fn list_of_maps(&mut self, key: &str, items: &[Value]) {
        self.text.push_str(key);
        self.text.push_str(":\n");
        for item in items {
            self.text.push_str("  - ");
            self.text.push_str(&scalar(item));
            self.text.push('\n');
        }
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// One value in flow style: strings double-quoted (JSON escapes are YAML escapes), floats always
/// with a decimal point and a signed exponent (YAML 1.1 reads `1e-4` as a string), lists and
/// mappings as JSON-like flow collections.
pub fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Number(n) if n.is_f64() => float(n.as_f64().unwrap_or(0.0)),
        Value::Number(n) => n.to_string(),
        Value::Array(items) => format!("[{}]", items.iter().map(scalar).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), scalar(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A float as YAML 1.1 and 1.2 both read it: `0.05`, `2.0`, `2.0e-04`.
pub fn float(x: f64) -> String {
    if x == 0.0 || (1e-3..1e6).contains(&x.abs()) {
        let s = format!("{x}");
        return if s.contains('.') { s } else { format!("{s}.0") };
    }
    let s = format!("{x:e}");
    let (mantissa, exponent) = s.split_once('e').unwrap_or((&s, "0"));
    let mantissa = if mantissa.contains('.') { mantissa.to_string() } else { format!("{mantissa}.0") };
    let (sign, digits) = match exponent.strip_prefix('-') {
        Some(d) => ('-', d),
        None => ('+', exponent),
    };
    format!("{mantissa}e{sign}{digits:0>2}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_keep_a_point_and_a_signed_exponent() {
        assert_eq!(float(2e-4), "2.0e-04");
        assert_eq!(float(1.5e-5), "1.5e-05");
        assert_eq!(float(0.05), "0.05");
        assert_eq!(float(3.0), "3.0");
        assert_eq!(float(0.0), "0.0");
        assert_eq!(scalar(&serde_json::json!({"a": "x\"y", "b": [1, 2]})), "{\"a\": \"x\\\"y\", \"b\": [1, 2]}");
    }
}
