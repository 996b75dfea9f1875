//! The runbooks in `docs/runbooks/`, run as written: every ```` ```sh ```` block of a runbook,
//! in order, as root in a throw-away machine with systemd as PID 1 (`tests/sdbox`), each one's
//! promised outcome checked. The marking convention is in `docs/runbooks/README.md`; in short:
//!
//! - every ```` ```sh ```` block is a step, run with `bash -e -o pipefail` in `/root`;
//! - HTML comments directly above a block state what it must do: `<!-- expect: TEXT -->`,
//!   `<!-- expect-not: TEXT -->`, `<!-- exit: N -->`, `<!-- retry: 30s -->`,
//!   `<!-- load: ADDR -->` (clients request `/` while it runs; nothing may fail),
//!   `<!-- measure: ADDR -->` (the same load, its outcome printed as `MEASURED ...`) and
//!   `<!-- report: LABEL -->` (the block's output printed as `MEASURED ...`);
//! - a block whose first line is `# not run by the tests: WHY` is shown, not run;
//! - `<!-- setup` … `-->` holds a hidden step: preparation the reader has already done.
//!
//! Each runbook gets a box of its own with a network of its own (only its own loopback), so a
//! runbook uses the ports it names, and runbooks run side by side without colliding. Before
//! its first block, the box has the binaries under test where `cargo build --release` would
//! leave them in a checkout at `/root/sdcluster`, and, for the runbooks that install the
//! Debian package, the `.deb` in `/root` (see [`RUNBOOKS`]).
//!
//! Needs root (skipped otherwise, unless `CI` is set: then it fails), as every box test does.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sdcluster_tests::deb::{on_ci, package};
use sdcluster_tests::load::MixedLoad;
use sdcluster_tests::sdbox::{self, Boot, SdBox};
use sdcluster_tests::{sdcluster_binary, worker_binary};

/// Where the runbooks are.
const RUNBOOK_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/runbooks");

/// The longest a block may run before it counts as hung.
const STEP_TIMEOUT_SECS: u32 = 180;

/// What a runbook's box needs besides the binaries.
#[derive(Debug, Clone, Copy)]
struct Needs {
    /// The Debian package (`target/debian/sdcluster_*.deb`), copied to `/root`.
    deb: bool,
}

/// Every runbook, and what its box needs. A runbook missing here fails
/// [`every_runbook_is_run_and_follows_the_convention`].
const RUNBOOKS: &[(&str, Needs)] = &[
    ("install.md", Needs { deb: true }),
    ("install-from-source.md", Needs { deb: false }),
    ("deploy.md", Needs { deb: false }),
    ("scale.md", Needs { deb: false }),
    ("listen.md", Needs { deb: false }),
    ("diagnose.md", Needs { deb: false }),
    ("capacity.md", Needs { deb: false }),
    ("fleet.md", Needs { deb: true }),
    ("kubernetes.md", Needs { deb: false }),
    ("uninstall.md", Needs { deb: true }),
];

#[test]
fn install() {
    run_runbook("install.md");
}

#[test]
fn install_from_source() {
    run_runbook("install-from-source.md");
}

#[test]
fn deploy() {
    run_runbook("deploy.md");
}

#[test]
fn scale() {
    run_runbook("scale.md");
}

#[test]
fn listen() {
    run_runbook("listen.md");
}

#[test]
fn diagnose() {
    run_runbook("diagnose.md");
}

#[test]
fn capacity() {
    run_runbook("capacity.md");
}

#[test]
fn fleet() {
    run_runbook("fleet.md");
}

#[test]
fn kubernetes() {
    run_runbook("kubernetes.md");
}

#[test]
fn uninstall() {
    run_runbook("uninstall.md");
}

// ---------------------------------------------------------------------------------------------
// The convention: parsing a runbook into steps

