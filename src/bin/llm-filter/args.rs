//! The command line (clap derive). Each subcommand is a variant of [`Command`] with its own
//! `Args` struct; `render` has one variant per target in [`Render`]. A new option is a field
//! with `#[arg]` on the struct of the command that takes it, a new target a variant of `Render`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::ratelimit::Failure;

/// Where `render envoy` points Envoy at the filter unless `--wasm` says otherwise.
pub const DEFAULT_WASM: &str = "target/wasm32-wasip1/release/llm_filter.wasm";
/// Where `render istio` tells Istio to pull the filter from unless `--wasm-url` says otherwise.
pub const DEFAULT_WASM_URL: &str = "oci://ghcr.io/llm-filter/llm-filter:0.1.0";
const DEFAULT_LISTEN: &str = "0.0.0.0:10000";
const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

const ABOUT: &str = "Check LLMProvider/LLMRoute manifests and render them into Envoy or Istio \
configuration, with the same parsing and validation as the llm-filter proxy-wasm filter.";

const AFTER_HELP: &str = "\
Output goes to stdout only when everything succeeded. Errors go to stderr, one line each,
as FILE: Kind namespace/name: field: message. Exit status: 0 success, 1 invalid input,
2 usage error.

Examples:
  llm-filter check envoy/manifests/mesh.yaml
  llm-filter render envoy envoy/manifests/mesh.yaml > envoy.yaml
  llm-filter render ratelimit envoy/manifests/budgets.yaml > ratelimit.yaml
  llm-filter render istio envoy/manifests/mesh.yaml | kubectl apply -f -
  llm-filter completions bash > /etc/bash_completion.d/llm-filter";

#[derive(Debug, Parser)]
#[command(
    name = "llm-filter",
    version,
    about = ABOUT,
    after_help = AFTER_HELP,
    arg_required_else_help = true,
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check manifests exactly as the filter would load them; prints nothing when they are valid
    #[command(after_help = "\
Every problem of every file is reported, one line each, and the exit status is 1.
\"${NAME}\" in an apiKey is not expanded here (render does that).

Example:
  llm-filter check envoy/manifests/mesh.yaml envoy/manifests/gateway.yaml")]
    Check(CheckArgs),
    /// Render manifests into deployment configuration (an Envoy bootstrap or Istio resources)
    #[command(
        subcommand,
        after_help = "Example:\n  llm-filter render envoy envoy/manifests/mesh.yaml > envoy.yaml"
    )]
    Render(Render),
    /// Print the CustomResourceDefinitions of LLMProvider and LLMRoute
    #[command(after_help = "Example:\n  llm-filter crds | kubectl apply -f -")]
    Crds,
    /// Print a shell completion script
    #[command(after_help = "\
Example (bash):
  llm-filter completions bash > ~/.local/share/bash-completion/completions/llm-filter")]
    Completions {
        /// The shell to complete for
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Manifest files: YAML streams of LLMProvider/LLMRoute, or the JSON form
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Render {
    /// A complete Envoy bootstrap: listener, the filter, a virtual host and TLS cluster per provider
    #[command(after_help = "\
\"${NAME}\" in an apiKey is replaced from the environment; an unset variable is an error and
nothing is written. The output holds the keys: keep it out of version control.

Example:
  DASHSCOPE_API_KEY=sk-... MOONSHOT_API_KEY=sk-... \\
    llm-filter render envoy envoy/manifests/mesh.yaml --extend envoy/extend/local-service.yaml > envoy.yaml")]
    Envoy(EnvoyArgs),
    /// Istio resources: WasmPlugin (or EnvoyFilter), ServiceEntry, DestinationRule, VirtualService
    #[command(after_help = "\
\"${NAME}\" in an apiKey is replaced from the environment. The output holds the keys (in the
WasmPlugin's pluginConfig): pipe it to kubectl rather than saving it.

Example:
  llm-filter render istio envoy/manifests/mesh.yaml --wasm-url oci://registry.example/llm-filter:0.1.0 \\
    | kubectl apply -f -")]
    Istio(IstioArgs),
    /// The rate limit service's configuration for the budgets (limits) of the LLMRoute rules
    #[command(after_help = "\
For github.com/envoyproxy/ratelimit (scripts/ratelimit.sh up --config FILE runs it locally).
No API key is in it, so \"${NAME}\" need not be set.

Example:
  llm-filter render ratelimit envoy/manifests/budgets.yaml > ratelimit.yaml")]
    Ratelimit(RateLimitArgs),
}

#[derive(Debug, Args)]
pub struct RateLimitArgs {
    /// Manifest files, merged into one configuration
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
}

/// `--ratelimit` and `--ratelimit-failure`, for `render envoy` and `render istio`.
#[derive(Debug, Args)]
pub struct RateLimitFlags {
    /// Envoy's rate limit service, which counts the rules' budgets (limits); needed when a rule
    /// has limits (render istio: a service of the mesh, HOST:PORT)
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_socket)]
    pub ratelimit: Option<SocketAddr>,
    /// What Envoy does when the service cannot answer: let requests through uncounted, or refuse
    /// them (503)
    #[arg(long, value_enum, requires = "ratelimit", default_value_t = Failure::Open)]
    pub ratelimit_failure: Failure,
}

