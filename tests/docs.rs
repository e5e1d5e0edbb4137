#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The documentation cannot rot: README.md and docs/*.md are read as a reader would follow them.
//! Every manifest block passes `llm-filter check` (or is refused as it says), every other YAML
//! block parses, every relative link and `#anchor` resolves, and every command in a `sh` block
//! is run here, run by the suite elsewhere (checked), or marked `# needs: WHAT`. The rules are
//! described for writers in docs/development.md ("The checks on these docs").

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const README_MAX_LINES: usize = 250;

/// What a `# needs:` marker may name.
const NEEDS: [&str; 3] = ["cluster", "internet", "minutes"];

/// Commands the suite runs elsewhere: (command prefix, file that runs it, texts that file holds).
const RUN_ELSEWHERE: &[(&str, &str, &[&str])] = &[
    ("scripts/test.sh", ".ci/run", &["scripts/test.sh"]),
    (
        "cargo build --release --lib --target wasm32-wasip1",
        "scripts/lib.sh",
        &[
            "WASM_TARGET=wasm32-wasip1",
            "cargo build --release --lib --target \"$WASM_TARGET\"",
        ],
    ),
    (
        "cargo build --release --lib --features native",
        "scripts/test.sh",
        &["cargo build --release --lib --features native"],
    ),
    (
        "cargo build --bin llm-filter",
        "scripts/render-configs.sh",
        &["cargo build --quiet --bin llm-filter"],
    ),
    (
        "scripts/render-configs.sh",
        "scripts/test.sh",
        &["scripts/render-configs.sh --check"],
    ),
    (
        "scripts/package-oci.sh",
        "tests/oci.rs",
        &["scripts/package-oci.sh"],
    ),
    (
        "cargo test --test ",
        "scripts/test.sh",
        &["cargo test --test '*'"],
    ),
    (
        "scripts/mesh.sh up",
        "tests/support/mesh.rs",
        &["vec![\"up\".into()"],
    ),
    (
        "scripts/mesh.sh reload",
        "tests/support/mesh.rs",
        &["mesh_sh(&[\"reload\""],
    ),
    (
        "scripts/mesh.sh down",
        "tests/support/mesh.rs",
        &["mesh_sh(&[\"down\""],
    ),
    (
        "scripts/ratelimit.sh",
        "tests/support/ratelimit.rs",
        &["scripts/ratelimit.sh", "\"up\"", "[\"down\"]"],
    ),
];