/// One block of a runbook.
#[derive(Debug, Clone, PartialEq)]
struct Step {
    /// The line of its opening fence (or of `<!-- setup`), 1-based, for messages.
    line: usize,
    /// Run, hidden set-up, or shown only.
    kind: Kind,
    /// The shell script: the block's lines, fence indentation removed.
    script: String,
    /// Substrings its output (stdout and stderr) must contain.
    expect: Vec<String>,
    /// Substrings its output must not contain.
    expect_not: Vec<String>,
    /// The exit status it must end with.
    exit: i32,
    /// Run it again until it meets its expectations, for at most this long.
    retry: Option<Duration>,
    /// Client load while it runs.
    load: Option<LoadCheck>,
    /// Print its output as a measured figure, under this label.
    report: Option<String>,
}

/// How a step is treated.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// A ```` ```sh ```` block the test runs.
    Run,
    /// An `<!-- setup … -->` comment: run, not shown to readers.
    Setup,
    /// A block starting with `# not run by the tests: WHY`: shown, not run.
    Shown(String),
}

/// Clients requesting `/` from `addr` while a step runs.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LoadCheck {
    addr: SocketAddr,
    /// Whether a refused or failed request fails the step (`load:`), or is only reported
    /// (`measure:`).
    lossless: bool,
}

/// The first line of a block that the tests do not run.
const NOT_RUN: &str = "# not run by the tests";

/// Info strings that would be shell code the tests never see: use `sh`.
const OTHER_SHELLS: &[&str] = &["bash", "shell", "console", "shell-session", "zsh", "terminal"];

/// A `<!-- key: value -->` line, if `line` is one.
fn directive(line: &str) -> Option<(&str, &str)> {
    let inner = line.trim().strip_prefix("<!--")?.strip_suffix("-->")?.trim();
    let (key, value) = inner.split_once(':')?;
    let is_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '-');
    is_key.then(|| (key, value.trim()))
}

/// `30s`, `500ms`, `2m`.
fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        _ => None,
    }
}

/// The steps of a runbook, in order; an error names the line that breaks the convention.
fn parse(text: &str) -> Result<Vec<Step>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut steps = Vec::new();
    let mut pending: Vec<(usize, &str, &str)> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim();
        let number = i + 1;
        if let Some((key, value)) = directive(trimmed) {
            pending.push((number, key, value));
            i += 1;
            continue;
        }
        if trimmed == "<!-- setup" {
            let end = (i + 1..lines.len())
                .find(|&j| lines[j].trim() == "-->")
                .ok_or(format!("line {number}: `<!-- setup` is never closed by a line `-->`"))?;
            let script = lines[i + 1..end].join("\n");
            steps.push(step(number, Kind::Setup, script, &pending)?);
            pending.clear();
            i = end + 1;
            continue;
        }
        let ticks = trimmed.len() - trimmed.trim_start_matches('`').len();
        if ticks >= 3 {
            let info = &trimmed[ticks..];
            let indent = line.len() - line.trim_start().len();
            // Closed by a line of at least as many backticks and nothing else (CommonMark).
            let closes = |l: &str| {
                let l = l.trim();
                l.len() >= ticks && l.chars().all(|c| c == '`')
            };
            let end = (i + 1..lines.len())
                .find(|&j| closes(lines[j]))
                .ok_or(format!("line {number}: the ``` block is never closed"))?;
            let body: Vec<&str> = lines[i + 1..end]
                .iter()
                .map(|l| match (l.get(..indent), l.get(indent..)) {
                    (Some(margin), Some(rest)) if margin.trim().is_empty() => rest,
                    _ => l.trim_start(),
                })
                .collect();
            let info = info.split_whitespace().next().unwrap_or("");
            if info == "sh" {
                let kind = match body.first() {
                    Some(first) if first.starts_with(NOT_RUN) => {
                        let why = first[NOT_RUN.len()..].trim_start_matches(':').trim();
                        if why.is_empty() {
                            return Err(format!("line {number}: say why the block is not run: `{NOT_RUN}: WHY`"));
                        }
                        Kind::Shown(why.to_owned())
                    }
                    _ => Kind::Run,
                };
                if matches!(kind, Kind::Shown(_)) && !pending.is_empty() {
                    return Err(format!("line {number}: a block that is not run can't promise an outcome"));
                }
                steps.push(step(number, kind, body.join("\n"), &pending)?);
            } else if OTHER_SHELLS.contains(&info) {
                return Err(format!("line {number}: ```{info} blocks are not run; use ```sh (see README.md)"));
            } else if let Some((at, key, _)) = pending.first() {
                return Err(format!("line {at}: `{key}:` is above a ```{info} block, which is not run"));
            }
            pending.clear();
            i = end + 1;
            continue;
        }
        if let Some((at, key, _)) = pending.first() {
            return Err(format!("line {at}: `{key}:` must be directly above a ```sh block or `<!-- setup`"));
        }
        i += 1;
    }
    if let Some((at, key, _)) = pending.first() {
        return Err(format!("line {at}: `{key}:` is above no block"));
    }
    Ok(steps)
}

