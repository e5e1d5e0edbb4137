//! Reading manifest files into one configuration, with every error naming its file.

use std::path::PathBuf;

use llm_filter::config::FilterConfig;
use llm_filter::error::{ConfigError, ConfigErrors};
use llm_filter::policy::Policy;

/// The manifests of several files, merged, remembering which file each resource came from.
pub struct Loaded {
    pub config: FilterConfig,
    /// `(Kind namespace/name, file)` for every resource, in order.
    origins: Vec<(String, PathBuf)>,
}

/// Reads and parses every file; fails if any cannot be read or parsed.
pub fn load(files: &[PathBuf]) -> Result<Loaded, Vec<String>> {
    let (loaded, errors) = load_what_parses(files);
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    }
}

/// Every error of every file: what cannot be read or parsed, then what the filter's
/// validation says of the rest.
pub fn check(files: &[PathBuf]) -> Result<(), Vec<String>> {
    let (loaded, mut errors) = load_what_parses(files);
    if let Err(more) = loaded.validate() {
        errors.extend(more);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// The files that parse, merged, and one line for each that does not.
fn load_what_parses(files: &[PathBuf]) -> (Loaded, Vec<String>) {
    let mut loaded = Loaded {
        config: FilterConfig::default(),
        origins: Vec::new(),
    };
    let mut errors = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) => {
                errors.push(format!("{}: cannot read: {e}", file.display()));
                continue;
            }
        };
        match FilterConfig::parse(&text) {
            Ok(config) => {
                let names = config
                    .providers
                    .iter()
                    .map(|p| p.resource_name())
                    .chain(config.routes.iter().map(|r| r.resource_name()));
                loaded
                    .origins
                    .extend(names.map(|name| (name, file.clone())));
                loaded.config.extend(config);
            }
            Err(e) => errors.push(format!("{}: {e}", file.display())),
        }
    }
    (loaded, errors)
}

/// `load`, then `${NAME}` in API keys from the environment, then the filter's validation.
pub fn load_for_render(files: &[PathBuf]) -> Result<Loaded, Vec<String>> {
    let mut loaded = load(files)?;
    if let Err(errors) = loaded
        .config
        .substitute_api_keys(|name| std::env::var(name).ok())
    {
        return Err(loaded.attribute(&errors));
    }
    loaded.validate()?;
    Ok(loaded)
}

impl Loaded {
    /// Compiles the configuration exactly as the filter would.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        Policy::compile(&self.config)
            .map(drop)
            .map_err(|errors| self.attribute(&errors))
    }

    /// `FILE: Kind ns/name: field: message` for each error. A resource defined twice is
    /// attributed to the file of its second definition.
    fn attribute(&self, errors: &ConfigErrors) -> Vec<String> {
        errors
            .0
            .iter()
            .map(|e| {
                let file = self
                    .origins
                    .iter()
                    .rev()
                    .find(|(name, _)| *name == e.resource)
                    .map(|(_, file)| file.display().to_string());
                match file {
                    Some(file) => format!("{file}: {e}"),
                    None => self.files_prefix(e),
                }
            })
            .collect()
    }

    /// An error that names no resource (e.g. `settings`): prefix every file.
    fn files_prefix(&self, e: &ConfigError) -> String {
        let mut files: Vec<String> = Vec::new();
        for (_, file) in &self.origins {
            let file = file.display().to_string();
            if !files.contains(&file) {
                files.push(file);
            }
        }
        format!("{}: {e}", files.join(", "))
    }
}