impl RateLimitFlags {
    pub fn service(self) -> Option<RateLimitService> {
        Some(RateLimitService {
            address: self.ratelimit?,
            failure: self.ratelimit_failure,
        })
    }
}

/// `--ratelimit ADDR:PORT` and `--ratelimit-failure`.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitService {
    pub address: SocketAddr,
    pub failure: Failure,
}

#[derive(Debug, Args)]
pub struct EnvoyArgs {
    /// Manifest files, merged into one configuration
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub options: EnvoyFlags,
}

/// `render envoy`'s options as given; [`EnvoyFlags::options`] turns them into [`EnvoyOptions`].
#[derive(Debug, Args)]
pub struct EnvoyFlags {
    /// Path of the filter's .wasm as Envoy opens it (relative: to Envoy's working directory)
    #[arg(long, value_name = "PATH", default_value = DEFAULT_WASM)]
    pub wasm: String,
    /// Load the filter as Envoy's native dynamic module (libllm_filter.so, found through
    /// ENVOY_DYNAMIC_MODULES_SEARCH_PATH) instead of the .wasm
    #[arg(long, conflicts_with = "wasm")]
    pub native: bool,
    /// Address of the plain-HTTP listener
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_LISTEN, value_parser = parse_socket)]
    pub listen: SocketAddr,
    /// Address of Envoy's admin interface
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_ADMIN, value_parser = parse_socket)]
    pub admin: SocketAddr,
    /// Connect provider HOST to ADDR:PORT, not HOST:443 (TLS still checks HOST); repeatable
    #[arg(long = "endpoint", value_name = "HOST=ADDR:PORT", value_parser = parse_endpoint)]
    pub endpoints: Vec<(String, SocketAddr)>,
    /// CA bundle that verifies providers [default: the system bundle]
    #[arg(long, value_name = "FILE")]
    pub ca: Option<String>,
    /// YAML of http_filters (before the filter), clusters, virtual_hosts to add; repeatable
    #[arg(long = "extend", value_name = "FILE")]
    pub extends: Vec<PathBuf>,
    #[command(flatten)]
    pub ratelimit: RateLimitFlags,
}

impl EnvoyFlags {
    pub fn options(self) -> EnvoyOptions {
        EnvoyOptions {
            wasm: self.wasm,
            native: self.native,
            listen: self.listen,
            admin: self.admin,
            endpoints: self
                .endpoints
                .into_iter()
                .map(|(host, addr)| (host.to_ascii_lowercase(), addr))
                .collect(),
            ca: self.ca,
            extends: self.extends,
            ratelimit: self.ratelimit.service(),
        }
    }
}

#[derive(Debug, Args)]
pub struct IstioArgs {
    /// Manifest files, merged into one configuration
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// Where Istio pulls the filter from (oci://, https:// or file://)
    #[arg(long, value_name = "URL", default_value = DEFAULT_WASM_URL)]
    pub wasm_url: String,
    /// Load the filter as Envoy's native dynamic module (libllm_filter.so mounted into the
    /// proxy, found through ENVOY_DYNAMIC_MODULES_SEARCH_PATH): EnvoyFilters, no WasmPlugin
    #[arg(long, conflicts_with = "wasm_url")]
    pub native: bool,
    #[command(flatten)]
    pub ratelimit: RateLimitFlags,
}