/// A step from its script and the directives above it.
fn step(line: usize, kind: Kind, script: String, directives: &[(usize, &str, &str)]) -> Result<Step, String> {
    let mut step =
        Step { line, kind, script, expect: vec![], expect_not: vec![], exit: 0, retry: None, load: None, report: None };
    for &(at, key, value) in directives {
        let bad = |what: &str| format!("line {at}: `{key}: {value}`: {what}");
        match key {
            "expect" => step.expect.push(value.to_owned()),
            "expect-not" => step.expect_not.push(value.to_owned()),
            "exit" => step.exit = value.parse().map_err(|_| bad("not an exit status"))?,
            "retry" => step.retry = Some(parse_duration(value).ok_or_else(|| bad("not a duration like 30s"))?),
            "load" | "measure" => {
                if step.load.is_some() {
                    return Err(bad("one load per block"));
                }
                let addr = value.parse().map_err(|_| bad("not an address like 127.0.0.1:8080"))?;
                step.load = Some(LoadCheck { addr, lossless: key == "load" });
            }
            "report" => step.report = Some(value.to_owned()),
            _ => return Err(bad("unknown directive (expect, expect-not, exit, retry, load, measure, report)")),
        }
        if value.is_empty() {
            return Err(bad("empty value"));
        }
    }
    Ok(step)
}

// ---------------------------------------------------------------------------------------------
// Running a runbook

/// `docs/runbooks/NAME`.
fn runbook_path(name: &str) -> PathBuf {
    Path::new(RUNBOOK_DIR).join(name)
}

