#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The `llm-filter` command as users run it: `check` reports every error as
//! `FILE: Kind ns/name: field.path: message` and never an API key; bad inputs give one clear
//! line and a non-zero exit with nothing on stdout; `render envoy` expands `${NAME}` from the
//! environment (an unset one is an error naming it) and renders the seeds' manifests verbatim.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const SEED_GATEWAY: &str = "tests/data/seed000-gateway.yaml";
const SEED_MESH: &str = "tests/data/seed001-mesh.yaml";
/// The seeds' apiKey references, environment variables with odd names.
const SEED_VARS: [(&str, &str); 3] = [
    ("API_KEY", "sk-cli-gateway-0001"),
    ("dashscope API_KEY", "sk-cli-dashscope-0002"),
    ("Moonshot API_KEY", "sk-cli-moonshot-0003"),
];
const SECRET: &str = "sk-very-secret-4711";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The binary, run from the repository root with none of the seeds' variables set.
fn llm_filter(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_llm-filter"));
    command.args(args).current_dir(repo());
    for (name, _) in SEED_VARS {
        command.env_remove(name);
    }
    command
}

fn with_seed_vars(mut command: Command) -> Command {
    for (name, value) in SEED_VARS {
        command.env(name, value);
    }
    command
}

fn run(mut command: Command) -> Output {
    command.output().expect("run llm-filter")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stderr.clone())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A fresh directory for one test's input files.
fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "cli-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Fails with the command's whole output unless it failed with `code`, printed nothing on
/// stdout, and wrote exactly `lines` lines on stderr.
fn assert_failed(out: &Output, code: i32, lines: usize, what: &str) -> Vec<String> {
    let err = stderr_lines(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit status; stderr: {err:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: nothing may reach stdout on failure, got {:?}",
        stdout(out)
    );
    assert_eq!(err.len(), lines, "{what}: stderr lines: {err:#?}");
    err
}

const PROVIDER: &str = "apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: p}
spec:
  host: p.example
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {model: m, apiKey: sk-very-secret-4711}
";

#[test]
fn check_accepts_the_seeds_verbatim_and_prints_nothing() {
    for seed in [SEED_GATEWAY, SEED_MESH] {
        let out = run(llm_filter(&["check", seed]));
        assert!(out.status.success(), "{seed}: {:?}", stderr_lines(&out));
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{seed}");
    }
}

#[test]
fn check_prints_every_error_with_file_resource_and_field_path() {
    let dir = temp_dir();
    let file = write(
        &dir,
        "several.yaml",
        &format!(
            "{PROVIDER}---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: r1, namespace: team}}
spec:
  host: r1.example
  rules:
  - backendRefs:
    - providerHost: p.example
    - providerHost: nowhere.example
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: r2}}
spec:
  host: r2.example
  rules:
  - matches:
    - headers:
        x-user: {{regex: \"(\"}}
    backendRefs:
    - providerHost: p.example
"
        ),
    );
    let out = run(llm_filter(&["check", &file]));
    let err = assert_failed(&out, 1, 2, "check several.yaml");
    assert_eq!(
        err[0],
        format!(
            "{file}: LLMRoute team/r1: rules[0].backendRefs[1].providerHost: \
             no LLMProvider has host \"nowhere.example\""
        )
    );
    assert!(
        err[1].starts_with(&format!(
            "{file}: LLMRoute default/r2: rules[0].matches[0].headers.x-user.regex: invalid regex"
        )),
        "{}",
        err[1]
    );

    // Errors of several files, each naming its own file.
    let other = write(
        &dir,
        "other.yaml",
        "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {name: r3}\n\
         spec: {host: r3.example, rules: [{backendRefs: [{providerHost: p.example, weight: -1}]}]}\n",
    );
    let out = run(llm_filter(&["check", &file, &other]));
    let err = assert_failed(&out, 1, 3, "check several.yaml other.yaml");
    assert_eq!(
        err[2],
        format!("{other}: LLMRoute default/r3: rules[0].backendRefs[0].weight: -1 is negative")
    );
}

#[test]
fn bad_inputs_give_one_clear_line_and_a_non_zero_exit() {
    let dir = temp_dir();
    let unknown_kind = write(
        &dir,
        "unknown-kind.yaml",
        "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMGateway\nmetadata: {name: g}\nspec: {}\n",
    );
    let syntax = write(
        &dir,
        "syntax.yaml",
        "apiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMProvider\nmetadata: {name: x\nspec: [\n",
    );
    let missing = dir.join("missing.yaml").display().to_string();
    let first = write(&dir, "first.yaml", PROVIDER);
    let second = write(
        &dir,
        "second.yaml",
        &PROVIDER.replace("p.example", "q.example"),
    );
    let cases: [(Vec<&str>, String); 4] = [
        (
            vec![&unknown_kind],
            format!(
                "{unknown_kind}: LLMGateway default/g: kind: expected LLMProvider or LLMRoute, \
                 found \"LLMGateway\""
            ),
        ),
        (
            vec![&syntax],
            format!("{syntax}: document 1: not valid YAML or JSON: "),
        ),
        (vec![&missing], format!("{missing}: cannot read: ")),
        (
            vec![&first, &second],
            format!("{second}: LLMProvider default/p: defined more than once"),
        ),
    ];
    for (files, want) in cases {
        for command in [vec!["check"], vec!["render", "envoy"]] {
            let args: Vec<&str> = command.iter().chain(files.iter()).copied().collect();
            let out = run(llm_filter(&args));
            let err = assert_failed(&out, 1, 1, &args.join(" "));
            assert!(
                err[0].starts_with(&want),
                "{}: got {:?}, want it to start with {want:?}",
                args.join(" "),
                err[0]
            );
        }
    }
}

#[test]
fn check_never_prints_an_api_key() {
    let dir = temp_dir();
    // A key pasted into the wrong field, and a key next to other errors.
    let misplaced = write(
        &dir,
        "misplaced.yaml",
        &PROVIDER.replace("model: m,", &format!("model: m, stream: {SECRET},")),
    );
    let unknown_field = write(
        &dir,
        "unknown-field.yaml",
        &PROVIDER.replace("apiKey:", "api_key:"),
    );
    let broken_route = write(
        &dir,
        "route.yaml",
        &format!(
            "{}---\napiVersion: istio.alibabacloud.com/v1beta1\nkind: LLMRoute\nmetadata: {{name: r}}\n\
             spec: {{host: r.example, rules: [{{backendRefs: [{{providerHost: nowhere.example}}]}}]}}\n",
            PROVIDER
        ),
    );
    for file in [&misplaced, &unknown_field, &broken_route] {
        let out = run(llm_filter(&["check", file]));
        let err = assert_failed(&out, 1, 1, file);
        assert!(err[0].starts_with(file.as_str()), "{}", err[0]);
        assert!(
            !err[0].contains(SECRET),
            "check printed an API key: {}",
            err[0]
        );
    }
    let out = run(llm_filter(&["check", &misplaced]));
    assert!(
        stderr_lines(&out)[0].contains("configs.defaultConfig.openAIConfig.stream"),
        "{:?}",
        stderr_lines(&out)
    );
}

#[test]
fn render_with_an_unset_variable_names_it_and_writes_nothing() {
    let out = run(llm_filter(&["render", "envoy", SEED_GATEWAY]));
    let err = assert_failed(&out, 1, 1, "render envoy seed000 without API_KEY");
    assert_eq!(
        err[0],
        format!(
            "{SEED_GATEWAY}: LLMProvider istio-system/dashscope-qwen: \
             configs.defaultConfig.openAIConfig.apiKey: environment variable \"API_KEY\" is not set"
        )
    );

    // One variable of two missing: still nothing rendered, and the set key is not printed.
    let mut command = llm_filter(&["render", "envoy", SEED_MESH]);
    command.env("dashscope API_KEY", SECRET);
    let out = run(command);
    let err = assert_failed(&out, 1, 1, "render envoy seed001 without Moonshot API_KEY");
    assert!(
        err[0].contains("environment variable \"Moonshot API_KEY\" is not set"),
        "{}",
        err[0]
    );
    assert!(!err[0].contains(SECRET));
}

#[test]
fn the_seeds_render_verbatim_with_their_keys_from_the_environment() {
    for (seed, keys) in [
        (SEED_GATEWAY, vec![SEED_VARS[0].1]),
        (SEED_MESH, vec![SEED_VARS[1].1, SEED_VARS[2].1]),
    ] {
        let out = run(with_seed_vars(llm_filter(&["render", "envoy", seed])));
        assert!(out.status.success(), "{seed}: {:?}", stderr_lines(&out));
        assert!(out.stderr.is_empty(), "{seed}: {:?}", stderr_lines(&out));
        let yaml = stdout(&out);
        assert!(
            yaml.starts_with(&format!(
                "# Generated by `llm-filter render envoy` from {seed}.\n"
            )),
            "{yaml}"
        );
        let doc: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        let hcm = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"];
        let wasm = hcm["http_filters"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "envoy.filters.http.wasm")
            .unwrap();
        let embedded = wasm["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .unwrap();
        for key in keys {
            assert!(
                embedded.contains(&format!("apiKey: {key}\n")),
                "{seed}: {key} not embedded"
            );
        }
        assert!(!embedded.contains("${"), "{seed}: unexpanded reference");
        llm_filter::policy::Policy::from_text(embedded).unwrap();

        // Same input, same bytes.
        let again = run(with_seed_vars(llm_filter(&["render", "envoy", seed])));
        assert_eq!(stdout(&again), yaml, "{seed}: output is not deterministic");
    }
}

#[test]
fn render_envoy_refuses_bad_options_with_one_line() {
    let dir = temp_dir();
    let bad_extend = write(&dir, "extend.yaml", "listeners: []\n");
    let missing_extend = dir.join("missing-extend.yaml").display().to_string();
    for (args, want) in [
        (
            vec!["--extend", bad_extend.as_str()],
            format!("{bad_extend}: unknown key \"listeners\""),
        ),
        (
            vec!["--extend", missing_extend.as_str()],
            format!("{missing_extend}: cannot read: "),
        ),
        (
            vec!["--endpoint", "api.example=127.0.0.1:9443"],
            "--endpoint api.example=...: no LLMProvider has host \"api.example\"".to_string(),
        ),
    ] {
        let all: Vec<&str> = ["render", "envoy", SEED_MESH]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let out = run(with_seed_vars(llm_filter(&all)));
        let err = assert_failed(&out, 1, 1, &all.join(" "));
        assert!(err[0].starts_with(&want), "{}: {}", all.join(" "), err[0]);
    }
    // A usage error: exit 2, the message and the usage on stderr, nothing on stdout.
    let out = run(llm_filter(&["render", "envoy"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = stderr_lines(&out).join("\n");
    assert!(
        err.contains("required arguments were not provided") && err.contains("<FILE>..."),
        "{err}"
    );
    assert!(err.contains("Usage: llm-filter render envoy"), "{err}");
}

#[test]
fn usage_errors_exit_2_with_the_usage_on_stderr() {
    for args in [
        vec![],
        vec!["frobnicate"],
        vec!["render"],
        vec!["render", "nginx", SEED_MESH],
        vec!["check"],
        vec!["check", SEED_MESH, "--wasm", "x.wasm"],
        vec!["render", "envoy", SEED_MESH, "--listen", "10000"],
        vec!["completions", "tcsh"],
    ] {
        let out = run(llm_filter(&args));
        let err = stderr_lines(&out).join("\n");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", stdout(&out));
        // A command without its subcommand gets its help (on stderr); anything else clap's
        // one error.
        assert!(
            err.starts_with("error: ") || err.contains("\nUsage: llm-filter"),
            "{args:?}: {err}"
        );
        assert!(err.contains("--help"), "{args:?}: {err}");
    }
}

#[test]
fn help_and_version_go_to_stdout_with_an_example_for_every_command() {
    for args in [
        vec!["--help"],
        vec!["check", "--help"],
        vec!["render", "--help"],
        vec!["render", "envoy", "--help"],
        vec!["render", "istio", "--help"],
        vec!["crds", "--help"],
        vec!["completions", "--help"],
        vec!["help", "render", "envoy"],
    ] {
        let out = run(llm_filter(&args));
        assert!(out.status.success(), "{args:?}: {:?}", stderr_lines(&out));
        let help = stdout(&out);
        assert!(help.contains("Usage: llm-filter"), "{args:?}: {help}");
        assert!(
            help.contains("Example"),
            "{args:?} shows no example: {help}"
        );
    }
    let out = run(llm_filter(&["--version"]));
    assert!(out.status.success());
    assert_eq!(
        stdout(&out),
        format!("llm-filter {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn completions_are_scripts_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef llm-filter"),
        ("fish", "complete -c llm-filter"),
    ] {
        let out = run(llm_filter(&["completions", shell]));
        assert!(out.status.success(), "{shell}: {:?}", stderr_lines(&out));
        let script = stdout(&out);
        assert!(script.contains(marker), "{shell}: {script}");
        for word in ["check", "render", "extend", "wasm-url"] {
            assert!(script.contains(word), "{shell}: no {word} in {script}");
        }
    }
}

/// The model fields go through `check` like the others: a bad `modelMapping` key and a bad
/// `matches[].model` regex are each one line naming file, resource and field.
#[test]
fn check_reports_model_fields() {
    let dir = temp_dir();
    let file = write(
        &dir,
        "models.yaml",
        "apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: p}
spec:
  host: p.example
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {modelMapping: {'g*x': m}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: r}
spec:
  host: llm.local
  rules:
  - matches: [{model: {regex: '(oops'}}]
    backendRefs: [{providerHost: p.example}]
",
    );
    let out = run(llm_filter(&["check", &file]));
    let err = assert_failed(&out, 1, 2, "check models.yaml");
    assert!(
        err[0].ends_with(
            "models.yaml: LLMProvider default/p: configs.defaultConfig.openAIConfig.modelMapping.g*x: \
             `*` may only end a key (`prefix*`, or `*` alone)"
        ),
        "{err:?}"
    );
    assert!(
        err[1].contains(
            "models.yaml: LLMRoute default/r: rules[0].matches[0].model.regex: invalid regex"
        ),
        "{err:?}"
    );
}
