//! `llm-filter`: the host-side companion of the filter. It reads the same `LLMProvider` /
//! `LLMRoute` manifests with the same parsing and validation code as the filter, so a
//! configuration that renders is one the filter accepts.
//!
//! ```text
//! llm-filter check FILE...
//! llm-filter render envoy FILE... [--wasm PATH] [--listen ADDR:PORT] [--admin ADDR:PORT]
//!                                 [--endpoint HOST=ADDR:PORT]... [--ca FILE] [--extend FILE]...
//!                                 [--ratelimit ADDR:PORT [--ratelimit-failure open|closed]]
//! llm-filter render istio FILE... [--wasm-url URL]
//!                                 [--ratelimit HOST:PORT [--ratelimit-failure open|closed]]
//! llm-filter render ratelimit FILE...
//! llm-filter crds
//! ```
//!
//! Output goes to stdout only once everything succeeded; errors go to stderr, one line each,
//! and the exit code is 1 (2 for a usage error).

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
mod args;
#[cfg(not(target_arch = "wasm32"))]
mod crds;
#[cfg(not(target_arch = "wasm32"))]
mod envoy;
#[cfg(not(target_arch = "wasm32"))]
mod input;
#[cfg(not(target_arch = "wasm32"))]
mod istio;
#[cfg(not(target_arch = "wasm32"))]
mod ratelimit;

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    use std::io::Write;
    use std::process::ExitCode;

    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            if stdout
                .write_all(output.as_bytes())
                .and_then(|_| stdout.flush())
                .is_err()
            {
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(Failure::Usage(message)) => {
            eprintln!("llm-filter: {message}\n\n{}", args::USAGE);
            ExitCode::from(2)
        }
        Err(Failure::Errors(lines)) => {
            for line in lines {
                eprintln!("{line}");
            }
            ExitCode::from(1)
        }
    }
}

/// Why a command produced no output.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug)]
pub enum Failure {
    /// The command line is wrong.
    Usage(String),
    /// The input is wrong: one line per problem, each naming the file.
    Errors(Vec<String>),
}

/// Runs one command and returns what it prints on success.
#[cfg(not(target_arch = "wasm32"))]
fn run(argv: &[String]) -> Result<String, Failure> {
    let command = args::parse(argv).map_err(Failure::Usage)?;
    match command {
        args::Command::Help => Ok(format!("{}\n", args::USAGE)),
        args::Command::Crds => Ok(crds::render()),
        args::Command::Check { files } => {
            input::check(&files).map_err(Failure::Errors)?;
            Ok(String::new())
        }
        args::Command::RenderEnvoy { files, options } => {
            let loaded = input::load_for_render(&files).map_err(Failure::Errors)?;
            envoy::render(&loaded.config, &options, &files).map_err(|e| Failure::Errors(vec![e]))
        }
        args::Command::RenderIstio { files, options } => {
            let loaded = input::load_for_render(&files).map_err(Failure::Errors)?;
            istio::render(&loaded.config, &options).map_err(|e| Failure::Errors(vec![e]))
        }
        args::Command::RenderRateLimit { files } => {
            // No API keys in this output: `${NAME}` need not be set.
            let loaded = input::load(&files).map_err(Failure::Errors)?;
            loaded.validate().map_err(Failure::Errors)?;
            ratelimit::render(&loaded.config, &files).map_err(|e| Failure::Errors(vec![e]))
        }
    }
}