/// Boots a box for runbook `name`, prepares it as [`RUNBOOKS`] says, and runs every step.
fn run_runbook(name: &str) {
    let needs = RUNBOOKS.iter().find(|(n, _)| *n == name).map(|(_, needs)| *needs).expect("a runbook of RUNBOOKS");
    let text = std::fs::read_to_string(runbook_path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let steps = parse(&text).unwrap_or_else(|e| panic!("docs/runbooks/{name}: {e}"));
    let deb = if needs.deb {
        match package() {
            Some(deb) => Some(deb),
            None => return,
        }
    } else {
        None
    };
    let stem = name.trim_end_matches(".md");
    let boot = Boot { private_network: true, ..Boot::default() };
    let Some(sdbox) = SdBox::up_with(&format!("runbook-{stem}-{}", std::process::id()), &boot) else { return };
    let started = Instant::now();
    sdbox.copy_in(sdcluster_binary(), "/root/sdcluster/target/release/sdcluster");
    sdbox.copy_in(worker_binary(), "/root/sdcluster/target/release/sdcluster-worker");
    if let Some(deb) = &deb {
        let file = deb.file_name().and_then(|f| f.to_str()).expect("a .deb file name");
        sdbox.copy_in(deb, &format!("/root/{file}"));
    }
    let mut shown = 0;
    for step in &steps {
        match &step.kind {
            Kind::Shown(why) => {
                shown += 1;
                eprintln!("[{name}:{}] not run: {why}", step.line);
            }
            Kind::Run | Kind::Setup => run_step(&sdbox, name, step),
        }
    }
    let run = steps.len() - shown;
    eprintln!("[{name}] {run} blocks run, {shown} shown only, in {:.1?}", started.elapsed());
}

/// What a step's run did.
struct Outcome {
    output: Output,
    elapsed: Duration,
}

impl Outcome {
    /// stdout, then stderr.
    fn text(&self) -> String {
        format!("{}{}", String::from_utf8_lossy(&self.output.stdout), String::from_utf8_lossy(&self.output.stderr))
    }

    /// Why it is not what `step` promised, if it is not.
    fn mismatch(&self, step: &Step) -> Option<String> {
        let code = self.output.status.code();
        if code == Some(124) && step.exit != 124 {
            return Some(format!("timed out after {STEP_TIMEOUT_SECS}s"));
        }
        if code != Some(step.exit) {
            return Some(format!("exit status {:?}, expected {}", code, step.exit));
        }
        let text = self.text();
        if let Some(missing) = step.expect.iter().find(|e| !text.contains(e.as_str())) {
            return Some(format!("the output lacks {missing:?}"));
        }
        if let Some(present) = step.expect_not.iter().find(|e| text.contains(e.as_str())) {
            return Some(format!("the output has {present:?}"));
        }
        None
    }
}

/// Runs one block in the box (again, while it has `retry:` time left) and checks it.
fn run_step(sdbox: &SdBox, name: &str, step: &Step) {
    let load = step.load.map(|check| {
        let load = in_network_of(sdbox, move || MixedLoad::start(check.addr, 3, 3));
        load.wait_for_more(100);
        load
    });
    let deadline = step.retry.map(|d| Instant::now() + d);
    let script = format!("cd /root\n{}", step.script);
    let timeout = STEP_TIMEOUT_SECS.to_string();
    let outcome = loop {
        let began = Instant::now();
        let output = sdbox.exec(&["timeout", "-k", "5", &timeout, "bash", "-e", "-o", "pipefail", "-c", &script]);
        let outcome = Outcome { output, elapsed: began.elapsed() };
        match outcome.mismatch(step) {
            None => break outcome,
            Some(_) if deadline.is_some_and(|d| Instant::now() < d) => std::thread::sleep(Duration::from_millis(500)),
            Some(why) => panic!(
                "docs/runbooks/{name}:{}: {why}\n--- block\n{}\n--- output\n{}--- journal\n{}",
                step.line,
                step.script,
                outcome.text(),
                String::from_utf8_lossy(&sdbox.exec(&["journalctl", "--no-pager", "-n", "80"]).stdout)
            ),
        }
    };
    let what = if step.kind == Kind::Setup { "setup" } else { "block" };
    eprintln!("[{name}:{}] {what} ok in {:.2?}", step.line, outcome.elapsed);
    if let Some(label) = &step.report {
        eprintln!("MEASURED docs/runbooks/{name}:{}: {label}: {}", step.line, outcome.text().trim_end());
    }
    if let (Some(load), Some(check)) = (load, step.load) {
        load.wait_for_more(100);
        let (fresh, kept) = load.stop();
        let line = format!(
            "docs/runbooks/{name}:{}: the block took {} ms; fresh connections: {} ok, {} refused, {} failed; \
             keep-alive: {} ok, {} refused, {} failed ({} on connections closed unannounced), {} reconnects after Connection: close; failures: {:?} {:?}",
            step.line,
            outcome.elapsed.as_millis(),
            fresh.ok,
            fresh.refused,
            fresh.failed,
            kept.ok,
            kept.refused,
            kept.failed,
            kept.closed_unannounced,
            kept.reconnects,
            fresh.samples,
            kept.samples,
        );
        if check.lossless {
            let lost = fresh.refused + fresh.failed + kept.refused + kept.failed;
            assert_eq!(lost, 0, "requests lost under load: {line}");
        } else {
            eprintln!("MEASURED {line}");
        }
    }
}

/// Runs `f` on a thread that joined the box's network namespace; threads `f` starts are in it
/// too (a network namespace belongs to a thread, and a new thread inherits its creator's), so
/// the clients of a [`MixedLoad`] started there reach the box's own loopback.
fn in_network_of<T: Send + 'static>(sdbox: &SdBox, f: impl FnOnce() -> T + Send + 'static) -> T {
    let status = Command::new(sdbox::SCRIPT)
        .arg("status")
        .env("SDBOX_NAME", sdbox.name())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", sdbox::SCRIPT));
    let status = String::from_utf8_lossy(&status.stdout);
    let leader = status
        .split_whitespace()
        .find_map(|w| w.strip_prefix("leader="))
        .and_then(|pid| pid.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no leader pid in `sdbox status`: {status}"));
    let netns = File::open(format!("/proc/{leader}/ns/net")).expect("the box's network namespace");
    std::thread::spawn(move || {
        // SAFETY: a valid namespace fd; CLONE_NEWNET moves only this thread.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into the box's network: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the thread in the box's network panicked")
}

// ---------------------------------------------------------------------------------------------
// The convention itself

#[test]
fn every_runbook_is_run_and_follows_the_convention() {
    let mut files: Vec<String> = std::fs::read_dir(RUNBOOK_DIR)
        .expect("docs/runbooks")
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.ends_with(".md") && n != "README.md")
        .collect();
    files.sort();
    let mut listed: Vec<String> = RUNBOOKS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed, "every runbook in docs/runbooks has an entry in RUNBOOKS and a #[test]");
    let index = std::fs::read_to_string(runbook_path("README.md")).expect("docs/runbooks/README.md");
    for name in &files {
        assert!(index.contains(&format!("]({name})")), "docs/runbooks/README.md links to {name}");
        let text = std::fs::read_to_string(runbook_path(name)).unwrap();
        let steps = parse(&text).unwrap_or_else(|e| panic!("docs/runbooks/{name}: {e}"));
        assert!(steps.iter().any(|s| s.kind == Kind::Run), "{name} has no block that is run");
    }
    for name in files.iter().map(String::as_str).chain(["README.md"]) {
        check_links(name);
    }
    // The index shows the convention in ```markdown blocks, which are not steps.
    let steps = parse(&index).unwrap_or_else(|e| panic!("docs/runbooks/README.md: {e}"));
    assert!(steps.iter().all(|s| matches!(s.kind, Kind::Shown(_))), "README.md runs nothing");
}

/// The heading anchors of a Markdown text, as GitHub makes them: lower case, spaces to `-`,
/// punctuation other than `-` and `_` dropped.
fn anchors(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// Every relative link of docs/runbooks/`name` reaches a file, and its `#anchor` a heading.
fn check_links(name: &str) {
    let text = std::fs::read_to_string(runbook_path(name)).unwrap();
    for target in text.split("](").skip(1).filter_map(|rest| rest.split_once(')').map(|(t, _)| t)) {
        if target.contains("://") {
            continue;
        }
        let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
        let path = if file.is_empty() { runbook_path(name) } else { runbook_path(name).with_file_name(file) };
        assert!(path.exists(), "docs/runbooks/{name} links to {target}, which does not exist");
        if !anchor.is_empty() {
            let linked = std::fs::read_to_string(&path).unwrap();
            assert!(anchors(&linked).iter().any(|a| a == anchor), "docs/runbooks/{name}: no heading for {target}");
        }
    }
}

#[test]
fn the_parser_reads_the_convention() {
    let text = "\
Intro.

<!-- expect: active -->
<!-- exit: 3 -->
```sh
systemctl is-active web.socket
```

<!-- setup
install -m 0755 a /usr/local/bin/
-->

1. A step in a list:

   <!-- retry: 30s -->
   <!-- load: 127.0.0.1:8080 -->
   ```sh
   sdcluster restart --rolling web
   ```

```sh
# not run by the tests: needs a second host
ssh web2 true
```

```toml
listen = [\"*:80\"]
```

````markdown
<!-- expect: shown, not run -->
```sh
false
```
````
";
    let steps = parse(text).unwrap();
    assert_eq!(steps.len(), 4);
    assert_eq!((steps[0].line, &steps[0].kind, steps[0].exit), (5, &Kind::Run, 3));
    assert_eq!(steps[0].expect, ["active"]);
    assert_eq!((&steps[1].kind, steps[1].script.as_str()), (&Kind::Setup, "install -m 0755 a /usr/local/bin/"));
    assert_eq!(steps[2].script, "sdcluster restart --rolling web");
    assert_eq!(steps[2].retry, Some(Duration::from_secs(30)));
    assert_eq!(steps[2].load, Some(LoadCheck { addr: "127.0.0.1:8080".parse().unwrap(), lossless: true }));
    assert_eq!(steps[3].kind, Kind::Shown("needs a second host".into()));

    let error = |text: &str| parse(text).unwrap_err();
    assert!(error("<!-- expect: x -->\n\n```sh\ntrue\n```\n").contains("directly above"));
    assert!(error("<!-- expct: x -->\n```sh\ntrue\n```\n").contains("unknown directive"));
    assert!(error("<!-- exit: x -->\n```sh\ntrue\n```\n").contains("not an exit status"));
    assert!(error("```bash\ntrue\n```\n").contains("use ```sh"));
    assert!(error("```sh\n# not run by the tests\ntrue\n```\n").contains("say why"));
    assert!(error("<!-- expect: x -->\n```sh\n# not run by the tests: no\n```\n").contains("can't promise"));
    assert!(error("```sh\ntrue\n").contains("never closed"));
    assert!(error("<!-- setup\ntrue\n").contains("never closed"));
    assert_eq!(anchors("## A port that won't bind\n## 2. Describe it"), ["a-port-that-wont-bind", "2-describe-it"]);
}

// ---------------------------------------------------------------------------------------------
// The Kubernetes example (no cluster here: parsed, cross-checked, and its command run)

/// `docs/runbooks/k8s/NAME`.
fn k8s_path(name: &str) -> PathBuf {
    runbook_path("k8s").join(name)
}

/// Every document of a YAML file, as JSON, through PyYAML (`python3-yaml`); `None` (with a
/// note) when PyYAML is missing and this is not CI.
fn yaml_documents(path: &Path) -> Option<Vec<serde_json::Value>> {
    let script = "import json, sys, yaml\nprint(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    let out = Command::new("python3").args(["-c", script]).arg(path).output();
    match out {
        Ok(out) if out.status.success() => {
            Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display())))
        }
        Ok(out) if String::from_utf8_lossy(&out.stderr).contains("No module named 'yaml'") => {
            let why = "PyYAML is missing: apt-get install python3-yaml";
            assert!(!on_ci(), "{why}");
            eprintln!("SKIPPED: {why}");
            None
        }
        Ok(out) => panic!("{} is not valid YAML:\n{}", path.display(), String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!("python3: {e}"),
    }
}

