//! The command line, parsed by hand: a handful of subcommands and `--flag value` options.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::ratelimit::Failure;

pub const USAGE: &str = "usage:
  llm-filter check FILE...
  llm-filter render envoy FILE... [--wasm PATH] [--listen ADDR:PORT] [--admin ADDR:PORT]
                                  [--endpoint HOST=ADDR:PORT]... [--ca FILE] [--extend FILE]...
                                  [--ratelimit ADDR:PORT [--ratelimit-failure open|closed]]
  llm-filter render istio FILE... [--wasm-url URL]
                                  [--ratelimit HOST:PORT [--ratelimit-failure open|closed]]
  llm-filter render ratelimit FILE...
  llm-filter crds";

#[derive(Debug, PartialEq)]
pub enum Command {
    Help,
    Check {
        files: Vec<PathBuf>,
    },
    RenderEnvoy {
        files: Vec<PathBuf>,
        options: EnvoyOptions,
    },
    RenderIstio {
        files: Vec<PathBuf>,
        options: IstioOptions,
    },
    /// The rate limit service's configuration for the manifests' budgets.
    RenderRateLimit {
        files: Vec<PathBuf>,
    },
    Crds,
}

/// `render envoy` options; defaults are what the shipped `envoy/` files use.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoyOptions {
    /// Path of the `.wasm` as Envoy should open it.
    pub wasm: String,
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

/// `--ratelimit ADDR:PORT` and `--ratelimit-failure`.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitService {
    pub address: SocketAddr,
    pub failure: Failure,
}

/// Reads `--ratelimit` and `--ratelimit-failure` from `flags`; the others are left alone.
fn rate_limit_service(flags: &[(String, String)]) -> Result<Option<RateLimitService>, String> {
    let mut address = None;
    let mut failure = None;
    for (flag, value) in flags {
        match flag.as_str() {
            "--ratelimit" => address = Some(SocketAddr::parse(flag, value)?),
            "--ratelimit-failure" => failure = Some(Failure::parse(flag, value)?),
            _ => {}
        }
    }
    match (address, failure) {
        (Some(address), failure) => Ok(Some(RateLimitService {
            address,
            failure: failure.unwrap_or_default(),
        })),
        (None, Some(_)) => Err("--ratelimit-failure needs --ratelimit".to_string()),
        (None, None) => Ok(None),
    }
}

/// The flags `rate_limit_service` reads.
const RATE_LIMIT_FLAGS: [&str; 2] = ["--ratelimit", "--ratelimit-failure"];

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            wasm: "target/wasm32-wasip1/release/llm_filter.wasm".to_string(),
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
    /// `--ratelimit HOST:PORT`: the rate limit service, a service of the mesh.
    pub ratelimit: Option<RateLimitService>,
}

