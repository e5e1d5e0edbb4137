//! `llm-filter`: the host-side companion of the filter. It reads the same `LLMProvider` /
//! `LLMRoute` manifests with the same parsing and validation code as the filter, so a
//! configuration that renders is one the filter accepts. `llm-filter --help` lists the
//! commands (`check`, `render envoy`, `render istio`, `render ratelimit`, `crds`,
//! `completions`).
//!
//! Output goes to stdout only once everything succeeded; errors go to stderr, one line each,
//! and the exit code is 1 (2 for a usage error, reported by clap).

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

    use clap::Parser;

    // Usage errors, --help and --version: clap prints them and exits (2 for a usage error).
    let cli = args::Cli::parse();
    match run(cli.command) {
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
        Err(lines) => {
            for line in lines {
                eprintln!("{line}");
            }
            ExitCode::from(1)
        }
    }
}

/// Runs one command and returns what it prints on success, or one line per problem with the
/// input, each naming the file.
#[cfg(not(target_arch = "wasm32"))]
fn run(command: args::Command) -> Result<String, Vec<String>> {
    use args::{Command, Render};

    match command {
        Command::Crds => Ok(crds::render()),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            let mut cli = <args::Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cli, "llm-filter", &mut out);
            String::from_utf8(out).map_err(|e| vec![format!("completions: {e}")])
        }
        Command::Check(args) => {
            input::check(&args.files)?;
            Ok(String::new())
        }
        Command::Render(Render::Envoy(args)) => {
            let loaded = input::load_for_render(&args.files)?;
            envoy::render(&loaded.config, &args.options.options(), &args.files).map_err(|e| vec![e])
        }
        Command::Render(Render::Istio(args)) => {
            let loaded = input::load_for_render(&args.files)?;
            let options = args::IstioOptions {
                wasm_url: args.wasm_url,
                native: args.native,
                ratelimit: args.ratelimit.service(),
            };
            istio::render(&loaded.config, &options).map_err(|e| vec![e])
        }
        Command::Render(Render::Ratelimit(args)) => {
            // No API keys in this output: `${NAME}` need not be set.
            let loaded = input::load(&args.files)?;
            loaded.validate()?;
            ratelimit::render(&loaded.config, &args.files).map_err(|e| vec![e])
        }
    }
}