/// The value at `path` (object keys, or array indices as numbers) in `value`, or a panic
/// naming what is missing.
fn at<'a>(value: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    path.split('.').fold(value, |v, key| {
        let next = match key.parse::<usize>() {
            Ok(i) => v.get(i),
            Err(_) => v.get(key),
        };
        next.unwrap_or_else(|| panic!("k8s/web.yaml has no {path} (stopped at {key:?})"))
    })
}

fn text(value: &serde_json::Value) -> &str {
    value.as_str().unwrap_or_else(|| panic!("{value} is not a string"))
}

/// The strings of a YAML sequence.
fn strings(value: &serde_json::Value) -> Vec<String> {
    value.as_array().unwrap_or_else(|| panic!("{value} is not a list")).iter().map(|v| text(v).to_owned()).collect()
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("the container's args lack {flag}"));
    args.get(i + 1).unwrap_or_else(|| panic!("{flag} has no value"))
}

#[test]
fn the_kubernetes_manifest_fits_together_and_its_command_serves_and_drains() {
    let Some(docs) = yaml_documents(&k8s_path("web.yaml")) else { return };
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap_or_else(|| panic!("k8s/web.yaml has no {k}"));
    let (deployment, service, budget) = (kind("Deployment"), kind("Service"), kind("PodDisruptionBudget"));
    let pod = at(deployment, "spec.template.spec");
    let labels = at(deployment, "spec.template.metadata.labels");
    let container = at(pod, "containers.0");
    let command = strings(at(container, "command"));
    let args = strings(at(container, "args"));
    let port = at(container, "ports.0");
    let port_number = at(port, "containerPort").as_u64().expect("containerPort is a number");
    let port_name = text(at(port, "name"));

    // The worker binds the port the pod declares, and the probes and the Service use it.
    let listen: SocketAddr = flag(&args, "--listen").parse().expect("--listen is HOST:PORT");
    assert_eq!(u64::from(listen.port()), port_number, "--listen and containerPort");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(at(container, &format!("{probe}.httpGet.path")), "/healthz", "{probe}");
        let probed = at(container, &format!("{probe}.httpGet.port"));
        assert!(probed == port_name || probed.as_u64() == Some(port_number), "{probe} port {probed}");
    }
    assert_eq!(at(deployment, "spec.selector.matchLabels"), labels, "the Deployment selects its pods");
    for (what, selector) in
        [("Service", at(service, "spec.selector")), ("PDB", at(budget, "spec.selector.matchLabels"))]
    {
        for (key, value) in selector.as_object().expect("a selector map") {
            assert_eq!(labels.get(key), Some(value), "the {what} selects the pods by {key}");
        }
    }
    let target = at(service, "spec.ports.0.targetPort");
    assert!(target == port_name || target.as_u64() == Some(port_number), "the Service's targetPort {target}");

    // preStop sleep + drain timeout, with a margin, within the grace period.
    let grace = at(pod, "terminationGracePeriodSeconds").as_u64().expect("a grace period in seconds");
    let pre_stop = strings(at(container, "lifecycle.preStop.exec.command"));
    assert_eq!(pre_stop[0], "sleep");
    let sleep: u64 = pre_stop[1].parse().expect("sleep SECONDS");
    let drain = parse_duration(flag(&args, "--drain-timeout")).expect("--drain-timeout like 20s").as_secs();
    assert!(sleep + drain < grace, "preStop {sleep}s + drain {drain}s must stay below the grace period {grace}s");

    // The image puts the binary where the manifest runs it.
    let containerfile = std::fs::read_to_string(k8s_path("Containerfile")).expect("k8s/Containerfile");
    let copy = containerfile.lines().find(|l| l.starts_with("COPY ")).expect("a COPY line");
    assert_eq!(copy.split_whitespace().last(), Some(command[0].as_str()), "Containerfile COPY and the command");

    // The container's command, run as the pod would (in a box with its own network): ready on
    // the probe's path, then SIGTERM, and out with status 0 well within the grace period.
    let boot = Boot { private_network: true, ..Boot::default() };
    let Some(sdbox) = SdBox::up_with(&format!("runbook-k8s-{}", std::process::id()), &boot) else { return };
    sdbox.copy_in(worker_binary(), &command[0]);
    let mut run =
        vec!["systemd-run", "--unit", "pod", "--property", "KillMode=mixed", "--setenv=SDCLUSTER_INSTANCE=web-0"];
    run.extend(command.iter().chain(&args).map(String::as_str));
    sdbox.exec_ok(&run);
    let probe = format!("http://127.0.0.1:{port_number}/healthz");
    let answered = sdcluster_tests::wait_until(Duration::from_secs(10), || {
        let out = sdbox.exec(&["curl", "-fsS", &probe]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert_eq!(answered.as_deref(), Some("ok\n"), "the pod's readiness probe\n{}", sdbox.diagnose("pod.service"));
    let stopping = Instant::now();
    sdbox.systemctl(&["kill", "--signal=SIGTERM", "pod.service"]);
    let stopped = sdcluster_tests::wait_until(Duration::from_secs(grace), || {
        (sdbox.property("pod.service", "ActiveState") != "active").then_some(())
    });
    assert!(stopped.is_some(), "the pod did not stop within its grace period\n{}", sdbox.diagnose("pod.service"));
    let journal = sdbox.exec_ok(&["journalctl", "-u", "pod.service", "--no-pager", "-o", "cat"]);
    assert!(journal.contains("drained; exiting"), "{journal}");
    assert!(journal.contains("Deactivated successfully"), "exit status 0:\n{journal}");
    eprintln!("the pod's command: ready, then out {:.0?} after SIGTERM", stopping.elapsed());
}