impl Default for IstioOptions {
    fn default() -> Self {
        IstioOptions {
            wasm_url: "oci://ghcr.io/llm-filter/llm-filter:0.1.0".to_string(),
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

    fn parse(flag: &str, text: &str) -> Result<SocketAddr, String> {
        let (address, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{flag}: expected ADDR:PORT, got {text:?}"))?;
        let address = address.trim_start_matches('[').trim_end_matches(']');
        let port = port
            .parse()
            .map_err(|_| format!("{flag}: {port:?} is not a port number"))?;
        if address.is_empty() {
            return Err(format!("{flag}: expected ADDR:PORT, got {text:?}"));
        }
        Ok(SocketAddr::new(address, port))
    }
}

pub fn parse(argv: &[String]) -> Result<Command, String> {
    let words: Vec<&str> = argv.iter().map(String::as_str).collect();
    match words.as_slice() {
        [] | ["help" | "-h" | "--help", ..] => Ok(Command::Help),
        ["crds"] => Ok(Command::Crds),
        ["crds", extra, ..] => Err(format!("crds takes no arguments, got {extra:?}")),
        ["check", rest @ ..] => {
            let (files, _) = split(rest, &[])?;
            Ok(Command::Check {
                files: need_files(files)?,
            })
        }
        ["render", "envoy", rest @ ..] => {
            let flags_taken = [
                "--wasm",
                "--listen",
                "--admin",
                "--endpoint",
                "--ca",
                "--extend",
                RATE_LIMIT_FLAGS[0],
                RATE_LIMIT_FLAGS[1],
            ];
            let (files, flags) = split(rest, &flags_taken)?;
            let mut options = EnvoyOptions {
                ratelimit: rate_limit_service(&flags)?,
                ..EnvoyOptions::default()
            };
            for (flag, value) in &flags {
                match flag.as_str() {
                    "--ratelimit" | "--ratelimit-failure" => {}
                    "--wasm" => options.wasm = value.clone(),
                    "--listen" => options.listen = SocketAddr::parse(flag, value)?,
                    "--admin" => options.admin = SocketAddr::parse(flag, value)?,
                    "--ca" => options.ca = Some(value.clone()),
                    "--extend" => options.extends.push(PathBuf::from(value)),
                    _ => {
                        let (host, addr) = value.split_once('=').ok_or_else(|| {
                            format!("--endpoint: expected HOST=ADDR:PORT, got {value:?}")
                        })?;
                        let addr = SocketAddr::parse(flag, addr)?;
                        options.endpoints.insert(host.to_ascii_lowercase(), addr);
                    }
                }
            }
            Ok(Command::RenderEnvoy {
                files: need_files(files)?,
                options,
            })
        }
        ["render", "istio", rest @ ..] => {
            let (files, flags) = split(
                rest,
                &["--wasm-url", RATE_LIMIT_FLAGS[0], RATE_LIMIT_FLAGS[1]],
            )?;
            let mut options = IstioOptions {
                ratelimit: rate_limit_service(&flags)?,
                ..IstioOptions::default()
            };
            for (flag, value) in flags {
                if flag == "--wasm-url" {
                    options.wasm_url = value;
                }
            }
            Ok(Command::RenderIstio {
                files: need_files(files)?,
                options,
            })
        }
        ["render", "ratelimit", rest @ ..] => {
            let (files, _) = split(rest, &[])?;
            Ok(Command::RenderRateLimit {
                files: need_files(files)?,
            })
        }
        ["render", other, ..] => Err(format!(
            "render what? expected envoy, istio or ratelimit, got {other:?}"
        )),
        ["render"] => Err("render what? expected envoy, istio or ratelimit".to_string()),
        [other, ..] => Err(format!("unknown command {other:?}")),
    }
}

/// Splits positional files from `--flag value` pairs (also `--flag=value`).
/// Positional files and `(flag, value)` pairs.
type Split = (Vec<PathBuf>, Vec<(String, String)>);

fn split(words: &[&str], known: &[&str]) -> Result<Split, String> {
    let mut files = Vec::new();
    let mut flags = Vec::new();
    let mut iter = words.iter();
    while let Some(&word) = iter.next() {
        if !word.starts_with("--") {
            files.push(PathBuf::from(word));
            continue;
        }
        let (flag, inline) = match word.split_once('=') {
            Some((flag, value)) => (flag, Some(value)),
            None => (word, None),
        };
        if !known.contains(&flag) {
            return Err(format!("unknown option {flag:?}"));
        }
        let value = match inline {
            Some(value) => value,
            None => iter
                .next()
                .copied()
                .ok_or_else(|| format!("{flag} needs a value"))?,
        };
        flags.push((flag.to_string(), value.to_string()));
    }
    Ok((files, flags))
}

fn need_files(files: Vec<PathBuf>) -> Result<Vec<PathBuf>, String> {
    if files.is_empty() {
        Err("no manifest files given".to_string())
    } else {
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(words: &str) -> Result<Command, String> {
        let argv: Vec<String> = words.split_whitespace().map(str::to_string).collect();
        parse(&argv)
    }

    #[test]
    fn render_envoy_options() {
        let command = parse_words(
            "render envoy a.yaml --listen 127.0.0.1:8080 b.yaml --endpoint API.moonshot.cn=127.0.0.1:8443 \
             --ca=/tmp/ca.pem --wasm /x.wasm --admin [::1]:9000 --extend rbac.yaml",
        )
        .unwrap();
        let Command::RenderEnvoy { files, options } = command else {
            panic!("{command:?}");
        };
        assert_eq!(
            files,
            vec![PathBuf::from("a.yaml"), PathBuf::from("b.yaml")]
        );
        assert_eq!(options.listen, SocketAddr::new("127.0.0.1", 8080));
        assert_eq!(options.admin, SocketAddr::new("::1", 9000));
        assert_eq!(
            options.endpoints.get("api.moonshot.cn"),
            Some(&SocketAddr::new("127.0.0.1", 8443))
        );
        assert_eq!(options.ca.as_deref(), Some("/tmp/ca.pem"));
        assert_eq!(options.wasm, "/x.wasm");
        assert_eq!(options.extends, vec![PathBuf::from("rbac.yaml")]);
        assert_eq!(options.ratelimit, None);
    }

    #[test]
    fn rate_limit_service_options() {
        let Command::RenderEnvoy { options, .. } =
            parse_words("render envoy a.yaml --ratelimit 127.0.0.1:8081").unwrap()
        else {
            panic!("not render envoy");
        };
        assert_eq!(
            options.ratelimit,
            Some(RateLimitService {
                address: SocketAddr::new("127.0.0.1", 8081),
                failure: Failure::Open,
            })
        );
        let Command::RenderIstio { options, .. } = parse_words(
            "render istio a.yaml --ratelimit-failure closed --ratelimit ratelimit.infra.svc.cluster.local:8081",
        )
        .unwrap() else {
            panic!("not render istio");
        };
        let service = options.ratelimit.unwrap();
        assert_eq!(service.address.address, "ratelimit.infra.svc.cluster.local");
        assert_eq!(service.failure, Failure::Closed);
        assert_eq!(
            parse_words("render ratelimit a.yaml b.yaml").unwrap(),
            Command::RenderRateLimit {
                files: vec![PathBuf::from("a.yaml"), PathBuf::from("b.yaml")]
            }
        );
        for (words, message) in [
            (
                "render envoy a.yaml --ratelimit-failure closed",
                "--ratelimit-failure needs --ratelimit",
            ),
            (
                "render envoy a.yaml --ratelimit x:1 --ratelimit-failure maybe",
                "--ratelimit-failure: expected open or closed",
            ),
            (
                "render istio a.yaml --ratelimit nowhere",
                "--ratelimit: expected ADDR:PORT",
            ),
            ("render ratelimit", "no manifest files given"),
            (
                "render ratelimit a.yaml --ratelimit x:1",
                "unknown option \"--ratelimit\"",
            ),
        ] {
            let error = parse_words(words).unwrap_err();
            assert!(error.starts_with(message), "{words}: {error}");
        }
    }

    #[test]
    fn usage_errors() {
        for (words, message) in [
            ("check", "no manifest files given"),
            ("render", "render what?"),
            ("render nginx a.yaml", "render what?"),
            ("frobnicate", "unknown command"),
            ("check a.yaml --wasm x", "unknown option \"--wasm\""),
            ("render envoy a.yaml --listen", "--listen needs a value"),
            (
                "render envoy a.yaml --listen 10000",
                "--listen: expected ADDR:PORT",
            ),
            (
                "render envoy a.yaml --listen x:y",
                "--listen: \"y\" is not a port",
            ),
            (
                "render envoy a.yaml --endpoint h",
                "--endpoint: expected HOST=ADDR:PORT",
            ),
            ("crds extra", "crds takes no arguments"),
        ] {
            let error = parse_words(words).unwrap_err();
            assert!(error.starts_with(message), "{words}: {error}");
        }
        assert_eq!(parse_words("").unwrap(), Command::Help);
        assert_eq!(parse_words("crds").unwrap(), Command::Crds);
    }
}