/// `render envoy` options; the defaults are what the shipped `envoy/` files use.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoyOptions {
    /// Path of the `.wasm` as Envoy should open it.
    pub wasm: String,
    /// `--native`: the dynamic module instead of the `.wasm`.
    pub native: bool,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// Where a provider host connects instead of `HOST:443` via DNS.
    pub endpoints: BTreeMap<String, SocketAddr>,
    /// CA bundle that verifies providers; `None`: the system bundle.
    pub ca: Option<String>,
    /// YAML files whose `http_filters` go before the llm-filter and whose `clusters` are added.
    pub extends: Vec<PathBuf>,
    /// `--ratelimit`: Envoy's rate limit service, which counts the budgets (`limits`).
    pub ratelimit: Option<RateLimitService>,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            wasm: DEFAULT_WASM.to_string(),
            native: false,
            listen: SocketAddr::new("0.0.0.0", 10000),
            admin: SocketAddr::new("127.0.0.1", 9901),
            endpoints: BTreeMap::new(),
            ca: None,
            extends: Vec::new(),
            ratelimit: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct IstioOptions {
    /// Where Istio pulls the module from (`oci://...`, `https://...` or `file://...`).
    pub wasm_url: String,
    /// `--native`: the dynamic module through EnvoyFilters instead of the WasmPlugin.
    pub native: bool,
    /// `--ratelimit HOST:PORT`: the rate limit service, a service of the mesh.
    pub ratelimit: Option<RateLimitService>,
}

impl Default for IstioOptions {
    fn default() -> Self {
        IstioOptions {
            wasm_url: DEFAULT_WASM_URL.to_string(),
            native: false,
            ratelimit: None,
        }
    }
}

/// `ADDR:PORT` as Envoy writes it (address and port apart); a host name is allowed as ADDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAddr {
    pub address: String,
    pub port: u16,
}

impl SocketAddr {
    pub fn new(address: &str, port: u16) -> SocketAddr {
        SocketAddr {
            address: address.to_string(),
            port,
        }
    }
}

/// `ADDR:PORT`, `[IPv6]:PORT` or `name:PORT`.
fn parse_socket(text: &str) -> Result<SocketAddr, String> {
    let expected = || format!("expected ADDR:PORT, got {text:?}");
    let (address, port) = text.rsplit_once(':').ok_or_else(expected)?;
    let address = address.trim_start_matches('[').trim_end_matches(']');
    let port = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number"))?;
    if address.is_empty() {
        return Err(expected());
    }
    Ok(SocketAddr::new(address, port))
}