/// Words that make a `yaml`/`json` block a manifest block.
const MANIFEST_WORDS: [&str; 8] = [
    "LLMProvider",
    "LLMRoute",
    "providerHost",
    "openAIConfig",
    "backendRefs",
    "routeSpecificConfigs",
    "modelMapping",
    "\"providers\"",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md, then docs/*.md in name order (paths relative to the repository).
fn pages() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| p.strip_prefix(repo()).unwrap().to_path_buf())
        .collect();
    docs.sort();
    let mut all = vec![PathBuf::from("README.md")];
    all.extend(docs);
    all
}

/// One fenced code block.
#[derive(Debug)]
struct Block {
    page: PathBuf,
    /// 1-based line of the opening fence.
    line: usize,
    info: String,
    text: String,
}

impl Block {
    fn at(&self) -> String {
        format!("{}:{}", self.page.display(), self.line)
    }
}

/// A page split into code blocks and prose lines (with their numbers).
struct Page {
    path: PathBuf,
    blocks: Vec<Block>,
    prose: Vec<(usize, String)>,
}

fn read_page(path: &Path) -> Page {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    let mut page = Page {
        path: path.to_path_buf(),
        blocks: Vec::new(),
        prose: Vec::new(),
    };
    let mut open: Option<(usize, String, String, usize)> = None; // line, info, text, indent
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut open {
            None if trimmed.starts_with("```") => {
                let info = trimmed.trim_start_matches('`').trim().to_string();
                open = Some((i + 1, info, String::new(), indent));
            }
            None => page.prose.push((i + 1, line.to_string())),
            Some((start, info, body, _)) if trimmed.starts_with("```") => {
                page.blocks.push(Block {
                    page: path.to_path_buf(),
                    line: *start,
                    info: std::mem::take(info),
                    text: std::mem::take(body),
                });
                open = None;
            }
            Some((_, _, body, fence_indent)) => {
                // Blocks inside list items are indented like their fence.
                let cut = line.len() - line.trim_start().len();
                body.push_str(&line[cut.min(*fence_indent)..]);
                body.push('\n');
            }
        }
    }
    assert!(open.is_none(), "{}: an unclosed code block", path.display());
    page
}

fn all_pages() -> Vec<Page> {
    pages().iter().map(|p| read_page(p)).collect()
}

/// A scratch directory under the test's target dir.
fn scratch(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "docs-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn llm_filter() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_llm-filter"));
    command.current_dir(repo());
    command
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Headings and links

/// GitHub's anchor for a heading: lower-case, punctuation dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a page's headings (repeats get `-1`, `-2`, ...).
fn anchors(page: &Page) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in &page.prose {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if hashes == 0 || hashes > 6 || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(&line[hashes..]);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// A prose line without its inline code spans.
fn without_code_spans(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let ticks = rest[start..].chars().take_while(|&c| c == '`').count();
        let fence = "`".repeat(ticks);
        let after = &rest[start + ticks..];
        match after.find(&fence) {
            Some(end) => rest = &after[end + ticks..],
            None => {
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `(line, target)` of every `[text](target)` and `![alt](target)` in a page's prose.
fn links(page: &Page) -> Vec<(usize, String)> {
    let link = regex_lite::Regex::new(r"\]\(([^)\s]+)\)").unwrap();
    page.prose
        .iter()
        .flat_map(|(n, line)| {
            link.captures_iter(&without_code_spans(line))
                .map(|c| (*n, c[1].to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_readme_fits_and_links_every_page() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines; keep it at {README_MAX_LINES} or fewer and move depth to docs/"
    );
    let page = read_page(Path::new("README.md"));
    let targets: BTreeSet<String> = links(&page)
        .into_iter()
        .map(|(_, t)| t.split('#').next().unwrap_or_default().to_string())
        .collect();
    for doc in pages().iter().skip(1) {
        let doc = doc.display().to_string();
        assert!(targets.contains(&doc), "README.md does not link {doc}");
    }
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let pages = all_pages();
    let anchors: BTreeMap<PathBuf, BTreeSet<String>> =
        pages.iter().map(|p| (p.path.clone(), anchors(p))).collect();
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let dir = page.path.parent().unwrap_or(Path::new(""));
        for (n, target) in links(page) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((file, anchor)) => (file, Some(anchor)),
                None => (target.as_str(), None),
            };
            let file = if file.is_empty() {
                page.path.clone()
            } else {
                normalize(&dir.join(file))
            };
            let at = format!("{}:{n}: ({target})", page.path.display());
            if !repo().join(&file).exists() {
                broken.push(format!("{at}: no file {}", file.display()));
                continue;
            }
            if let Some(anchor) = anchor {
                match anchors.get(&file) {
                    Some(known) if known.contains(anchor) => {}
                    Some(known) => broken.push(format!(
                        "{at}: no heading with anchor #{anchor} in {} (anchors: {known:?})",
                        file.display()
                    )),
                    None => broken.push(format!(
                        "{at}: an anchor into {}, which is not a checked page",
                        file.display()
                    )),
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked > 20, "only {checked} relative links found");
}

/// `a/b/../c` → `a/c` (no file system access, so it works for missing files too).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn the_request_path_picture_is_an_svg() {
    let svg = std::fs::read_to_string(repo().join("docs/request-path.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for word in ["client", "listener", "llm-filter", "route", "TLS"] {
        assert!(svg.contains(word), "the picture does not show {word}");
    }
}

// ---------------------------------------------------------------------------------------------
// YAML and JSON blocks

/// How a manifest block is checked, from the `# check` comments at its top.
#[derive(Debug, Default)]
struct CheckMarks {
    with: Vec<String>,
    refused: Option<String>,
    marked: bool,
}

fn check_marks(block: &Block) -> CheckMarks {
    let mut marks = CheckMarks::default();
    for line in block.text.lines() {
        let Some(comment) = line.strip_prefix('#') else {
            break;
        };
        let comment = comment.trim();
        if let Some(files) = comment.strip_prefix("check with:") {
            marks.with = files.split_whitespace().map(str::to_string).collect();
            marks.marked = true;
        } else if let Some(expected) = comment.strip_prefix("check: refused:") {
            marks.refused = Some(expected.trim().to_string());
            marks.marked = true;
        } else if comment.starts_with("check") {
            panic!(
                "{}: unknown marker {line:?}; use `# check with: FILE...` or \
                 `# check: refused: TEXT`",
                block.at()
            );
        }
    }
    marks
}

fn is_data_block(block: &Block) -> bool {
    matches!(block.info.as_str(), "yaml" | "yml" | "json")
}

fn is_manifest_block(block: &Block) -> bool {
    is_data_block(block)
        && (check_marks(block).marked || MANIFEST_WORDS.iter().any(|w| block.text.contains(w)))
}

#[test]
fn every_manifest_block_passes_llm_filter_check() {
    let dir = scratch("manifests");
    let mut failures = Vec::new();
    let mut checked = 0;
    for page in all_pages() {
        for block in page.blocks.iter().filter(|b| is_manifest_block(b)) {
            checked += 1;
            let marks = check_marks(block);
            let name = format!(
                "{}-{}.{}",
                block.page.display().to_string().replace('/', "-"),
                block.line,
                block.info
            );
            let file = dir.join(name);
            std::fs::write(&file, &block.text).unwrap();
            let out = llm_filter()
                .arg("check")
                .arg(&file)
                .args(&marks.with)
                .output()
                .unwrap();
            let err = text(&out.stderr);
            match &marks.refused {
                None if !out.status.success() || !err.is_empty() => failures.push(format!(
                    "{}: llm-filter check refused the block:\n{err}",
                    block.at()
                )),
                Some(expected) if out.status.code() != Some(1) || !err.contains(expected) => {
                    failures.push(format!(
                        "{}: expected llm-filter check to refuse it with {expected:?}, got \
                         status {:?}:\n{err}",
                        block.at(),
                        out.status.code()
                    ))
                }
                _ => {}
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(checked >= 5, "only {checked} manifest blocks found");
}

#[test]
fn every_other_yaml_block_parses() {
    let mut failures = Vec::new();
    for page in all_pages() {
        for block in &page.blocks {
            if !is_data_block(block) || is_manifest_block(block) {
                continue;
            }
            let parsed = if block.info == "json" {
                serde_json::from_str::<serde_json::Value>(&block.text).map_err(|e| e.to_string())
            } else {
                serde_yaml::Deserializer::from_str(&block.text)
                    .map(|d| serde::Deserialize::deserialize(d).map(|_: serde_yaml::Value| ()))
                    .collect::<Result<Vec<()>, _>>()
                    .map(drop)
                    .map(|_| serde_json::Value::Null)
                    .map_err(|e| e.to_string())
            };
            if let Err(e) = parsed {
                failures.push(format!("{}: not valid {}: {e}", block.at(), block.info));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Shell commands

/// One command of a `sh` block: the command and its trailing comment.
#[derive(Debug)]
struct ShellCommand {
    at: String,
    command: String,
    comment: Option<String>,
}

/// Splits `line` at its trailing comment (a `#` after whitespace, outside quotes).
fn split_comment(line: &str) -> (String, Option<String>) {
    let mut quote: Option<char> = None;
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '#' && previous.is_whitespace() => {
                return (
                    line[..i].trim().to_string(),
                    Some(line[i + 1..].trim().to_string()),
                );
            }
            None => {}
        }
        previous = c;
    }
    (line.trim().to_string(), None)
}

fn shell_commands(block: &Block) -> Vec<ShellCommand> {
    let mut commands = Vec::new();
    let mut pending = String::new();
    let mut start = 0;
    for (i, line) in block.text.lines().enumerate() {
        if pending.is_empty() {
            start = block.line + 1 + i;
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
        }
        if let Some(head) = line.trim_end().strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let (command, comment) = split_comment(&pending);
        commands.push(ShellCommand {
            at: format!("{}:{start}", block.page.display()),
            command,
            comment,
        });
        pending.clear();
    }
    assert!(pending.is_empty(), "{}: a command ends in `\\`", block.at());
    commands
}

fn is_shell(block: &Block) -> bool {
    matches!(block.info.as_str(), "sh" | "bash" | "shell" | "console")
}

/// `Some(needs)` for a `needs: WHAT[, WHAT][; text]` comment; an error for a bad one.
fn needs(comment: &str) -> Result<Option<Vec<String>>, String> {
    let Some(list) = comment.strip_prefix("needs:") else {
        return Ok(None);
    };
    let list = list.split(';').next().unwrap_or_default();
    let items: Vec<String> = list.split(',').map(|s| s.trim().to_string()).collect();
    for item in &items {
        if !NEEDS.contains(&item.as_str()) {
            return Err(format!(
                "`needs: {item}` is not one of {}",
                NEEDS.join(", ")
            ));
        }
    }
    Ok(Some(items))
}

/// The command without leading `NAME=value` assignments.
fn program(command: &str) -> &str {
    let mut rest = command.trim();
    while let Some((word, tail)) = rest.split_once(' ') {
        let is_assignment = word.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if !is_assignment {
            break;
        }
        rest = tail.trim_start();
    }
    rest
}

/// How the suite covers a command.
#[derive(Debug, PartialEq)]
enum Coverage {
    /// `tests/docs.rs` runs it (in the block's script).
    Here,
    /// `scripts/demo.sh`, run once by `the_demo_runs`.
    Demo,
    /// Another part of the suite runs it: an index into `RUN_ELSEWHERE`.
    Elsewhere(usize),
    /// `# needs: ...`.
    Marked,
}

fn coverage(command: &ShellCommand) -> Result<Coverage, String> {
    if let Some(comment) = &command.comment {
        if needs(comment)?.is_some() {
            return Ok(Coverage::Marked);
        }
    }
    let program = program(&command.command);
    if program == "llm-filter"
        || program.starts_with("llm-filter ")
        || program.starts_with("export ")
    {
        return Ok(Coverage::Here);
    }
    if program == "scripts/demo.sh" {
        return Ok(Coverage::Demo);
    }
    if let Some(i) = RUN_ELSEWHERE
        .iter()
        .position(|(prefix, _, _)| program == prefix.trim() || program.starts_with(prefix))
    {
        return Ok(Coverage::Elsewhere(i));
    }
    Err(format!(
        "{:?} is not run by the tests: run it in tests/docs.rs, list where the suite runs it in \
         RUN_ELSEWHERE, or mark it with a trailing `# needs: {}`",
        command.command,
        NEEDS.join("|")
    ))
}

#[test]
fn every_command_is_run_by_the_tests_or_marked() {
    let mut failures = Vec::new();
    let mut elsewhere = BTreeSet::new();
    let mut scripts = Vec::new();
    for page in all_pages() {
        for block in page.blocks.iter().filter(|b| is_shell(b)) {
            let mut script = String::new();
            for command in shell_commands(block) {
                match coverage(&command) {
                    Ok(Coverage::Here) => {
                        script.push_str(&command.command);
                        script.push('\n');
                    }
                    Ok(Coverage::Elsewhere(i)) => {
                        elsewhere.insert(i);
                    }
                    Ok(Coverage::Demo | Coverage::Marked) => {}
                    Err(e) => failures.push(format!("{}: {e}", command.at)),
                }
            }
            if !script.is_empty() {
                scripts.push((block.at(), script));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    for i in elsewhere {
        let (command, file, needles) = RUN_ELSEWHERE[i];
        let body = std::fs::read_to_string(repo().join(file))
            .unwrap_or_else(|e| panic!("{file} (said to run {command:?}): {e}"));
        for needle in needles {
            assert!(
                body.contains(needle),
                "{file} is said to run {command:?} but does not contain {needle:?}"
            );
        }
    }

    assert!(!scripts.is_empty(), "no command of the docs runs here");
    for (at, script) in scripts {
        let out = run_script(&script);
        assert!(
            out.status.success(),
            "{at}: the commands of this block failed:\n{script}\nstdout:\n{}\nstderr:\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

/// Runs a block's commands with bash in a scratch directory that links to every top-level
/// entry of the repository (so `> file` writes there), `llm-filter` on the PATH and the demo keys
/// in the environment.
fn run_script(script: &str) -> Output {
    let dir = scratch("commands");
    for entry in std::fs::read_dir(repo()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == ".git" {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), dir.join(&name)).unwrap();
    }
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_llm-filter"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(&dir)
        .env("PATH", path)
        .env("DASHSCOPE_API_KEY", "sk-docs-dashscope")
        .env("DASHSCOPE_VIP_API_KEY", "sk-docs-dashscope-vip")
        .env("MOONSHOT_API_KEY", "sk-docs-moonshot")
        .env("DASHSCOPE_GATEWAY_API_KEY", "sk-docs-gateway")
        .output()
        .expect("bash runs")
}

/// The README's first command: the demo, with its own pass/fail check of the seeds' answers.
#[test]
fn the_demo_runs() {
    let shown = all_pages().iter().any(|p| {
        p.blocks.iter().filter(|b| is_shell(b)).any(|b| {
            shell_commands(b)
                .iter()
                .any(|c| coverage(c) == Ok(Coverage::Demo))
        })
    });
    assert!(
        shown,
        "no page shows scripts/demo.sh: drop this test or show it"
    );
    let out = Command::new("bash")
        .arg("scripts/demo.sh")
        .current_dir(repo())
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "scripts/demo.sh failed:\nstdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// The product speaks to users

/// No internal issue numbers in the product (upstream ones are written `owner/repo#N`).
#[test]
fn no_internal_issue_numbers() {
    let pattern = regex_lite::Regex::new(r"(?i)issues? ?#?[0-9]{1,2}\b").unwrap();
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = ["README.md", "docs", "src", "scripts", "tests"]
        .iter()
        .map(|p| repo().join(p))
        .collect();
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
            continue;
        }
        let Ok(body) = std::fs::read_to_string(&path) else {
            continue; // not text
        };
        for (n, line) in body.lines().enumerate() {
            if pattern.is_match(line) {
                let rel = path.strip_prefix(repo()).unwrap_or(&path);
                found.push(format!("{}:{}: {line}", rel.display(), n + 1));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// The checker's own rules

#[test]
fn the_checker_reads_markers_and_anchors_as_documented() {
    assert_eq!(
        slug(" Models: mapping and routing"),
        "models-mapping-and-routing"
    );
    assert_eq!(slug(" `settings`"), "settings");
    assert_eq!(slug(" What render istio makes"), "what-render-istio-makes");
    assert_eq!(
        split_comment("curl -d '{\"a\": \"#x\"}' http://h   # needs: internet; real keys"),
        (
            "curl -d '{\"a\": \"#x\"}' http://h".to_string(),
            Some("needs: internet; real keys".to_string())
        )
    );
    assert_eq!(
        needs("needs: cluster, internet; why").unwrap(),
        Some(vec!["cluster".to_string(), "internet".to_string()])
    );
    assert!(needs("needs: a cluster").is_err());
    assert_eq!(needs("the filter").unwrap(), None);
    assert_eq!(program("A=1 B=2 llm-filter check x"), "llm-filter check x");
    assert_eq!(
        without_code_spans("see `[x](y)` and [z](w)"),
        "see  and [z](w)"
    );
}
