//! Model names: `openAIConfig.modelMapping` (the client's model → the provider's), and the list
//! a host answers on `GET /v1/models`.

use std::collections::BTreeMap;

/// A model name as sent upstream: the text and its JSON string literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelName {
    pub name: String,
    pub json: String,
}

impl ModelName {
    pub fn new(name: &str) -> ModelName {
        ModelName {
            name: name.to_string(),
            json: serde_json::Value::String(name.to_string()).to_string(),
        }
    }
}

/// A compiled `modelMapping`. Lookup order: the exact name, then the longest `prefix*` that
/// matches, then `*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelMapping {
    exact: BTreeMap<String, ModelName>,
    /// Longest prefix first.
    prefixes: Vec<(String, ModelName)>,
    any: Option<ModelName>,
}

impl ModelMapping {
    /// Compiles a mapping; the error names the offending key and says what is wrong.
    pub fn compile(map: &BTreeMap<String, String>) -> Result<ModelMapping, (String, String)> {
        let mut mapping = ModelMapping::default();
        for (key, target) in map {
            if target.trim().is_empty() {
                return Err((key.clone(), "the provider's model must not be empty".into()));
            }
            let target = ModelName::new(target);
            match key.find('*') {
                None if key.trim().is_empty() => {
                    return Err((key.clone(), "a model name must not be empty".into()))
                }
                None => {
                    mapping.exact.insert(key.clone(), target);
                }
                Some(i) if i + 1 != key.len() => {
                    return Err((
                        key.clone(),
                        "`*` may only end a key (`prefix*`, or `*` alone)".into(),
                    ))
                }
                Some(0) => mapping.any = Some(target),
                Some(i) => mapping.prefixes.push((key[..i].to_string(), target)),
            }
        }
        mapping
            .prefixes
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Ok(mapping)
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty() && self.any.is_none()
    }

    /// The provider's model for the client's `model`, if a key applies.
    pub fn lookup(&self, model: &str) -> Option<&ModelName> {
        self.exact
            .get(model)
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(prefix, _)| model.starts_with(prefix.as_str()))
                    .map(|(_, target)| target)
            })
            .or(self.any.as_ref())
    }

    /// The keys that are names, not wildcards: models a client may ask for by name.
    pub fn exact_names(&self) -> impl Iterator<Item = &str> {
        self.exact.keys().map(String::as_str)
    }
}

/// The body of `GET /v1/models` in OpenAI's list format, from `(model, owner)` pairs; the first
/// owner of a name wins, the list is sorted by name.
pub fn model_list_json<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut models: BTreeMap<&str, &str> = BTreeMap::new();
    for (model, owner) in entries {
        models.entry(model).or_insert(owner);
    }
    let data: Vec<serde_json::Value> = models
        .into_iter()
        .map(|(id, owner)| {
            serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
        })
        .collect();
    serde_json::json!({"object": "list", "data": data}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn mapping(pairs: &[(&str, &str)]) -> Result<ModelMapping, (String, String)> {
        ModelMapping::compile(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn most_specific_key_wins() {
        let m = mapping(&[
            ("gpt-4o", "qwen-max"),
            ("gpt-4*", "qwen-plus"),
            ("gpt-4o-*", "qwen-turbo"),
            ("gpt*", "qwen-long"),
            ("*", "qwen-1.8b-chat"),
        ])
        .unwrap();
        let to = |model: &str| m.lookup(model).map(|t| t.name.as_str());
        assert_eq!(to("gpt-4o"), Some("qwen-max"), "exact beats every prefix");
        assert_eq!(to("gpt-4o-mini"), Some("qwen-turbo"), "longest prefix");
        assert_eq!(to("gpt-4-turbo"), Some("qwen-plus"));
        assert_eq!(to("gpt-3.5"), Some("qwen-long"));
        assert_eq!(
            to("claude"),
            Some("qwen-1.8b-chat"),
            "* for everything else"
        );
        assert_eq!(m.exact_names().collect::<Vec<_>>(), vec!["gpt-4o"]);

        let no_default = mapping(&[("gpt-4o", "qwen-max")]).unwrap();
        assert_eq!(no_default.lookup("gpt-4"), None);
        assert!(ModelMapping::default().is_empty());
        assert_eq!(
            m.lookup("gpt-4o").map(|t| t.json.as_str()),
            Some("\"qwen-max\"")
        );
    }

    #[test]
    fn bad_keys_and_targets_are_refused() {
        assert_eq!(mapping(&[("g*pt", "m")]).unwrap_err().0, "g*pt");
        assert_eq!(mapping(&[("**", "m")]).unwrap_err().0, "**");
        assert!(mapping(&[("", "m")]).is_err());
        assert!(mapping(&[("gpt", " ")]).is_err());
    }

    #[test]
    fn model_list_is_openai_shaped() {
        let body = model_list_json([("b", "p1"), ("a", "p2"), ("b", "p3")]);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "a");
        assert_eq!(v["data"][1]["id"], "b");
        assert_eq!(v["data"][1]["owned_by"], "p1");
        assert_eq!(v["data"][0]["object"], "model");
    }
}