/// `HOST=ADDR:PORT`.
fn parse_endpoint(text: &str) -> Result<(String, SocketAddr), String> {
    let (host, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("expected HOST=ADDR:PORT, got {text:?}"))?;
    if host.is_empty() {
        return Err(format!("expected HOST=ADDR:PORT, got {text:?}"));
    }
    Ok((host.to_string(), parse_socket(addr)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse_words(words: &str) -> Result<Command, clap::Error> {
        let argv = std::iter::once("llm-filter").chain(words.split_whitespace());
        Cli::try_parse_from(argv).map(|cli| cli.command)
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn render_envoy_options() {
        let command = parse_words(
            "render envoy a.yaml --listen 127.0.0.1:8080 b.yaml --endpoint API.moonshot.cn=127.0.0.1:8443 \
             --ca=/tmp/ca.pem --wasm /x.wasm --admin [::1]:9000 --extend rbac.yaml",
        )
        .unwrap();
        let Command::Render(Render::Envoy(args)) = command else {
            panic!("{command:?}");
        };
        assert_eq!(
            args.files,
            vec![PathBuf::from("a.yaml"), PathBuf::from("b.yaml")]
        );
        let options = args.options.options();
        assert_eq!(options.listen, SocketAddr::new("127.0.0.1", 8080));
        assert_eq!(options.admin, SocketAddr::new("::1", 9000));
        assert_eq!(
            options.endpoints.get("api.moonshot.cn"),
            Some(&SocketAddr::new("127.0.0.1", 8443))
        );
        assert_eq!(options.ca.as_deref(), Some("/tmp/ca.pem"));
        assert_eq!(options.wasm, "/x.wasm");
        assert_eq!(options.extends, vec![PathBuf::from("rbac.yaml")]);
    }

    #[test]
    fn defaults_are_the_shipped_ones() {
        let Command::Render(Render::Envoy(args)) = parse_words("render envoy a.yaml").unwrap()
        else {
            panic!("not render envoy");
        };
        assert_eq!(args.options.options(), EnvoyOptions::default());
        let Command::Render(Render::Istio(args)) = parse_words("render istio a.yaml").unwrap()
        else {
            panic!("not render istio");
        };
        assert_eq!(args.wasm_url, IstioOptions::default().wasm_url);
    }

    #[test]
    fn rate_limit_service_options() {
        let Command::Render(Render::Envoy(args)) =
            parse_words("render envoy a.yaml --ratelimit 127.0.0.1:8081").unwrap()
        else {
            panic!("not render envoy");
        };
        assert_eq!(
            args.options.options().ratelimit,
            Some(RateLimitService {
                address: SocketAddr::new("127.0.0.1", 8081),
                failure: Failure::Open,
            })
        );
        let Command::Render(Render::Istio(args)) = parse_words(
            "render istio a.yaml --ratelimit-failure closed --ratelimit ratelimit.infra.svc.cluster.local:8081",
        )
        .unwrap() else {
            panic!("not render istio");
        };
        let service = args.ratelimit.service().unwrap();
        assert_eq!(service.address.address, "ratelimit.infra.svc.cluster.local");
        assert_eq!(service.failure, Failure::Closed);
        let Command::Render(Render::Ratelimit(args)) =
            parse_words("render ratelimit a.yaml b.yaml").unwrap()
        else {
            panic!("not render ratelimit");
        };
        assert_eq!(
            args.files,
            vec![PathBuf::from("a.yaml"), PathBuf::from("b.yaml")]
        );
        for (words, message) in [
            (
                "render envoy a.yaml --ratelimit-failure closed",
                "required arguments were not provided",
            ),
            (
                "render envoy a.yaml --ratelimit x:1 --ratelimit-failure maybe",
                "invalid value 'maybe'",
            ),
            (
                "render istio a.yaml --ratelimit nowhere",
                "expected ADDR:PORT, got \"nowhere\"",
            ),
            ("render ratelimit", "required arguments were not provided"),
            (
                "render ratelimit a.yaml --ratelimit x:1",
                "unexpected argument '--ratelimit'",
            ),
        ] {
            let error = parse_words(words).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{words}: {error}");
            let text = error.render().to_string();
            assert!(text.contains(message), "{words}: {text}");
        }
    }

    #[test]
    fn usage_errors() {
        for (words, message) in [
            ("check", "required arguments were not provided"),
            ("render", "Usage: llm-filter render"),
            ("render nginx a.yaml", "unrecognized subcommand 'nginx'"),
            ("frobnicate", "unrecognized subcommand 'frobnicate'"),
            ("check a.yaml --wasm x", "unexpected argument '--wasm'"),
            (
                "render envoy a.yaml --listen",
                "a value is required for '--listen",
            ),
            (
                "render envoy a.yaml --listen 10000",
                "expected ADDR:PORT, got \"10000\"",
            ),
            (
                "render envoy a.yaml --listen x:y",
                "\"y\" is not a port number",
            ),
            (
                "render envoy a.yaml --endpoint h",
                "expected HOST=ADDR:PORT, got \"h\"",
            ),
            ("crds extra", "unexpected argument 'extra'"),
            ("completions tcsh", "invalid value 'tcsh'"),
        ] {
            let error = parse_words(words).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{words}: {error}");
            let text = error.render().to_string();
            assert!(text.contains(message), "{words}: {text}");
        }
        assert!(matches!(parse_words("crds").unwrap(), Command::Crds));
    }
}
